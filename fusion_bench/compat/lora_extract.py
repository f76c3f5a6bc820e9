"""``fusion_bench extract-lora``: a LoRA adapter from a fine-tuned model minus its base (mergekit-extract-lora).

    fusion_bench extract-lora --model FINE_TUNED --base-model BASE --out-path OUT [--max-rank 128]
        [--sv-epsilon 0] [--no-distribute-scale] [--embed-lora] [--save-module NAME ...]
        [-e/--exclude-regex RX ...] [-i/--include-regex RX ...] [--skip-undecomposable] [--overwrite]

Semantics of mergekit 0.1.5's ``mergekit-extract-lora`` (docs/mergekit.md):

- every ``nn.Linear`` module (of the model built from ``config.json`` on the meta device; no model code
  from the checkpoint runs) gets a LoRA from the truncated SVD of its delta
  ``Delta = W_ft - W_base = U S V^T``: rank r = min(``max_rank``, n_singular) and, with ``sv_epsilon`` > 0,
  at most the number of singular values above it; ``A = sqrt(S_r) V_r^T``, ``B = U_r sqrt(S_r)``
  (``--no-distribute-scale``: ``A = S_r V_r^T``, ``B = U_r``); lora_alpha = r per module, so
  ``B A`` is the best rank-r approximation of Delta (Eckart-Young). The SVD runs in float32 on the delta
  taken in the checkpoint dtype; A and B are saved in that dtype. A linear layer's bias delta is saved
  as ``lora_B.bias`` (the adapter config then sets ``lora_bias``);
- the input and output embeddings (and any ``nn.Embedding``) are saved whole as ``modules_to_save``
  unless ``--embed-lora`` (embeddings get a LoRA; not when the vocabulary sizes differ) or an
  ``--exclude-regex`` matches them;
- other modules with a weight (norms) are saved whole as ``modules_to_save``, or skipped with
  ``--skip-undecomposable``;
- ``--save-module`` saves a module (full name or last name component) whole; ``--include-regex`` /
  ``--exclude-regex`` (``re.search`` on the module name) choose which modules are extracted.

The output folder is a PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``) that
``peft.PeftModel.from_pretrained(base, OUT)`` loads, written atomically under fusion_bench's output
guards (an existing OUT is refused unless ``--overwrite`` and fusion_bench wrote it).
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fusion_bench.errors import CheckpointError, ConfigError


@dataclass
class ExtractOptions:
    """Options of the extraction, with mergekit-extract-lora's names and defaults."""

    max_rank: int = 128
    sv_epsilon: float = 0.0
    distribute_scale: bool = True
    embed_lora: bool = False
    modules_to_save: list[str] = field(default_factory=list)
    exclude_regexes: list[str] = field(default_factory=list)
    include_regexes: list[str] = field(default_factory=list)
    skip_undecomposable: bool = False


def decompose(delta: torch.Tensor, max_rank: int, sv_epsilon: float = 0.0,
              distribute_scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of a 2-D delta as LoRA factors (A: r x in, B: out x r), B @ A ~ delta.

    Eckart-Young: B @ A is the best rank-r approximation of ``delta`` in Frobenius and spectral norm;
    r = min(max_rank, min(delta.shape)), and with ``sv_epsilon`` > 0 at most #(s > sv_epsilon)
    (mergekit-extract-lora's rule). Computed in float32, returned in ``delta``'s dtype.

    Args:
        delta: the weight difference (out x in).
        max_rank: the largest rank kept.
        sv_epsilon: singular values at or below it are dropped (0: none).
        distribute_scale: A = sqrt(S) V^T, B = U sqrt(S) (else A = S V^T, B = U).
    """
    u, s, vh = torch.linalg.svd(delta.to(torch.float32), full_matrices=False)
    rank = min(max_rank, s.shape[0])
    if sv_epsilon > 0:
        rank = min(int((s > sv_epsilon).sum().item()), rank)
    if distribute_scale:
        root = s[:rank].sqrt()
        a = root[:, None] * vh[:rank]
        b = u[:, :rank] * root[None, :]
    else:
        a = s[:rank, None] * vh[:rank]
        b = u[:, :rank].clone()
    return a.to(delta.dtype).contiguous(), b.to(delta.dtype).contiguous()


def _meta_model(path: str, what: str):
    """The transformers model of ``path``'s config.json on the meta device (no checkpoint code runs)."""
    import transformers

    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{what} '{path}': no config.json; extract-lora needs a Hugging Face model folder.")
    try:
        cfg = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as e:  # unknown model_type, bad JSON
        raise CheckpointError(f"{what} '{path}': config.json cannot be read by transformers "
                              f"({str(e).splitlines()[0][:200]}); custom model code is never run.") from None
    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM
    with torch.device("meta"):
        return cls._from_config(cfg) if hasattr(cls, "_from_config") else cls.from_config(cfg)


def _resolve_ref(ref: str, what: str) -> str:
    if "+" in ref and not Path(ref).exists():
        raise ConfigError(f"{what} '{ref}': 'model+lora' references are not supported by extract-lora; "
                          "merge the adapter first (peft merge_and_unload) and pass that folder.")
    if not Path(ref).is_dir():
        raise CheckpointError(f"{what} '{ref}' is not a folder; give a local Hugging Face model folder.")
    return ref


def extract_lora(model: str, base_model: str, out_path: str, options: ExtractOptions | None = None, *,
                 overwrite: bool = False, overwrite_hint: str = "overwrite=True") -> dict:
    """Write a PEFT LoRA adapter of ``model`` - ``base_model`` to ``out_path``; returns a summary.

    Args:
        model: fine-tuned model folder.
        base_model: base model folder (the adapter's base).
        out_path: adapter folder to create (refused if it exists, unless ``overwrite`` and ours).
        options: :class:`ExtractOptions` (mergekit-extract-lora's options).
        overwrite: replace an existing output that fusion_bench wrote.
    """
    from safetensors.torch import save_file

    from fusion_bench.io.checkpoint import open_checkpoint
    from fusion_bench.io.outputs import check_output, output_dir

    o = options or ExtractOptions()
    if o.max_rank < 1:
        raise ConfigError(f"--max-rank {o.max_rank}: must be at least 1.")
    if not (o.sv_epsilon >= 0):
        raise ConfigError(f"--sv-epsilon {o.sv_epsilon}: must be >= 0.")
    for rx in (*o.exclude_regexes, *o.include_regexes):
        try:
            re.compile(rx)
        except re.error as e:
            raise ConfigError(f"regex '{rx}': {e}; fix the --include-regex / --exclude-regex value.") from None
    model = _resolve_ref(model, "--model")
    base_model = _resolve_ref(base_model, "--base-model")
    inputs = {"model": model, "base_model": base_model}
    check_output(out_path, overwrite=overwrite, inputs=inputs, what="LoRA adapter folder", kind="dir",
                 hint=overwrite_hint)

    ft_meta = _meta_model(model, "--model")
    base_meta = _meta_model(base_model, "--base-model")
    embed_in = ft_meta.get_input_embeddings()
    embed_out = ft_meta.get_output_embeddings()
    embed_lora = o.embed_lora
    ft_vocab = embed_in.weight.shape[0] if embed_in is not None else None
    base_vocab = base_meta.get_input_embeddings().weight.shape[0] if embed_in is not None else None
    notes: list[str] = []
    if embed_lora and ft_vocab != base_vocab:
        notes.append(f"vocabulary sizes differ (model {ft_vocab}, base {base_vocab}): embeddings saved whole "
                     "(--embed-lora ignored, as mergekit)")
        embed_lora = False
    tied = {id(embed_out)} if (embed_out is not None and embed_in is not None
                               and embed_out.weight is embed_in.weight) else set()

    ft = open_checkpoint(model, "model")
    base = open_checkpoint(base_model, "base_model")
    ft_keys, base_keys = set(ft.keys()), set(base.keys())
    save_names = list(o.modules_to_save)

    def excluded(name: str) -> bool:
        return any(re.search(r, name) for r in o.exclude_regexes)

    def should_extract(name: str) -> bool:
        if o.include_regexes and not any(re.search(r, name) for r in o.include_regexes):
            return False
        return not excluded(name)

    def in_save(name: str) -> bool:
        return name in save_names or name.split(".")[-1] in save_names

    def get(src, keys, key: str, what: str) -> torch.Tensor:
        if key not in keys:
            raise CheckpointError(f"{what}: tensor '{key}' is missing from the checkpoint; "
                                  "both models must be complete checkpoints of the same architecture.")
        return src.get(key)

    def transpose_kind(module) -> bool:
        return isinstance(module, torch.nn.Embedding)

    # linear modules that would be extracted: PEFT's lora_bias needs a bias in every one of them
    candidates = [m for n, m in ft_meta.named_modules() if isinstance(m, torch.nn.Linear) and should_extract(n)
                  and not in_save(n) and not (embed_lora is False and (m is embed_in or m is embed_out))]
    all_biased = bool(candidates) and all(m.bias is not None for m in candidates)
    biased_whole: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    full: list[str] = []
    embed_targets: set[str] = set()
    with_bias = False
    for name, module in ft_meta.named_modules():
        if "weight" not in module._parameters or module._parameters["weight"] is None:
            continue
        wkey, bkey = f"{name}.weight", f"{name}.bias"
        has_bias = module._parameters.get("bias") is not None
        if wkey not in ft_keys and id(module) in tied:
            continue  # tied output embedding: the input embedding carries it
        is_embed = module is embed_in or module is embed_out or isinstance(module, torch.nn.Embedding)
        if not embed_lora and is_embed and not excluded(name):
            key = name.split(".")[-1]
            if key not in save_names:
                save_names.append(key)
        if in_save(name):
            tensors[f"base_model.model.{wkey}"] = get(ft, ft_keys, wkey, f"model '{model}'")
            if has_bias and bkey in ft_keys:
                tensors[f"base_model.model.{bkey}"] = ft.get(bkey)
            full.append(name)
            continue
        if not should_extract(name):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            w_ft = get(ft, ft_keys, wkey, f"model '{model}'")
            w_base = get(base, base_keys, wkey, f"base model '{base_model}'")
            if w_ft.shape != w_base.shape:
                raise CheckpointError(f"module '{name}': weight shape {tuple(w_ft.shape)} in the model but "
                                      f"{tuple(w_base.shape)} in the base; save it whole with --save-module "
                                      f"{name.split('.')[-1]} or exclude it with -e.")
            bias_delta = None
            if has_bias and not transpose_kind(module):
                bias_delta = (get(ft, ft_keys, bkey, f"model '{model}'")
                              - get(base, base_keys, bkey, f"base model '{base_model}'"))
                if not bias_delta.any():
                    bias_delta = None
                elif not all_biased:
                    # PEFT's lora_bias is one switch for every target and cannot merge into a layer without a
                    # bias: a changed bias among unbiased targets is carried by saving the module whole
                    tensors[f"base_model.model.{wkey}"] = w_ft
                    tensors[f"base_model.model.{bkey}"] = ft.get(bkey)
                    full.append(name)
                    biased_whole.append(name)
                    continue
            delta = w_ft - w_base  # in the checkpoint dtype, as mergekit
            transpose = isinstance(module, torch.nn.Embedding)
            a, b = decompose(delta.T if transpose else delta, o.max_rank, o.sv_epsilon, o.distribute_scale)
            if a.shape[0] == 0:
                notes.append(f"{name}: no singular value above --sv-epsilon; no LoRA for it")
                continue
            ranks[name] = a.shape[0]
            if transpose:
                embed_targets.add(name)
                tensors[f"base_model.model.{name}.lora_embedding_A"] = a
                tensors[f"base_model.model.{name}.lora_embedding_B"] = b
            else:
                tensors[f"base_model.model.{name}.lora_A.weight"] = a
                tensors[f"base_model.model.{name}.lora_B.weight"] = b
                if bias_delta is not None:
                    tensors[f"base_model.model.{name}.lora_B.bias"] = bias_delta
                    with_bias = True
        elif isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
            raise ConfigError(f"module '{name}' is a {type(module).__name__}: LoRA extraction of convolutions is "
                              f"not supported; save it whole (--save-module {name.split('.')[-1]}) or exclude it (-e).")
        else:
            key = name.split(".")[-1]
            if o.skip_undecomposable:
                continue
            if key not in save_names:
                save_names.append(key)
            tensors[f"base_model.model.{wkey}"] = get(ft, ft_keys, wkey, f"model '{model}'")
            if has_bias and bkey in ft_keys:
                tensors[f"base_model.model.{bkey}"] = ft.get(bkey)
            full.append(name)
    for src in (ft, base):
        src.close()
    if biased_whole:
        notes.append(f"{len(biased_whole)} linear module(s) with a changed bias saved whole (PEFT's lora_bias "
                     f"applies to every target, and some targets have no bias): {', '.join(biased_whole[:4])}"
                     + (" ..." if len(biased_whole) > 4 else ""))
    if not ranks and not full:
        raise ConfigError(f"nothing to extract from '{model}': no module is selected (check --include-regex / "
                          "--exclude-regex) or every delta is below --sv-epsilon.")
    max_r = max(ranks.values()) if ranks else 1
    other = {k: v for k, v in ranks.items() if v != max_r}
    config = {
        "base_model_name_or_path": base_model,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": max_r,
        "lora_alpha": max_r,
        "rank_pattern": other,
        "alpha_pattern": dict(other),
        # full module names: PEFT matches names by suffix, so last-name keys such as "norm" would also
        # wrap every "...layernorm"; the full names select exactly the modules extracted here
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(full) or None,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "lora_bias": with_bias,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if not ranks:  # only whole modules: PEFT still needs a LoRA target; none is given a non-zero B
        raise ConfigError(f"no linear module is extracted from '{model}' (only whole modules); "
                          "loosen --include-regex / --exclude-regex.")
    with output_dir(out_path, overwrite=overwrite, inputs=inputs, what="LoRA adapter folder",
                    hint=overwrite_hint) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"),
                  metadata={"format": "pt", "fusion_bench_output": "LoRA adapter"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"output": str(out_path), "ranks": ranks, "modules_to_save": sorted(full), "r": max_r, "notes": notes}


def main(argv: Sequence[str] | None = None) -> int:
    """``fusion_bench extract-lora``: mergekit-extract-lora's options, fusion_bench's output guards."""
    ap = argparse.ArgumentParser(prog="fusion_bench extract-lora",
                                 description="Extract a LoRA adapter (PEFT folder) from a fine-tuned model minus "
                                 "its base by truncated SVD, as mergekit-extract-lora.")
    ap.add_argument("--model", required=True, help="fine-tuned model folder")
    ap.add_argument("--base-model", required=True, help="base model folder")
    ap.add_argument("--out-path", required=True, help="adapter folder to create")
    ap.add_argument("--max-rank", type=int, default=128, help="largest LoRA rank (default 128)")
    ap.add_argument("--sv-epsilon", type=float, default=0.0,
                    help="drop singular values at or below this (default 0: keep max-rank)")
    ap.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                    help="split the singular values as sqrt between A and B (default), else put them in A")
    ap.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                    help="LoRA for embeddings instead of saving them whole")
    ap.add_argument("--save-module", dest="modules_to_save", action="append", default=[],
                    help="save this module whole (repeatable)")
    ap.add_argument("-e", "--exclude-regex", dest="exclude_regexes", action="append", default=[],
                    help="do not extract modules whose name matches (repeatable)")
    ap.add_argument("-i", "--include-regex", dest="include_regexes", action="append", default=[],
                    help="extract only modules whose name matches (repeatable)")
    ap.add_argument("--skip-undecomposable", action="store_true",
                    help="skip non-linear modules (norms) instead of saving them whole")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an existing OUT that fusion_bench wrote (never anything else)")
    mk = ap.add_argument_group("mergekit execution options", "accepted, no effect here")
    for flag in ("--lazy-unpickle", "--low-cpu-memory", "--cuda", "--read-to-gpu", "--multi-gpu", "--async-write",
                 "--clone-tensors", "--write-model-card", "--quiet", "--safe-serialization"):
        mk.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    for flag in ("--device", "--num-threads", "--write-threads", "--transformers-cache", "--lora-merge-cache",
                 "--lora-merge-dtype", "-j"):
        mk.add_argument(flag, help=argparse.SUPPRESS)
    mk.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=None,
                    help=argparse.SUPPRESS)
    mk.add_argument("-v", action="count", default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.trust_remote_code:
        raise ConfigError("--trust-remote-code is not supported: fusion_bench never runs model code from a "
                          "checkpoint (docs/guarantees.md).")
    opts = ExtractOptions(max_rank=args.max_rank, sv_epsilon=args.sv_epsilon,
                          distribute_scale=args.distribute_scale, embed_lora=args.embed_lora,
                          modules_to_save=list(args.modules_to_save), exclude_regexes=list(args.exclude_regexes),
                          include_regexes=list(args.include_regexes), skip_undecomposable=args.skip_undecomposable)
    info = extract_lora(args.model, args.base_model, args.out_path, opts, overwrite=args.overwrite,
                        overwrite_hint="--overwrite")
    for n in info["notes"]:
        print(f"note: {n}")
    print(f"LoRA adapter (r = {info['r']}, {len(info['ranks'])} module(s), {len(info['modules_to_save'])} saved "
          f"whole) written to {info['output']}")
    return 0


__all__ = ["ExtractOptions", "decompose", "extract_lora", "main"]
