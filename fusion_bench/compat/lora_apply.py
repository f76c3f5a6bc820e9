"""Apply a PEFT LoRA adapter to a model checkpoint: mergekit's ``model: BASE+LORA`` references.

mergekit 0.1.5 (``ModelReference.merged``) loads BASE with transformers (``dtype`` = ``--lora-merge-dtype``,
else the checkpoint's own dtype, transformers' ``"auto"``), loads the adapter with
``peft.PeftModel.from_pretrained`` and saves ``merge_and_unload()``; the merge then reads that model.
This module writes the same model without transformers or PEFT, tensor by tensor:

- every LoRA module ``M`` (``M.lora_A.weight`` (r, in) and ``M.lora_B.weight`` (out, r)):
  ``M.weight <- dtype(float32(M.weight) + float32(B) @ float32(A) * s)`` (transposed for ``fan_in_fan_out``),
  ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``), ``r`` and ``alpha`` per module from
  ``rank_pattern`` / ``alpha_pattern`` (PEFT's rule: the first pattern ``p`` with
  ``re.match(rf"(.*\\.)?({p})$", M)``), else ``r`` and ``lora_alpha``;
- embedding LoRA (``M.lora_embedding_A`` (r, vocab), ``M.lora_embedding_B`` (dim, r)): ``(B @ A)^T s``;
- ``lora_bias``: ``M.bias <- M.bias + s * M.lora_B.bias``;
- whole tensors of the adapter (``modules_to_save``) replace the base's tensor.

The adapter weights are float32 when applied (PEFT upcasts half-precision adapter weights on load,
``autocast_adapter_dtype``), the sum is rounded once to the model's dtype, as PEFT's in-place merge does.
DoRA, other PEFT methods and LoRA on parameters (``target_parameters``) are refused in one line.

Args of :func:`apply_lora`: the base folder, the adapter folder, the output folder, the dtype.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fusion_bench.errors import CheckpointError, ConfigError

ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_embedding_A", ".lora_embedding_B")
#: side files of the base copied beside the merged weights (config, generation config, tokenizer)
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
               "chat_template.jinja")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def split_model_ref(ref: Any, where: str) -> tuple[str, str | None]:
    """mergekit's model reference -> (model path, LoRA path or None).

    A string ``MODEL`` or ``MODEL+LORA`` (more than one ``+`` is refused, as mergekit), or a mapping
    ``{model: ..., lora: ...}`` (each a path, ``{path: ...}``); ``@revision`` suffixes are refused (local
    folders and the hub cache hold one revision). ``override_architecture`` is refused.
    """
    if isinstance(ref, dict):
        extra = set(ref) - {"model", "lora", "path", "revision", "override_architecture"}
        if extra:
            raise ConfigError(f"{where} has unknown key(s) {sorted(extra)}; a model reference takes 'model' and "
                              "'lora' (or 'path').")
        if ref.get("override_architecture"):
            raise ConfigError(f"{where}.override_architecture is not supported: fusion_bench merges checkpoints "
                              "tensor by tensor by name; remove it (or use --allow-crimes).")
        if "path" in ref and "model" not in ref:
            return _path(ref, where), None
        if "model" not in ref:
            raise ConfigError(f"{where}={ref!r} is not a model reference; give 'model' (and optionally 'lora').")
        model = _path(ref["model"], f"{where}.model")
        lora = _path(ref["lora"], f"{where}.lora") if ref.get("lora") is not None else None
        return model, lora
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{where}={ref!r} is not a model reference (a path or hub id, optionally +LORA).")
    if Path(ref).exists():
        return ref, None
    parts = ref.split("+")
    if len(parts) > 2:
        raise ConfigError(f"{where}='{ref}' has more than one '+'; mergekit takes MODEL or MODEL+LORA.")
    if len(parts) == 2:
        return _path(parts[0], where), _path(parts[1], where)
    return _path(ref, where), None


def _path(x: Any, where: str) -> str:
    if isinstance(x, dict):
        extra = set(x) - {"path", "revision"}
        if extra or "path" not in x:
            raise ConfigError(f"{where}={x!r}: a model path is a string or {{path: ...}}.")
        if x.get("revision"):
            raise ConfigError(f"{where}: revision '{x['revision']}' is not supported; give a local folder or the hub "
                              "id of the revision in your cache.")
        x = x["path"]
    if not isinstance(x, str) or not x:
        raise ConfigError(f"{where}={x!r} is not a path or hub id.")
    if "@" in x and not Path(x).exists():
        raise ConfigError(f"{where}='{x}': '@revision' is not supported; give a local folder.")
    return x


def _match_pattern(patterns: dict[str, Any], module: str) -> Any:
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return v
    return None


def _adapter_tensors(lora: Path) -> dict[str, torch.Tensor]:
    st, bn = lora / "adapter_model.safetensors", lora / "adapter_model.bin"
    if st.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(st))
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
            raise CheckpointError(f"LoRA adapter '{lora}': {st.name} cannot be read ({str(e).splitlines()[0][:200]}); "
                                  "re-save the adapter.") from None
    if bn.is_file():
        return torch.load(bn, map_location="cpu", weights_only=True)
    raise CheckpointError(f"LoRA adapter '{lora}' has no adapter_model.safetensors (or .bin); give a PEFT adapter "
                          "folder.")


def read_adapter(lora: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """(adapter config, module -> its LoRA tensors, whole tensors by model tensor name) of a PEFT LoRA folder."""
    lora = Path(lora)
    if not (lora / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"LoRA adapter '{lora}' has no {ADAPTER_CONFIG}; give a PEFT LoRA adapter folder "
                              "(hub ids must be in the local cache).")
    try:
        cfg = json.loads((lora / ADAPTER_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"LoRA adapter '{lora}': {ADAPTER_CONFIG} is not valid JSON ({e}).") from None
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ConfigError(f"LoRA adapter '{lora}' is a {kind} adapter; only LoRA adapters can be applied.")
    if cfg.get("use_dora"):
        raise ConfigError(f"LoRA adapter '{lora}' uses DoRA (use_dora: true), which fusion_bench does not apply; "
                          "merge it with PEFT (merge_and_unload) first.")
    if cfg.get("target_parameters"):
        raise ConfigError(f"LoRA adapter '{lora}' targets parameters (target_parameters), which fusion_bench does "
                          "not apply; merge it with PEFT first.")
    if cfg.get("layer_replication"):
        raise ConfigError(f"LoRA adapter '{lora}' uses layer_replication, which fusion_bench does not apply.")
    mods: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for k, t in _adapter_tensors(lora).items():
        name = k.removeprefix(_PREFIX)
        for suf in _LORA_SUFFIXES:
            if name.endswith(suf):
                mods.setdefault(name[: -len(suf)], {})[suf.lstrip(".")] = t
                break
        else:
            if ".lora_" in name or ".lora_magnitude_vector" in name:
                raise ConfigError(f"LoRA adapter '{lora}': tensor '{k}' is of a LoRA variant fusion_bench does not "
                                  "apply; merge the adapter with PEFT first.")
            whole[name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")] = t
    return cfg, mods, whole


def lora_deltas(cfg: dict[str, Any], mods: dict[str, dict[str, torch.Tensor]], lora: str = "adapter"
                ) -> dict[str, torch.Tensor]:
    """model tensor name -> float32 delta (``s B A`` etc.) of every LoRA module of the adapter."""
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_p, alpha_p = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    fifo = bool(cfg.get("fan_in_fan_out", False))
    out: dict[str, torch.Tensor] = {}
    for mod, ts in mods.items():
        emb = "lora_embedding_A" in ts
        a = ts.get("lora_embedding_A" if emb else "lora_A.weight")
        b = ts.get("lora_embedding_B" if emb else "lora_B.weight")
        if a is None or b is None:
            raise CheckpointError(f"LoRA adapter '{lora}': module '{mod}' lacks its {'A' if a is None else 'B'} "
                                  "matrix; re-save the adapter.")
        r = _match_pattern(rank_p, mod) or r0
        alpha = _match_pattern(alpha_p, mod) or a0
        if a.shape[0] != r:
            raise CheckpointError(f"LoRA adapter '{lora}': module '{mod}' has rank {a.shape[0]} but the config says "
                                  f"r={r}; fix rank_pattern in {ADAPTER_CONFIG}.")
        s = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        d = b.float() @ a.float()
        if emb or fifo:
            d = d.T
        out[f"{mod}.weight"] = d * s
        if "lora_B.bias" in ts:
            if not cfg.get("lora_bias"):
                continue  # PEFT ignores lora_B.bias unless lora_bias is set
            out[f"{mod}.bias"] = ts["lora_B.bias"].float() * s
    return out


def _modules_to_save(cfg: dict[str, Any], name: str) -> bool:
    mods = cfg.get("modules_to_save") or []
    module = name.rsplit(".", 1)[0]
    return any(module == m or module.endswith("." + m) for m in mods)


def apply_lora(model: str, lora: str, out: str | Path, dtype: str | None = None) -> dict[str, Any]:
    """Write ``model`` with the LoRA adapter ``lora`` merged into ``out`` (a new folder); returns a summary.

    Args:
        model: base model folder (safetensors).
        lora: PEFT LoRA adapter folder.
        out: the folder to write (created atomically).
        dtype: ``--lora-merge-dtype`` (the model is cast to it first); None: the checkpoint's dtype.
    """
    from fusion_bench.io.atomic import atomic_dir
    from fusion_bench.io.stream import ShardedWriter, StreamReader

    cfg, mods, whole = read_adapter(lora)
    deltas = lora_deltas(cfg, mods, lora)
    target = _DTYPES.get(dtype.removeprefix("torch.")) if dtype else None
    if dtype and target is None:
        raise ConfigError(f"--lora-merge-dtype {dtype!r} is not a dtype; use bfloat16, float16 or float32.")
    reader = StreamReader(model, name=model)
    try:
        keys = reader.keys()
        missing = [k for k in deltas if k not in keys]
        if missing:
            raise ConfigError(f"LoRA adapter '{lora}' changes tensor '{missing[0]}', which model '{model}' does not "
                              "have; apply the adapter to the model it was trained on.")
        ignored = [k for k in whole if not _modules_to_save(cfg, k)]
        for k in whole:
            if k not in ignored and k not in keys:
                raise ConfigError(f"LoRA adapter '{lora}' saves tensor '{k}' whole, which model '{model}' does not have.")
        plan = []
        for k in keys:
            m = reader.meta(k)
            dt = target if (target is not None and m.dtype.is_floating_point) else m.dtype
            shape = whole[k].shape if k in whole and k not in ignored else m.shape
            plan.append((k, tuple(shape), dt))
        with atomic_dir(out, overwrite=False, what="LoRA-merged model") as tmp:
            w = ShardedWriter(tmp, plan, dest=out)
            try:
                for k, _shape, dt in plan:
                    if k in whole and k not in ignored:
                        t = whole[k].to(dt)
                    else:
                        t = reader.read(k).to(dt)
                        if k in deltas:
                            d = deltas[k]
                            if tuple(d.shape) != tuple(t.shape):
                                raise ConfigError(f"LoRA adapter '{lora}': the delta of '{k}' has shape "
                                                  f"{list(d.shape)}, the model's tensor {list(t.shape)}; apply the "
                                                  "adapter to the model it was trained on.")
                            t = (t.float() + d).to(dt) if dt != torch.float64 else t + d.double()
                    w.write(k, t.contiguous())
                w.finish()
            finally:
                w.close()
            for f in _SIDE_FILES:
                if (Path(model) / f).is_file():
                    shutil.copy2(Path(model) / f, tmp / f)
            if target is not None and (tmp / "config.json").is_file():
                c = json.loads((tmp / "config.json").read_text())
                for key in ("torch_dtype", "dtype"):
                    if key in c:
                        c[key] = str(target).removeprefix("torch.")
                (tmp / "config.json").write_text(json.dumps(c, indent=2))
    finally:
        reader.close()
    return {"output": str(out), "lora_modules": len(deltas), "whole": len(whole) - len(ignored),
            "ignored": ignored}


__all__ = ["apply_lora", "lora_deltas", "read_adapter", "split_model_ref"]
