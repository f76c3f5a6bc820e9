"""Pure tensor math of the mixing family (weight-ensembling MoE, rank-one MoE, SMILE, upcycling)."""
