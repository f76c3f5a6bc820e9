"""FusionBench command lines: FusionBench's config names, option names and defaults, mapped to ours.

    fusion_bench method=dare/ties_merging method.threshold=20 \\
        modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 \\
        taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8

FusionBench (Tang et al. 2024, arXiv 2406.03280; github tanganke/fusion_bench, PyPI ``fusion-bench``
0.2.x, its ``config/`` tree) uses other config names (``CLIPVisionModelPool/...``,
``dare/ties_merging``, ``adamerging/clip`` + ``method.name=...``), other option names
(``threshold`` in percent, ``max_steps``, ``init_values``, ``merged_model_save_path``, ...) and other
defaults (TIES ``merge_func=sum``, MagMax lambda 0.5, RegMean 0.95, AdaMerging 1000 steps). The one
table :data:`TABLE` says, for each FusionBench name, what it becomes here, FusionBench's defaults
(written in our option names) and what is refused and why. :func:`translate` rewrites a command line
before the CLI validates it; docs/fusionbench.md renders the same table.

**When FusionBench's defaults apply.** A command line is read as FusionBench's when it names
anything only FusionBench has (a group value of the table such as ``dare/ties_merging`` or
``CLIPVisionModelPool/...``, a FusionBench-only option such as ``method.threshold`` or a top-level
key such as ``report_save_path``). Then a method name both tools share (``ties_merging``,
``task_arithmetic``, ``simple_average``) gets FusionBench's variant and defaults. A command line with
only our names is ours, unchanged. The report records both (``config.fusionbench``).

Nothing in the table is imported or called: it is data (names and values).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusion_bench.errors import ConfigError, did_you_mean

CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"


# ----------------------------------------------------------------------------------------------
# option converters: FusionBench value (a string from the command line) -> our value (a string)
# ----------------------------------------------------------------------------------------------
def _threshold(v: str) -> str:
    """FusionBench's TIES ``threshold``: a percent when > 1, else a fraction (``topk_values_mask``:
    ``if K > 1: K /= 100``); the share kept is then int(n * K) + 1 entries (see keep_rule)."""
    try:
        t = float(v)
    except ValueError:
        raise ConfigError(f"method.threshold={v}: FusionBench's threshold is a number (percent kept, e.g. 20).") from None
    if not math.isfinite(t) or t < 0:
        raise ConfigError(f"method.threshold={v} must be a finite number >= 0 (percent of entries kept, e.g. 20).")
    k = t / 100 if t > 1 else t
    if k >= 1:
        raise ConfigError(f"method.threshold={v} keeps int(n*{k:g})+1 > n entries, where FusionBench's "
                          "topk_values_mask fails (kthvalue(0)); use a threshold below 100 (or below 1 as a fraction).")
    return repr(k)


def _only(*allowed: str, why: str = "") -> Callable[[str], None]:
    """An option accepted only with FusionBench's default value(s) (it would change nothing here)."""
    def check(v: str, key: str = "") -> None:
        if v.strip().lower() not in allowed:
            raise ConfigError(f"{key}={v} is not supported by fusion_bench (only {' / '.join(allowed)})"
                              + (f": {why}" if why else "."))
    check.allowed = allowed  # type: ignore[attr-defined]
    check.why = why  # type: ignore[attr-defined]
    return check


IGNORED = "ignored"  # an operational option (workers, devices, cache folders): no effect on the result


@dataclass(frozen=True)
class Method:
    """One FusionBench method config and what it is here."""

    ours: str
    #: FusionBench's defaults, in our option names (applied unless the command line sets the option)
    defaults: dict[str, Any] = field(default_factory=dict)
    #: FusionBench option -> our option name (str), (our name, converter), a check (only its default
    #: value is accepted) or IGNORED
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


_TIES = {"trim_scope": "global", "keep_rule": "fusionbench", "zero_vote": "majority", "sign_election": "mass"}
_TIES_OPTIONS = {
    "scaling_factor": "scaling_factor",
    "threshold": ("density", _threshold),
    "merge_func": "merge_func",
    "remove_keys": _only("[]", why="FusionBench drops those tensors from the merged state dict and its strict load "
                         "then fails; use method.exclude=[...] (glob patterns) to keep them at the base's values."),
}
_DARE_OPTIONS = {
    "sparsity_ratio": "sparsity_ratio",
    "rescale": "rescale",
    "only_on_linear_weights": _only("false", why="DARE on nn.Linear weights only needs module types, which "
                                    "tensor-wise merging does not see; use method.exclude=[...] for the other tensors."),
}
_DATA_LOADER = {"dataloader_kwargs.batch_size": "batch_size", "dataloader_kwargs.num_workers": IGNORED,
                "dataloader_kwargs": IGNORED, "num_workers": IGNORED, "batch_size": "batch_size", "cache_dir": IGNORED}
_NO_REGEX = _only("[]", why="fusion_bench's method.exclude takes glob patterns of layer names; translate the "
                  "regular expressions to globs and use method.exclude=[...].")
_ADAMERGING_OPTIONS = {
    "name": None,  # the variant, see ADAMERGING_NAMES
    "init_values": "init_lambda", "max_steps": "steps", "lr": "lr", "batch_size": "batch_size",
    "clamp_weights": "clamp_lambdas",
    "optimizer": _only("adam", why="fusion_bench's AdaMerging uses Adam."),
    "weights": _only("null", "none", why="to evaluate given merging weights use method=task_arithmetic (task-wise "
                     "weights: one scaling factor) or adamerging with method.steps and method.init_lambda."),
    "tie_weights": IGNORED, "strict": IGNORED, "devices": IGNORED, "num_workers": IGNORED, "cache_dir": IGNORED,
    "save_merging_weights": IGNORED, "fast_dev_run": IGNORED, "skip_training": _only("false"),
}

def _single_alpha(v: str) -> str:
    """FusionBench TSV-M's ``alpha``: one number here (a list of per-task weights applied before the SVD is not)."""
    if v.strip().startswith("["):
        raise ConfigError(f"method.alpha={v}: per-task alpha lists of FusionBench's TSV-M are not supported by "
                          "fusion_bench; give one number (method.alpha=1.0).")
    return v


def _percent(v: str) -> str:
    """DOGE-TA's ``K``: the percent of entries kept (30 -> keep_ratio 0.3)."""
    try:
        k = float(v)
    except ValueError:
        raise ConfigError(f"method.K={v}: FusionBench's DOGE-TA K is a percent of entries kept (e.g. 30).") from None
    if not math.isfinite(k) or not 0 < k <= 100:
        raise ConfigError(f"method.K={v} must be a percent in (0, 100] (entries kept, e.g. 30).")
    return repr(k / 100)


def _keys(v: str) -> str:
    """FusionBench's ``exclude_keys`` (exact names, or null) -> our list of glob patterns."""
    return "[]" if v.strip().lower() in ("null", "none") else v


#: FusionBench's exclude_keys in TSV-M / Iso-C / Iso-CTS: those tensors are averaged (not SVD-merged)
_MEAN_KEYS = ("mean_keys", _keys)


def _svc(base: str, alpha: float, base_options: dict[str, Any] | None = None, **options: Any) -> Method:
    """FusionBench's singular_value_calibration/<base>: SVC after a base merge with its FusionBench options."""
    defaults: dict[str, Any] = {"alpha": alpha, "base_method": base}
    defaults.update({f"base_options.{k}": v for k, v in (base_options or {}).items()})
    return Method("svc", defaults, {"alpha": "alpha", "accelerator": IGNORED, "base_method._target_": IGNORED,
                                    **{f"base_method.{k}": f"base_options.{k}" for k in (base_options or {})},
                                    **options},
                  note=f"SVC (Li et al. 2026) after {base} with FusionBench's base options")


_SMILE_CLIP = Method(
    "smile_upscaling", {"gate_k": 1, "k": 128, "top_k": 1, "routing_use_diff": True, "average_experts": False},
    {"gate_k": "gate_k", "k": "k", "top_k": "top_k", "routing_use_diff": "routing_use_diff",
     "average_experts": "average_experts", "upscaling_accelerator": "device", "device": IGNORED,
     "full_matrices": IGNORED,
     "model_path": _only("null", "none", why="an upscaled CLIP vision model has no Hugging Face class to save as")},
    note="SMILE (Tang et al. 2024): experts stored dense when smaller than their factors (same output); "
         "docs/mixing_smile.md")


def _smile_lm(k: int) -> Method:
    """FusionBench's SMILE configs for causal LMs (Mistral / Qwen2 / auto)."""
    return Method(
        "smile_causal_lm_upscaling", {"gate_k": 8, "k": k, "top_k": 1},
        {"rank_of_router": "gate_k", "rank_of_expert": "k", "num_experts_per_tok": "top_k",
         "model_save_path": "output_path", "model_path": "output_path", "accelerator": "device", "device": IGNORED,
         "save_with_remote_code": IGNORED, "model_type": IGNORED,
         "model_dtype": _only("null", "none", why="set the dtype of the inputs with modelpool.dtype")},
        note="the model reloads with AutoModelForCausalLM after `import fusion_bench.models` (no remote code); "
             "docs/mixing_smile.md")


def _continual(ours: str, defaults: dict[str, Any], **options: Any) -> Method:
    """FusionBench's continual-merging configs: shuffle_order=true by default; its seed=null (a new random order
    every run) becomes our explicit method.seed (0 unless given)."""
    return Method(
        ours, {"shuffle_order": True, **defaults},
        {"shuffle_order": "shuffle_order", "seed": "seed", "save_on_every_step": IGNORED,
         "evaluate_on_every_step": IGNORED, "num_ray_actors": IGNORED, **options},
        note="the final merged model of one seeded order; for evaluation after every step over several orders "
             "add program=continual (docs/continual.md)")


_CONCRETE_FIXED = {"optimizer": _only("adam"), "merge_dtype": _only("null", "none"), "clamp_weights": _only("false"),
                   "mask_checkpoint": _only("null", "none"), "skip_training": _only("false"), "save_interval": IGNORED,
                   "tie_weights": IGNORED, "strict": IGNORED, "num_workers": IGNORED, "cache_dir": IGNORED}


def _concrete_ada(granularity: str) -> Method:
    """FusionBench's concrete AdaMerging configs (layer- or task-wise)."""
    fixed = {k: v for k, v in _CONCRETE_FIXED.items() if k not in ("clamp_weights", "skip_training")}
    return Method(
        "concrete_adamerging", {"granularity": granularity, "init_lambda": 0.3, "max_steps": 1000,
                                "max_adamerging_steps": 1000, "lr": 1e-3, "base_lr": 1.0, "adamerging_lr": 1e-3,
                                "temperature": 0.5, "initial_logits": 0.0, "batch_size": 16},
        {"scaling_factor": "init_lambda", "max_steps": "max_steps", "max_adamerging_steps": "max_adamerging_steps",
         "lr": "lr", "base_lr": "base_lr", "adamerging_lr": "adamerging_lr", "temperature": "temperature",
         "initial_logits": "initial_logits", "batch_size": "batch_size", "eval_mask_type": "eval_mask_type",
         "clamp_weights": "clamp_lambdas", "name": IGNORED, **fixed})


_CALIBRATION_DATA = ("FusionBench's calibration set options are not read here; give the calibration text as "
                     "method.calibration_data=<file, saved dataset or hub id> (docs/compression.md)")
_CALIBRATION_NOTE = ("the calibration text is method.calibration_data (default: the text that ships with fusion_bench, "
                     "not FusionBench's C4; give a C4 copy there for its data)")


def _pruning(ours: str, *, data: bool = False, note: str = "", **extra: Any) -> Method:
    """FusionBench's Llama pruning / SparseLo configs: per-row groups, unstructured unless method.nm is given."""
    defaults: dict[str, Any] = {"sparsity": 0.5, **extra}
    options: dict[str, Any] = {
        "sparsity_ratio": "sparsity", "device": IGNORED, "dtype": _only("null", "none", why="set modelpool.dtype"),
        "prune_type": _only("unstructured", why="for N:M sparsity give method.nm=2:4 (or 4:8)"),
        "n": IGNORED, "m": IGNORED, "model_save_path": IGNORED}
    if ours in ("magnitude_pruning", "random_pruning"):
        defaults["group"] = "row"
    if data:
        defaults.update({"n_samples": 128, "seed": 0})
        options.update({"nsamples": "n_samples", "seed": "seed",
                        "use_variant": _only("false", why="Wanda's alpha-search variant is not implemented")})
        note = (note + "; " if note else "") + _CALIBRATION_NOTE
    if ours == "sparselo":
        options.update({"rank": "rank", "variant": "variant", "num_iterations": "num_iterations",
                        "use_reference_model": _only("false")})
    return Method(ours, defaults, options, note=note)


_WEMOE_OPTIONS = {
    "name": IGNORED,  # clip_weight_ensembling_moe / sparse_clip_weight_ensembling_moe / clip_rankone_moe
    "init_lambda": "init_lambda", "router_hidden_layers": "router_hidden_layers", "batch_reduce": "batch_reduce",
    "lr": "lr", "max_steps": "steps", "batch_size": "batch_size",
    "optimizer": _only("adam", why="fusion_bench's WEMoE uses Adam."),
    "checkpoint": _only("false", why="loading trained routers is not supported; the routers are trained."),
    "save_checkpoint": _only("false", why="saving the routers is not supported."),
    "use_grad_accumulate": IGNORED,  # per-task backward or summed loss: the same gradient
    "devices": IGNORED, "num_workers": IGNORED, "cache_dir": IGNORED, "fast_dev_run": IGNORED,
}
_WEMOE_DEFAULTS = {"init_lambda": 0.3, "batch_reduce": True, "lr": 1e-4, "steps": 1000, "batch_size": 16,
                   "split": "test", "eval_routing": "per_batch"}


_DOP_OPTIONS = {k: k for k in ("lr", "num_steps", "mgda", "alpha", "ema", "ema_beta", "svd_epsilon", "svd_proj_space")}
_BITDELTA_DATA = ("FusionBench's calibration dataset options are not read here; give the calibration text as "
                  "method.calibration_data=<file, saved dataset or hub id> (docs/llm_evaluation.md)")


#: the one table: FusionBench config group names -> ours (see the module docstring)
TABLE: dict[str, Any] = {
    "method": {
        "dummy": Method("dummy"),
        "simple_average": Method("simple_average", note="mean of the fine-tuned models (not _pretrained_)"),
        "task_arithmetic": Method("task_arithmetic", {"scaling_factor": 0.3}, {"scaling_factor": "scaling_factor"}),
        "ties_merging": Method(
            "ties_merging", {"scaling_factor": 0.3, "density": 0.2, "merge_func": "sum", **_TIES}, _TIES_OPTIONS,
            note="FusionBench's TIES: threshold % kept over the whole model (int(n*K)+1 entries), a zero sign vote "
                 "takes the model's majority sign, merge_func=sum"),
        "dare/simple_average": Method("dare_simple_average", {"sparsity_ratio": 0.5, "rescale": True}, _DARE_OPTIONS),
        "dare/task_arithmetic": Method("dare_task_arithmetic", {"scaling_factor": 0.3, "sparsity_ratio": 0.5,
                                                                "rescale": True},
                                       {**_DARE_OPTIONS, "scaling_factor": "scaling_factor"}),
        "dare/ties_merging": Method(
            "dare_ties_merging", {"sparsity_ratio": 0.5, "rescale": True, "scaling_factor": 0.5, "density": 0.2,
                                  "merge_func": "sum", **_TIES},
            {**_DARE_OPTIONS, **_TIES_OPTIONS},
            note="DARE, then FusionBench's TIES (with its magnitude trim), unlike mergekit's dare_ties"),
        "adamerging/clip": Method(
            "adamerging", {"lr": 1e-3, "init_lambda": 0.3, "steps": 1000, "batch_size": 16, "clamp_lambdas": False,
                           "split": "test"}, _ADAMERGING_OPTIONS,
            note="method.name=clip_layer_wise_adamerging (default) or clip_task_wise_adamerging"),
        "fisher_merging/clip_fisher_merging": Method(
            "fisher_merging", {"num_fisher_examples": 256, "normalize_fisher_weight": True,
                               "minimal_fisher_weight": 1e-6, "batch_size": 32},
            {"num_fisher_examples": "num_fisher_examples", "normalize_fisher_weight": "normalize_fisher_weight",
             "minimal_fisher_weight": "minimal_fisher_weight", "exclude_param_names_regex": _NO_REGEX,
             **_DATA_LOADER}),
        "fisher_merging/gpt2_fisher_merging": Method(
            "fisher_merging", {"num_fisher_examples": 256, "normalize_fisher_weight": True,
                               "minimal_fisher_weight": 1e-6, "batch_size": 32},
            {"num_fisher_examples": "num_fisher_examples", "normalize_fisher_weight": "normalize_fisher_weight",
             "minimal_fisher_weight": "minimal_fisher_weight", "exclude_param_names_regex": _NO_REGEX,
             **_DATA_LOADER}),
        "regmean/clip_regmean": Method(
            "regmean", {"num_regmean_examples": 256, "reduce_non_diagonal_ratio": 0.95, "batch_size": 32},
            {"num_regmean_examples": "num_regmean_examples", "reduce_non_diagonal_ratio": "reduce_non_diagonal_ratio",
             "exclude_param_names_regex": _NO_REGEX, "weight_transpose": _only("true"), **_DATA_LOADER}),
        "regmean/gpt2_regmean": Method(
            "regmean", {"num_regmean_examples": 256, "reduce_non_diagonal_ratio": 0.6, "batch_size": 32},
            {"num_regmean_examples": "num_regmean_examples", "reduce_non_diagonal_ratio": "reduce_non_diagonal_ratio",
             "exclude_param_names_regex": _NO_REGEX, "weight_transpose": _only("false"), **_DATA_LOADER}),
        "magmax/magmax": Method("magmax", {"scaling_factor": 0.5},
                                {"scaling_factor": "scaling_factor", "inplace": IGNORED}),
        "slerp/slerp": Method("slerp", {"t": 0.5}, {"t": "t", "DOT_THRESHOLD": _only("0.9995"),
                                                    "epsilon": _only("1e-8", "1e-08")}),
        "linear/linear_interpolation": Method("linear_interpolation", {"t": 0.5}, {"t": "t"}),
        "linear/weighted_average": Method("weighted_average", {"normalize": True, "weights": [0.5, 0.5]},
                                          {"normalize": "normalize", "weights": "weights"}),
        "weighted_average": Method("weighted_average", {"normalize": True}, {"normalize": "normalize",
                                                                              "weights": "weights"}),
        "ensemble/simple_ensemble": Method("simple_ensemble", options={"device_map": _only("null", "none")}),
        "simple_ensemble": Method("simple_ensemble", options={"device_map": _only("null", "none")}),
        "ensemble/weighted_ensemble": Method("weighted_ensemble", {"normalize": True},
                                             {"normalize": "normalize", "weights": "weights"}),
        "weighted_ensemble": Method("weighted_ensemble", {"normalize": True},
                                    {"normalize": "normalize", "weights": "weights"}),
        "ensemble/max_model_predictor": Method("max_model_predictor"),
        # subspace / mask family (issue 13)
        "task_singular_vector/TaskSingularVectorMerging": Method(
            "tsv_merging", {"scaling_factor": 1.0},
            {"alpha": ("scaling_factor", _single_alpha), "exclude_keys": _MEAN_KEYS,
             "return_single_task_models": _only("false", why="per-task TSV models: use method=tsv_compress "
                                                "(TSV-C, one low-rank model per task).")}),
        "isotropic_merging/iso_c": Method("iso_c", {"scaling_factor": 1.0},
                                          {"scaling_factor": "scaling_factor", "exclude_keys": _MEAN_KEYS}),
        "isotropic_merging/iso_cts": Method(
            "iso_cts", {"scaling_factor": 1.0, "common_space_fraction": 0.8},
            {"scaling_factor": "scaling_factor", "common_space_fraction": "common_space_fraction",
             "exclude_keys": _MEAN_KEYS}),
        "wudi/wudi": Method("wudi_merging", {"iterations": 400},
                            {"iter_num": "iterations", "exclude_keys": ("average_only", _keys)}),
        "doge_ta/doge_ta": Method("doge_ta", {"subspace": 6, "keep_ratio": 0.3, "lamda": 0.07},
                                  {"subspace": "subspace", "K": ("keep_ratio", _percent), "lamda": "lamda"}),
        "emr_merging/emr_merging": Method("emr_merging", note="one model per task (elect, mask, rescale)"),
        "tall_mask/task_arithmetic": Method(
            "tall_mask_task_arithmetic", {"tall_mask_lambda": 0.6},
            {"tall_mask_lambda": "tall_mask_lambda", "debug": IGNORED, "verbose": IGNORED},
            note="one model per task: theta_0 + TALL mask of the task * task-arithmetic vector"),
        "linear/expo": Method("expo", {"alpha": 0.1}, {"extrapolation_factor": "alpha"},
                              note="one aligned model beside _pretrained_ (FusionBench first averages several; "
                                   "such pools are refused here)"),
        "singular_value_calibration/task_arithmetic": _svc(
            "task_arithmetic", 0.1, {"scaling_factor": 0.3}, scaling_factor="base_options.scaling_factor"),
        "singular_value_calibration/simple_average": _svc("simple_average", 0.1),
        "singular_value_calibration/ties_merging": _svc(
            "ties_merging", 0.1, {"scaling_factor": 0.3, "density": 0.2, "merge_func": "sum", **_TIES},
            **{"base_method.threshold": ("base_options.density", _threshold)}),
        "singular_value_calibration/dare_task_arithmetic": _svc(
            "dare_task_arithmetic", 0.1, {"scaling_factor": 0.3, "sparsity_ratio": 0.5, "rescale": True}),
        "singular_value_calibration/iso_c": _svc("iso_c", 0.1, {"scaling_factor": 1.5}),
        "singular_value_calibration/iso_cts": _svc("iso_cts", 0.2, {"scaling_factor": 1.5,
                                                                    "common_space_fraction": 0.8}),
        "singular_value_calibration/task_singular_vector": _svc(
            "tsv_merging", 1.0, {"scaling_factor": 1.0}, **{"base_method.alpha": ("base_options.scaling_factor",
                                                                                    _single_alpha)}),
        "singular_value_calibration/wudi": _svc("wudi_merging", 1.0, {"iterations": 400},
                                                **{"base_method.iter_num": "base_options.iterations"}),
        "max_model_predictor": Method("max_model_predictor"),
        # mixing / upscaling (issue 14)
        "smile_upscaling": _SMILE_CLIP,
        "smile_upscaling/smile_upscaling": _SMILE_CLIP,
        "smile_upscaling/smile_mistral_upscaling": _smile_lm(512),
        "smile_upscaling/smile_qwen2_upscaling": _smile_lm(64),
        "smile_upscaling/causal_lm_upscaling": _smile_lm(64),
        "wemoe/weight_ensembling_moe": Method(
            "we_moe", {**_WEMOE_DEFAULTS, "router_hidden_layers": 2}, _WEMOE_OPTIONS,
            note="merge_lambda = init_lambda; eval_routing=per_batch reproduces FusionBench's evaluation (its MoE "
                 "layers keep averaging the routing over each batch)"),
        "wemoe/sparse_weight_ensembling_moe": Method(
            "sparse_we_moe", {**_WEMOE_DEFAULTS, "router_hidden_layers": 2, "tv_prune_ratio": 0.9,
                              "shared_gate": True, "position_encoding": False, "position_encoding_dim": 8,
                              "post_sparse_gate": False, "gate_prune_ratio": 0.0},
            {**_WEMOE_OPTIONS, **{k: k for k in ("tv_prune_ratio", "shared_gate", "position_encoding",
                                                 "position_encoding_dim", "post_sparse_gate", "gate_prune_ratio")}},
            note="the kept count is exact (round((1-ratio) n)); FusionBench keeps |tau| > quantile(ratio), which "
                 "differs only where magnitudes tie"),
        "rankone_moe/rankone_moe": Method(
            "rankone_moe", {**_WEMOE_DEFAULTS, "router_hidden_layers": 1, "rank_k": 32, "select_k": -1},
            {**_WEMOE_OPTIONS, "rank_k": "rank_k", "select_k": "select_k", "svd_accelerator": IGNORED}),
        "mixtral_moe_upscaling": Method(
            "mixtral_upscaling", {"num_experts": 4, "experts_per_token": 2},
            {"num_experts": "num_experts", "experts_per_token": "experts_per_token",
             "save_checkpoint": _only("null", "none", why="use merged_model_path=<folder>")},
            note="attention copied and routers drawn by method.gate_mode (FusionBench 0.2.33 leaves both "
                 "uninitialised); docs/mixing_llm.md"),
        "mixtral_moe_merging": Method(
            "mixtral_merging", {"experts_per_token": 2},
            {"experts_per_token": "experts_per_token", "num_experts": IGNORED,
             "save_checkpoint": _only("null", "none", why="use merged_model_path=<folder>")},
            note="experts = the pool's models except _pretrained_ (in order), other tensors from _pretrained_, "
                 "routers by method.gate_mode; docs/mixing_llm.md"),
        "depth_upscaling": Method(
            "depth_upscaling", {}, {"layer_indices": "layer_indices",
                                    "model_save_path": _only("null", "none", why="use merged_model_path=<folder>")},
            note="'range(a, b)' strings are parsed, never evaluated"),
        "model_recombination": Method(
            "model_recombination", {}, {"return_modelpool": _only(
                "null", "none", "false", why="results are one model here; run method.model_index=0..N-1 for the "
                "other recombined models")},
            note="per-unit permutations seeded from method.seed (FusionBench shuffles with the global random state)"),
        # continual merging (issue 15): one final model here; program=continual evaluates after every step
        "opcm/opcm": _continual("opcm", {"alpha": 0.5}, alpha="alpha"),
        "opcm/opcm_general": _continual("opcm", {"alpha": 0.5}, alpha="alpha"),
        "dop/dop": _continual("dop", {}, **_DOP_OPTIONS),
        "dop/dop_general": _continual("dop", {}, **_DOP_OPTIONS),
        "opcm/task_arithmetic": _continual("continual_task_arithmetic", {"scaling_factor": 0.3},
                                           scaling_factor="scaling_factor"),
        "opcm/ties_merging": _continual("continual_ties_merging",
                                        {"scaling_factor": 0.5, "threshold": 20.0, "merge_func": "sum"},
                                        scaling_factor="scaling_factor", threshold="threshold",
                                        merge_func="merge_func", remove_keys="remove_keys"),
        "opcm/weight_average": _continual("continual_weight_average", {}),
        # data-using methods (issue 15)
        "regmean_plusplus/clip_regmean_plusplus": Method(
            "regmean_plusplus", {"num_regmean_examples": 256, "reduce_non_diagonal_ratio": 0.95, "batch_size": 32,
                                 "keep_pretrained": ["*post_layernorm.*"]},
            {"num_regmean_examples": "num_regmean_examples", "reduce_non_diagonal_ratio": "reduce_non_diagonal_ratio",
             "exclude_param_names_regex": _NO_REGEX, "weight_transpose": _only("true"), **_DATA_LOADER},
            note="embeddings averaged and the final layer norm kept pretrained, as FusionBench"),
        "fw_merging/fw_hard": Method(
            "frank_wolfe_hard", {"max_iters": 10, "step_size": 0.1, "dataset_size": 100, "scaling_factor": 0.3,
                                 "loss_fn": "cross_entropy", "granularity": "task"},
            {"max_iters": "max_iters", "step_size": "step_size", "dataset_size": "dataset_size",
             "scaling_factor": "scaling_factor", "granularity": "granularity", "loss_fn": "loss_fn",
             "merge_fn": _only("task_arithmetic", why="fw_hard with merge_fn=ties is not implemented here"),
             "init_weight": _only("", "null", "none", why="give method.init=base or task_arithmetic; initial "
                                  "weight files are not read"),
             "tasks": _only("[]", "null", "none"), "max_num_models": IGNORED, "threshold": IGNORED}),
        "fw_merging/fw_soft": Method(
            "frank_wolfe_soft", {"max_iters": 10, "dataset_size": 100, "ada_iters": 500, "ada_coeff": 1e-8,
                                 "granularity": "task"},
            {"max_iters": "max_iters", "dataset_size": "dataset_size", "ada_iters": "ada_iters",
             "ada_coeff": "ada_coeff", "granularity": "granularity", "step_size": IGNORED,
             "merge_fn": _only("adamerging"), "ada_loss": _only("entropy_loss"),
             "init_weight": _only("", "null", "none"), "tasks": _only("[]", "null", "none"),
             "max_num_models": IGNORED}),
        "concrete_subspace/clip_concrete_task_arithmetic": Method(
            "concrete_task_arithmetic", {"scaling_factor": 0.3, "max_steps": 2000, "lr": 1e-3, "temperature": 0.5,
                                         "initial_logits": 0.0, "batch_size": 16, "eval_mask_type": "continuous"},
            {"scaling_factor": "scaling_factor", "max_steps": "max_steps", "lr": "lr", "temperature": "temperature",
             "initial_logits": "initial_logits", "batch_size": "batch_size", "eval_mask_type": "eval_mask_type",
             **_CONCRETE_FIXED}),
        "concrete_subspace/clip_concrete_layer_wise_adamerging": _concrete_ada("layer_wise"),
        "concrete_subspace/clip_concrete_task_wise_adamerging": _concrete_ada("task_wise"),
        "surgery/adamerging_surgery": Method(
            "representation_surgery", {"base_method": "adamerging", "surgery_steps": 1000, "batch_size": 16,
                                       **{f"base_options.{k}": v for k, v in (("steps", 1000), ("lr", 1e-3),
                                                                                ("init_lambda", 0.3), ("batch_size", 16),
                                                                                ("clamp_lambdas", False))}},
            {"surgery_steps": "surgery_steps", "batch_size": "batch_size", "eval_iterations": IGNORED,
             "weights": _only("null", "none"), "optimizer": _only("adam"), "name": IGNORED,
             "init_values": _only("0.3"), "lr": _only("1e-3", "0.001"), "max_steps": _only("1000"),
             "clamp_weights": _only("false"), "tie_weights": IGNORED, "strict": IGNORED, "devices": IGNORED,
             "num_workers": IGNORED, "cache_dir": IGNORED, "save_merging_weights": IGNORED, "fast_dev_run": IGNORED},
            note="one model per task (task id needed); FusionBench returns the AdaMerging model and the surgery "
                 "wrapper"),
        # compression (issue 16)
        "pruning/llama_magnitude_pruning": _pruning("magnitude_pruning"),
        "pruning/llama_random_pruning": _pruning("random_pruning", note="a random mask from our seeded generator: equal "
                                                 "to FusionBench's in distribution, not element by element"),
        "pruning/llama_wanda_pruning": _pruning("wanda_pruning", data=True),
        "pruning/llama_sparsegpt_pruning": _pruning("sparsegpt_pruning", data=True),
        "sparselo_pruning/llama_sparselo": _pruning("sparselo", data=True, algorithm="one_shot"),
        "sparselo_pruning/llama_iterative_sparselo": _pruning("sparselo", data=True, algorithm="iterative"),
        "expert_sparsity/mixtral": Method(
            "expert_pruning", {"num_preserved_experts": 4, "seq_len": 2048, "n_samples": 128, "batch_size": 8,
                               "seed": 42, "mode": "layerwise"},
            {"num_preserved_experts": "num_preserved_experts", "max_block_size": "seq_len",
             "n_blocks_for_stat": "n_samples", "batch_size": "batch_size", "seed": "seed", "num_workers": IGNORED,
             "calib_set": _only("c4", why=_CALIBRATION_DATA), "model_save_path": IGNORED},
            note="layer-wise expert pruning (Lu et al. 2024); " + _CALIBRATION_NOTE),
        "bitdelta/bitdelta": Method(
            "bitdelta", {"num_steps": 100, "lr": 1e-4, "batch_size": 4, "seq_len": 128},
            {"lr": "lr", "batch_size": "batch_size", "num_steps": "num_steps", "max_length": "seq_len",
             "save_dir": "save_delta", "save_full_model": IGNORED,
             "dataset_name": _only("c4", why=_BITDELTA_DATA), "subset": _only("en", why=_BITDELTA_DATA),
             "split": _only("train", why=_BITDELTA_DATA)},
            note="BitDelta with FusionBench's 100 distillation steps of 4 x 128 tokens; the calibration text is "
                 "method.calibration_data (default: the text that ships with fusion_bench, not C4 as FusionBench; "
                 "give a C4 copy there for its data)"),
    },
    # FusionBench's adamerging/clip variants (method.name=...) -> our granularity
    "adamerging_names": {"clip_layer_wise_adamerging": "layer_wise", "clip_task_wise_adamerging": "task_wise"},
    "modelpool": {
        **{f"CLIPVisionModelPool/clip-vit-{m}_{s}{x}": f"clip-vit-{m}_{s}"
           for m in ("base-patch32", "base-patch16", "large-patch14") for s in ("TA8", "TALL14", "TALL20", "individual")
           for x in ("", "_model_only")},
        # LoRA-16 adapters merged into full weights on load (FusionBench: merge_and_unload: true)
        "CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora": "clip-vit-base-patch16_TA8_lora",
        # FusionBench's small ViT-B/32 pools (two or three tasks)
        **{f"CLIPVisionModelPool/clip-vit-base-patch32_{s}": f"clip-vit-base-patch32_{s}"
           for s in ("svhn_and_mnist", "sun397_and_cars", "sun397_and_dtd", "cars_and_dtd", "sun397_cars_and_dtd")},
        **{f"Seq2SeqLMPool/{n}": n for n in ("flan-t5-base_glue", "flan-t5-base_glue_lora16", "flan-t5-large_glue_lora16")},
        "gpt-2_glue": "gpt2_glue",
    },
    "taskpool": {
        # CLIP task pools are per backbone here: FusionBench's clip_model (or base_model) picks one
        **{f"CLIPVisionModelTaskPool/clip-vit-classification_{s}": f"clip-vit-{{model}}_{s}"
           for s in ("TA8", "TALL14", "TALL20")},
        "CLIPVisionModelTaskPool/clip-vit-classification_TA8_B16": "clip-vit-base-patch16_TA8",
        "CLIPVisionModelTaskPool/clip-vit-base-patch32_svhn_and_mnist": "clip-vit-base-patch32_svhn_and_mnist",
        "CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14": "clip-vit-large-patch14_TA8",
        "clip-vit-classification_TA8": "clip-vit-{model}_TA8",
        "flan-t5_glue_text_generation": "flan-t5_glue_text_generation",
        "gpt-2_glue": "gpt2_glue",
        "dummy": "dummy",
        "LMEvalHarnessTaskPool/lm_eval": "lm_eval_fusionbench",
    },
    # FusionBench top-level keys -> ours (None: accepted, no effect here; a check: only that value)
    "top": {
        "merged_model_save_path": "merged_model_path",
        "report_save_path": "report_path",
        "path.log_dir": "hydra.run.dir",
        "fast_dev_run": _only("false", why="for a quick check use taskpool.max_samples=N (and method.steps=N for "
                              "AdaMerging): FusionBench's single-batch runs have no equal here."),
        "merged_model_save_kwargs": _only("null", "none"),
        "print_config": None, "print_function_call": None,
        "seed": "seed",
    },
    "top_prefix_ignored": ("fabric.",),  # Lightning Fabric settings: devices come from device=... here
    # FusionBench names we do not support, and what to use instead
    "unsupported": {
        "pruning/magnitude_diff_pruning": (
            "method=magnitude_diff_pruning method.model=<name> (FusionBench 0.2.33 with its default rescale: false "
            "multiplies the kept differences by False, i.e. 0, and returns the pretrained weights; fusion_bench does "
            "not reproduce that; method.rescale=true rescales by 1/prune_ratio)"),
        **{f"smile_upscaling/{n}": "method=smile_upscaling or smile_causal_lm_upscaling (FusionBench's SMILE analysis "
                                   "tools have no equal here)"
           for n in ("singular_projection_merging", "error_accumulation", "projected_energy")},
        "trust_region/clip_task_arithmetic": (
            "method=trust_region_task_arithmetic (FusionBench 0.2.33 with its default zero_shot: false stores every "
            "task's gradients under one key, its conflict score is 0 and it returns the pretrained model; ours computes "
            "the paper's score, and method.zero_shot=true is FusionBench's zero-shot variant)"),
        "dawe/dawe_for_clip": (
            "method=dawe (its gate reads the pool's frozen pretrained CLIP features, not FusionBench's hub ResNet-18, "
            "so the result differs from FusionBench's)"),
        "sparselo_pruning/llama_pcp_sparselo": "method=sparselo (algorithm=one_shot or iterative; the PCP variant is "
                                               "not implemented)",
        "wemoe/flan_t5_weight_ensembling_moe": "method=we_moe on CLIP pools (the Flan-T5 variant is not implemented)",
        "linear/simple_average_for_causallm": "method=simple_average with a causal-LM modelpool",
        "linear/task_arithmetic_for_causallm": "method=task_arithmetic with a causal-LM modelpool",
        "linear/ties_merging_for_causallm": "method=ties_merging with a causal-LM modelpool",
        "adamerging/layer_wise_gpt2": "method=adamerging (layer_wise) with adapter=generic",
        "adamerging/layer_wise_flan_t5": "method=adamerging (layer_wise) with adapter=generic",
        "model_stock/model_stock": "method=model_stock (our variant; FusionBench's ignore_keys / model_save_path "
                                   "have no equal, see docs/fusionbench.md)",
        "CLIPVisionModelPool/clip-vit-base-patch32_mtl": "a modelpool YAML of your own in --config-dir",
        "CLIPVisionModelPool/clip-vit-base-patch16_individual_lora": (
            "method=task_arithmetic method.scaling_factor=1.0 modelpool=clip-vit-base-patch16_TA8_lora "
            "+modelpool.select=[sun397] taskpool=clip-vit-base-patch16_TA8 (one LoRA-16 model: its adapter merged "
            "into the pretrained encoder)"),
    },
}

#: FusionBench options that name the variant of a shared method (their presence marks a FusionBench command line)
FUSIONBENCH_ONLY_OPTIONS = ("threshold", "remove_keys", "init_values", "max_steps", "clamp_weights",
                            "only_on_linear_weights", "exclude_param_names_regex", "dataloader_kwargs",
                            "weight_transpose", "save_merging_weights", "DOT_THRESHOLD", "inplace")
CLIP_MODELS = {"openai/clip-vit-base-patch32": "base-patch32", "openai/clip-vit-base-patch16": "base-patch16",
               "openai/clip-vit-large-patch14": "large-patch14"}


def _close(name: str, names) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(close)}?" if close else ""


def _exists(group: str, name: str) -> bool:
    return (CONFIG_DIR / group / f"{name}.yaml").is_file() or (group == "method" and _is_method(name))


def _is_method(name: str) -> bool:
    from fusion_bench.methods import list_methods

    return name in list_methods()


def _split(arg: str) -> tuple[str, str, str] | None:
    """'+key=value' -> ('+', 'key', 'value'); None for flags and arguments without '='."""
    if arg.startswith("-") or "=" not in arg:
        return None
    k, v = arg.split("=", 1)
    prefix = ""
    while k[:1] in "+~":
        prefix, k = prefix + k[0], k[1:]
    return prefix, k, v


def _quote(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _convert(values: str, fn: Callable[[str], str]) -> str:
    """Apply a value converter to a plain value or to each value of a simple comma sweep."""
    if values.startswith(("[", "{", "range(", "choice(", "interval(")):
        return fn(values)
    return ",".join(fn(v) for v in values.split(","))


def is_fusionbench(argv: list[str]) -> bool:
    """True when the command line names something only FusionBench has (see the module docstring)."""
    for a in argv:
        s = _split(a)
        if s is None:
            continue
        _, k, v = s
        if k in ("method", "modelpool", "taskpool"):
            if (v in TABLE[k] or v in TABLE["unsupported"] or "/" in v) and not _exists(k, v):
                return True
        elif k in TABLE["top"] and k != "seed" or k.startswith(TABLE["top_prefix_ignored"]):
            return True
        elif k.startswith("method.") and k.split(".")[1] in FUSIONBENCH_ONLY_OPTIONS:
            return True
        elif k == "method.name" and v in TABLE["adamerging_names"]:
            return True
    return False


def translate(argv: list[str]) -> tuple[list[str], dict[str, Any] | None]:
    """Rewrite a FusionBench command line into ours; (argv, None) when it has only our names.

    Returns the new argument list (flags kept in place) and a record of the translation (the
    original arguments, the translated ones, the defaults applied, the options ignored) that the
    report keeps under ``config.fusionbench``. Raises :class:`ConfigError` (one line) for a
    FusionBench name or value that is not supported, saying what to use instead.
    """
    if not is_fusionbench(argv):
        return argv, None
    groups: dict[str, str] = {}
    for a in argv:
        s = _split(a)
        if s is not None and s[1] in ("method", "modelpool", "taskpool"):
            groups[s[1]] = s[2]
    fb_method = groups.get("method")
    if fb_method is None:
        raise ConfigError("A FusionBench command line needs method=<name> (FusionBench's default is method=dummy); "
                          "add e.g. method=dummy or method=task_arithmetic.")
    spec = _method_spec(fb_method)
    set_options: set[str] = set()
    out: list[str] = []
    ignored: list[str] = []
    model = "base-patch32"
    for a in argv:  # the CLIP backbone a FusionBench task pool evaluates with
        s = _split(a)
        if s and s[1] in ("taskpool.clip_model", "taskpool.base_model"):
            if s[2] not in CLIP_MODELS:
                raise ConfigError(f"{s[1]}={s[2]}: the CLIP task pools here use {', '.join(CLIP_MODELS)}.")
            model = CLIP_MODELS[s[2]]
    for a in argv:
        s = _split(a)
        if s is None:
            out.append(a)
            continue
        prefix, k, v = s
        if k in ("method", "modelpool", "taskpool"):
            out.append(f"{prefix}{k}={_group_value(k, v, spec, model)}")
        elif k in ("taskpool.clip_model", "taskpool.base_model"):
            ignored.append(a)  # it chose the task pool above
        elif k.startswith("method."):
            opt = k[len("method."):]
            if opt == "name":
                if fb_method != "adamerging/clip":
                    raise ConfigError(f"method.name={v}: FusionBench's method.name selects the variant of "
                                      "method=adamerging/clip only; choose a method with method=<name>.")
                gran = TABLE["adamerging_names"].get(v)
                if gran is None:
                    raise ConfigError(f"method.name={v} is not supported by fusion_bench (FusionBench's adamerging/clip "
                                      f"variants here: {', '.join(TABLE['adamerging_names'])}).")
                out.append(f"method.granularity={gran}")
                set_options.add("granularity")
                continue
            ours = _option(spec, opt, v, fb_method)
            if ours is None:
                ignored.append(a)
                continue
            name, value = ours
            set_options.add(name if name.startswith("base_options.") else name.split(".")[0])
            out.append(f"{prefix}method.{name}={value}")
        elif k in TABLE["top"]:
            target = TABLE["top"][k]
            if target is None:
                ignored.append(a)
            elif callable(target):
                target(v, k)
                ignored.append(a)
            else:
                out.append(f"{prefix}{target}={v}" if not (k == "seed" and v.lower() in ("null", "none")) else "seed=0")
        elif k.startswith(TABLE["top_prefix_ignored"]):
            ignored.append(a)
        else:
            out.append(a)
    # a default is dropped when the command line set it, or set the mapping it belongs to (base_options)
    defaults = {k: v for k, v in spec.defaults.items()
                if k not in set_options and k.split(".")[0] not in set_options} if spec else {}
    for k, v in defaults.items():
        out.append(f"method.{k}={_hydra_value(v)}")
    record = {"original": list(argv), "translated": [a for a in out if "=" in a and not a.startswith("-")],
              "defaults_applied": {k: v for k, v in defaults.items()}, "ignored": ignored}
    out.append("fusionbench={" + ",".join(f"{k}:[{','.join(_quote(str(x)) for x in record[k])}]"
                                          for k in ("original", "translated", "ignored")) + "}")
    return out, record


def _hydra_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_quote(x) if isinstance(x, str) else _hydra_value(x) for x in v) + "]"
    return str(v)


def _method_spec(name: str) -> Method | None:
    if name in TABLE["unsupported"]:
        raise ConfigError(f"FusionBench's method={name} is not supported by fusion_bench; use "
                          f"{TABLE['unsupported'][name]}.")
    spec = TABLE["method"].get(name)
    if spec is None and "/" in name:
        raise ConfigError(f"FusionBench's method={name} is not supported by fusion_bench.{_close(name, TABLE['method'])} "
                          "See docs/fusionbench.md for the names accepted and `fusion_bench methods` for ours.")
    return spec


def _group_value(group: str, v: str, spec: Method | None, model: str) -> str:
    if group == "method":
        return spec.ours if spec is not None else v
    if v in TABLE["unsupported"]:
        raise ConfigError(f"FusionBench's {group}={v} is not supported by fusion_bench; use {TABLE['unsupported'][v]}.")
    ours = TABLE[group].get(v)
    if ours is None:
        if "/" not in v:
            return v  # a name of ours or of --config-dir; the CLI checks it
        raise ConfigError(f"FusionBench's {group}={v} is not shipped with fusion_bench.{_close(v, TABLE[group])} "
                          f"Put a YAML of your own in DIR/{group}/ and run with --config-dir DIR (see docs/fusionbench.md).")
    ours = ours.format(model=model)
    if not _exists(group, ours):
        raise ConfigError(f"FusionBench's {group}={v} maps to fusion_bench's {group}={ours}, which this version does not "
                          "ship; see docs/fusionbench.md for the pools shipped.")
    return ours


def _option(spec: Method | None, opt: str, v: str, fb_method: str) -> tuple[str, str] | None:
    if spec is None:  # one of our method names, used inside a FusionBench command line: our options
        return opt, v
    head = opt.split(".")[0]
    target = spec.options.get(opt, spec.options.get(head))
    if target is None and opt not in spec.options and head not in spec.options:
        from fusion_bench.config_schema import to_plain
        from fusion_bench.methods import get_method_class

        ours = to_plain(get_method_class(spec.ours).config_class())
        if head in ours:  # our own option name on the mapped method
            return opt, v
        known = sorted(set(spec.options) | set(ours))
        raise ConfigError(f"method.{opt}: FusionBench's {fb_method} (fusion_bench's {spec.ours}) has no option "
                          f"'{opt}'.{did_you_mean(opt, known)}")
    if target == IGNORED:
        return None
    if isinstance(target, str):
        return target, v
    if isinstance(target, tuple):
        return target[0], _convert(v, target[1])
    target(v, f"method.{opt}")  # a check: only FusionBench's default value is accepted
    return None


def announce(record: dict[str, Any]) -> None:
    """One line on stderr saying that FusionBench's names were translated (the report keeps the details)."""
    print("fusion_bench: FusionBench command line translated: " + " ".join(record["translated"])
          + (f" (no effect here: {' '.join(record['ignored'])})" if record["ignored"] else ""), file=sys.stderr)


def translate_command_line(argv: list[str]) -> list[str]:
    """The CLI's entry point: translate, announce, return the arguments to run."""
    new, record = translate(argv)
    if record is not None:
        announce(record)
    return new
