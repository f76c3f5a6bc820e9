"""Pure tensor kernels, one per method idea: no I/O, no config, no global state.

Each docstring names the paper and the exact variant. Inputs are lists of same-shape tensors.
Laid out by method family, mirroring ``fusion_bench/methods/``: ``kernels/merging/ties.py`` holds the
math of ``methods/merging/ties.py``.
"""
