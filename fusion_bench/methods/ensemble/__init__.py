"""Output-level ensembles: the members stay separate and their predictions are combined."""
