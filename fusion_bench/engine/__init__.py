"""Engines that apply a tensor-wise method across checkpoints: in memory, or streamed to disk."""
