"""Pure tensor math of the subspace family (SVDs and masks of task matrices)."""
