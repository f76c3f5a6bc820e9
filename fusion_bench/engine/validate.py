"""Pre-flight checks across tensor sources: names and shapes agree before any tensor is merged."""

from __future__ import annotations

from collections.abc import Mapping

from fusion_bench.errors import ModelMismatchError
from fusion_bench.io.checkpoint import TensorSource


def validate_sources(ref_name: str, sources: Mapping[str, TensorSource], keys: list[str] | None = None,
                     allow_extra: bool = False) -> list[str]:
    """Check that every source holds the reference's tensors with the same shapes.

    Args:
        ref_name: the name of the reference source (the base model) in ``sources``.
        sources: model name -> tensor source.
        keys: the tensors to check (default: all of the reference).
        allow_extra: accept tensors that the reference lacks (otherwise an error).
    Returns:
        the checked keys, in the reference's file order.
    """
    ref_metas = sources[ref_name].metas()
    keys = list(keys) if keys is not None else list(ref_metas)
    for k in keys:
        if k not in ref_metas:
            raise ModelMismatchError(f"Base model '{ref_name}' lacks tensor '{k}'.")
    for n, src in sources.items():
        if n == ref_name:
            continue
        metas = src.metas()
        missing = [k for k in keys if k not in metas]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ModelMismatchError(
                f"Model '{n}' lacks tensor '{missing[0]}'{more} that base model '{ref_name}' has: the "
                "architectures differ. Use checkpoints fine-tuned from the same base model.")
        if not allow_extra:
            extra = [k for k in metas if k not in ref_metas]
            if extra:
                more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
                raise ModelMismatchError(
                    f"Model '{n}' has tensor '{extra[0]}'{more} that base model '{ref_name}' lacks: the "
                    "architectures differ. Use checkpoints of one architecture.")
        for k in keys:
            a, b = ref_metas[k], metas[k]
            if a.shape != b.shape:
                raise ModelMismatchError(
                    f"Tensor '{k}' has shape {list(b.shape)} in model '{n}' but {list(a.shape)} in base model "
                    f"'{ref_name}'. Merge only models of one architecture (for a vocabulary-size difference, "
                    "resize the embeddings first or exclude the embedding tensors).")
            if a.dtype.is_floating_point != b.dtype.is_floating_point:
                raise ModelMismatchError(
                    f"Tensor '{k}' is {b.dtype} in model '{n}' but {a.dtype} in base model '{ref_name}'.")
    return keys
