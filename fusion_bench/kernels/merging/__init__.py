"""Pure tensor math of the merging family (no I/O): one function per method step."""
