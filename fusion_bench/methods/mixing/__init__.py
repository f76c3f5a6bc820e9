"""Mixing / upscaling: the result is a different, usually larger model (MoE layers, more layers)."""
