"""Reference rows that fuse nothing (FusionBench's dummy)."""
