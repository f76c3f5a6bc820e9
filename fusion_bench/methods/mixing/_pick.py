"""Which model of the pool a one-model mixing method (upcycling, depth up-scaling) reads."""

from __future__ import annotations

from fusion_bench.errors import ConfigError, did_you_mean


def one_model(pool, model: str | None, method: str, does: str) -> str:
    """``method.model`` when set (it must be in the pool), else ``_pretrained_``, else the pool's only model.

    Args:
        pool: the model pool.
        model: the ``method.model`` option (None: not set).
        method: the method's name, for the error.
        does: what the method does to one model, for the error (e.g. "deepens").
    """
    if model is not None:
        if model not in pool.names:
            raise ConfigError(f"method.model='{model}' is not in the pool.{did_you_mean(model, pool.names)}")
        return model
    if pool.has_pretrained:
        return pool.base_name()
    if len(pool.model_names) != 1:
        raise ConfigError(f"{method} {does} one model; the pool has {pool.model_names} and no '_pretrained_': set "
                          "method.model=<name>.")
    return pool.model_names[0]
