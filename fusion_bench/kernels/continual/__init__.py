"""Pure tensor math of the continual family (no I/O): one function per step of a method that merges
models one at a time (OPCM's projection, DOP's per-layer optimisation, sequential TIES on two rows)."""
