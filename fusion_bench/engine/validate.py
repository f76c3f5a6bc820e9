"""Pre-flight checks across tensor sources: names and shapes agree before any tensor is merged."""

from __future__ import annotations

from collections.abc import Mapping

import torch

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


def untied_keys(state_dict: Mapping[str, torch.Tensor], file_keys: list[str] | None = None) -> list[str]:
    """State-dict keys with tied aliases removed (e.g. GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``).

    Tied parameters are one object: merging each alias would apply the merge twice to the same
    memory. One key per object is kept, preferring the name the checkpoint files hold.

    Args:
        state_dict: ``module.state_dict(keep_vars=True)`` (the parameter objects themselves, so
            aliases are recognised, also on the meta device).
        file_keys: the tensor names of the checkpoint the module was loaded from.
    """
    fset = set(file_keys or [])
    groups: dict[int, list[str]] = {}
    for k, t in state_dict.items():
        groups.setdefault(id(t), []).append(k)
    order = list(groups)
    out = []
    for ident in order:
        g = groups[ident]
        in_file = [k for k in g if k in fset]
        out.append(in_file[0] if in_file else g[0])
    return out


def rename_map(canonical: list[str], src_keys: list[str]) -> dict[str, str] | None:
    """Map canonical (base checkpoint) names to another checkpoint's names that differ by a prefix.

    A CLIP vision tower saved by one transformers version holds ``vision_model.embeddings.*``, by
    another ``embeddings.*``; the same tensors either way. Returns None when the names already agree
    (or nothing maps); otherwise the best prefix rewrite (the one mapping most keys).
    """
    sset = set(src_keys)
    if all(k in sset for k in canonical):
        return None
    candidates: set[tuple[str, str]] = set()  # (strip from canonical, add for source)
    probes = [k for k in canonical if k not in sset][:8]
    for c in probes:
        parts = c.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[i:]) in sset:
                candidates.add((".".join(parts[:i]) + ".", ""))
        for sk in src_keys:
            if sk.endswith("." + c):
                candidates.add(("", sk[: -len(c)]))
    best: dict[str, str] = {}
    for strip, add in candidates:
        m = {}
        for c in canonical:
            if c.startswith(strip) and add + c[len(strip):] in sset:
                m[c] = add + c[len(strip):]
        if len(m) > len(best):
            best = m
    return best or None


class RenamedSource(TensorSource):
    """A checkpoint viewed under the base checkpoint's tensor names (see :func:`rename_map`); tensors it
    holds outside the mapping keep their own names (so they are reported as extra)."""

    def __init__(self, src: TensorSource, mapping: dict[str, str]):
        self.src = src
        self.name = src.name
        self._map = dict(mapping)
        used = set(mapping.values())
        self._keys = list(mapping) + [k for k in src.keys() if k not in used]

    def _resolve(self, key: str) -> str:
        return self._map.get(key, key)

    def keys(self) -> list[str]:
        return list(self._keys)

    def meta(self, key: str):
        return self.src.meta(self._resolve(key))

    def get(self, key: str) -> torch.Tensor:
        return self.src.get(self._resolve(key))

    def content_hash(self) -> str:
        return self.src.content_hash()


def align_keys(module_keys: list[str], file_keys: list[str]) -> dict[str, str] | None:
    """Map a module's state-dict keys to checkpoint tensor names.

    transformers may rename on load (e.g. ``CLIPVisionModel`` has ``embeddings.*`` while its files
    hold ``vision_model.embeddings.*``). Returns None when no common prefix maps every key.
    """
    fset = set(file_keys)
    if all(k in fset for k in module_keys):
        return {k: k for k in module_keys}
    if not module_keys:
        return {}
    probe = module_keys[0]
    for fk in file_keys:
        if fk.endswith("." + probe):
            prefix = fk[: -len(probe)]
            if all(prefix + k in fset for k in module_keys):
                return {k: prefix + k for k in module_keys}
    return None


def aligned_sources(base_name: str, sources: Mapping[str, TensorSource], module_keys: list[str]
                    ) -> tuple[dict[str, TensorSource], dict[str, str]] | None:
    """Map a module's keys to the base checkpoint's names and view every other checkpoint under those
    names (prefix differences resolved by :func:`rename_map`).

    Returns (sources, module key -> base checkpoint name), or None when the base checkpoint's names
    do not map the module's keys (the caller then compares loaded modules).
    """
    key_map = align_keys(module_keys, sources[base_name].keys())
    if key_map is None:
        return None
    canonical = [key_map[k] for k in module_keys]
    out: dict[str, TensorSource] = dict(sources)
    for n, src in sources.items():
        if n == base_name:
            continue
        m = rename_map(canonical, src.keys())
        if m is not None:
            out[n] = RenamedSource(src, m)
    return out, key_map
