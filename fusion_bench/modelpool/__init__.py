"""Model pools: named checkpoints with ``_pretrained_`` as the base, loaded lazily."""

from fusion_bench.modelpool.base import PRETRAINED, ModelPool, ModelPoolConfig, TensorBag, build_modelpool

__all__ = ["PRETRAINED", "ModelPool", "ModelPoolConfig", "TensorBag", "build_modelpool"]
