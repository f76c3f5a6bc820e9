"""PEFT (LoRA) adapters in a model pool, merged into full weights when loaded.

A pool entry whose folder (local, or a Hub snapshot) holds ``adapter_config.json`` and no
``config.json`` is a PEFT adapter. It is loaded on the pool's base model (``_pretrained_``; without it,
the adapter's ``base_model_name_or_path``) with ``peft.PeftModel.from_pretrained`` and folded into the
base weights with ``merge_and_unload``, as FusionBench's ``load_lora_model`` does, so every merging
method sees full weights (``W = W_0 + (alpha / r) B A``). The merged model is cached per pool.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from fusion_bench.errors import CheckpointError
from fusion_bench.io.checkpoint import ModuleSource, StateDictSource, TensorSource, read_json_object

ADAPTER_CONFIG = "adapter_config.json"


def adapter_folder(ref: Any, name: str) -> Path | None:
    """The local folder of ``ref`` when it is a PEFT adapter (local folder or Hub id), else None."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    p = Path(os.path.expanduser(str(ref)))
    if p.is_dir():
        return p if (p / ADAPTER_CONFIG).exists() and not (p / "config.json").exists() else None
    if p.exists() or str(ref).startswith((".", "/", "~")) or str(ref).count("/") != 1:
        return None
    from fusion_bench.modelpool.base import resolve_hf_path

    folder = resolve_hf_path(str(ref), name)
    return folder if (folder / ADAPTER_CONFIG).exists() and not (folder / "config.json").exists() else None


class PeftMergedMixin:
    """ModelPool mixin: entries that are PEFT adapters load as base + adapter, merged (see module doc)."""

    def _adapter_folders(self) -> dict[str, Path | None]:
        cache = self.__dict__.setdefault("_adapter_cache", {})
        return cache

    def adapter_path(self, name: str) -> Path | None:
        """The adapter folder of model ``name``, or None when it is a full checkpoint."""
        cache = self._adapter_folders()
        if name not in cache:
            e = self.entry(name)  # type: ignore[attr-defined]
            cache[name] = None if name == "_pretrained_" else adapter_folder(e, name)
        return cache[name]

    def is_adapter(self, name: str) -> bool:
        return self.adapter_path(name) is not None

    def _merged_adapter_model(self, name: str) -> nn.Module:
        merged = self.__dict__.setdefault("_merged_adapters", {})
        if name in merged:
            return merged[name]
        folder = self.adapter_path(name)
        try:
            from peft import PeftModel
        except ImportError as e:  # pragma: no cover - peft is a dependency
            raise CheckpointError(f"Model '{name}' is a PEFT adapter ({folder}); install peft to load it.") from e
        if self.has_pretrained:  # type: ignore[attr-defined]
            base = super().load_model("_pretrained_")  # type: ignore[misc]
        else:
            cfg = read_json_object(folder / ADAPTER_CONFIG, name, "adapter config")
            ref = cfg.get("base_model_name_or_path")
            if not ref:
                raise CheckpointError(f"Model '{name}': adapter {folder} names no base model; add '_pretrained_' to "
                                      "modelpool.models.")
            base = self._load_hf_ref(ref, name)
        import warnings

        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                peft_model = PeftModel.from_pretrained(self.adapter_target(base), str(folder), is_trainable=False)
            missing = [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
            if missing:  # the adapter's tensors do not name this base's modules: merging would be a silent no-op
                raise CheckpointError(missing[0][:300])
            model = self.adapter_attach(base, peft_model.merge_and_unload())
        except Exception as e:
            raise CheckpointError(f"Model '{name}': cannot apply the PEFT adapter {folder} to the base model "
                                  f"({type(e).__name__}: {e}). Use the adapter's base model as '_pretrained_'.") from e
        model = model.eval()
        merged[name] = model
        return model

    def adapter_target(self, base: nn.Module) -> nn.Module:
        """The submodule of ``base`` the adapters were trained on (default: ``base`` itself)."""
        return base

    def adapter_attach(self, base: nn.Module, merged: nn.Module) -> nn.Module:
        """The pool's model once :meth:`adapter_target` of ``base`` is replaced by ``merged`` (default: ``merged``)."""
        return merged

    def _load_hf_ref(self, ref: str, name: str) -> nn.Module:
        from fusion_bench.modelpool.base import _quiet_from_pretrained, resolve_hf_path, resolve_model_class

        cls = resolve_model_class(self.config.model_class)  # type: ignore[attr-defined]
        return _quiet_from_pretrained(cls, resolve_hf_path(ref, name)).eval()

    # -- ModelPool overrides -------------------------------------------------------------------
    def load_model(self, name: str) -> nn.Module:
        if self.is_adapter(name):
            import copy

            return copy.deepcopy(self._merged_adapter_model(name))
        return super().load_model(name)  # type: ignore[misc]

    def source(self, name: str) -> TensorSource:
        if self.is_adapter(name):
            if name not in self._sources:  # type: ignore[attr-defined]
                src: TensorSource = ModuleSource(self._merged_adapter_model(name), name)
                if self.has_pretrained and not self.is_adapter("_pretrained_"):  # type: ignore[attr-defined]
                    # the base checkpoint stores tied tensors once (T5: shared, not encoder/decoder.embed_tokens):
                    # view the merged model under the base's tensor names
                    base_keys = set(super().source("_pretrained_").keys())  # type: ignore[misc]
                    sd = src.to_state_dict()
                    if base_keys <= set(sd):
                        src = StateDictSource({k: v for k, v in sd.items() if k in base_keys}, name)
                self._sources[name] = src  # type: ignore[attr-defined]
            return self._sources[name]  # type: ignore[attr-defined]
        return super().source(name)  # type: ignore[misc]

    def hf_folder(self, name: str) -> Path | None:
        # an adapter folder is not a checkpoint of the merged weights (the streaming engine must not read it)
        return None if self.is_adapter(name) else super().hf_folder(name)  # type: ignore[misc]

    def describe(self) -> dict[str, Any]:
        d = super().describe()  # type: ignore[misc]
        adapters = [n for n in self.model_names if self.is_adapter(n)]  # type: ignore[attr-defined]
        if adapters:
            d["peft_adapters"] = {"models": adapters, "merged": "merge_and_unload on _pretrained_"}
        return d
