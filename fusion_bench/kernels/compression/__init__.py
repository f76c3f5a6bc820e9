"""Pure tensor math of the compression family: pruning masks (magnitude, random, Wanda), SparseGPT's
OBS reconstruction, SparseLo's low-rank compensation and MoE expert pruning/skipping."""
