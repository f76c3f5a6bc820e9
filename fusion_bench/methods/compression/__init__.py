"""Compression family: pruning (magnitude, random, Wanda, SparseGPT; unstructured and N:M), SparseLo (pruning with
low-rank compensation), expert pruning and dynamic skipping for mixture-of-experts LMs, BitDelta."""
