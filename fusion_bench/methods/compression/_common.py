"""Shared machinery of the compression methods: which layers are pruned, the calibration data, the
layer-by-layer calibration driver, and the report (sparsity reached, bytes, perplexity before/after).

The layer-by-layer driver follows Wanda's and SparseGPT's procedure: the inputs of decoder layer 0 are captured
for the calibration sequences (the forward pass stops there), then each decoder layer in turn is moved to the
compute device, run on its inputs (statistics gathered by hooks on its linear layers), compressed, run again,
and its **compressed** outputs become the next layer's inputs. Only one decoder layer, its inputs and outputs and
its statistics are on the compute device at a time, so that part of the peak does not grow with depth; the model
itself stays where the model pool loaded it (CPU memory).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.engine.devices import module_device
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods.base import MethodConfig

if TYPE_CHECKING:
    from fusion_bench.modelpool.base import ModelPool

#: attribute paths of the decoder-layer list in common Hugging Face causal LMs
DECODER_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers", "transformer.h",
                       "transformer.layers", "gpt_neox.layers", "layers")


@dataclass
class CompressionConfig(MethodConfig):
    """Options shared by the compression methods."""

    model: str | None = option(None, help="The pool model to compress (default: '_pretrained_' if present, else "
                               "the first model).")
    exclude: list[str] = option([], help="Glob patterns of linear-layer names left dense, e.g. '*.mlp.down_proj'. "
                                "Causal LMs: only the linear layers inside the decoder layers are candidates "
                                "(embeddings and lm_head stay dense, as in the papers); other models: every "
                                "nn.Linear.")
    device: str = option("auto", help="Where each layer is compressed: auto (CUDA, then MPS, else CPU), cpu, "
                         "cuda:0, ... The model stays where the pool loaded it; one decoder layer at a time moves.")
    seed: int = option(0, **SEED_RANGE, help="Seed of the calibration sample and of random choices (in the report).")
    progress: bool = option(True, help="Show a progress bar on a terminal.")
    perplexity_data: str | None = option(None, help="When set (e.g. 'builtin': the test part of the shipped text), "
                                         "the perplexity of the model before and after compression on that text is "
                                         "measured (causal_lm_perplexity pool, disjoint windows) and put in the report.")
    perplexity_max_length: int = option(2048, ge=2, le=1 << 20, help="Window length of that perplexity (clipped to "
                                        "the model's max_position_embeddings).")
    perplexity_max_tokens: int | None = option(None, ge=2, le=10**12, help="Score only the first this many tokens "
                                               "(null: all).")


@dataclass
class CalibrationConfig(CompressionConfig):
    """Options of the methods that use calibration text."""

    calibration_data: str = option("builtin", help="Calibration texts: 'builtin' (the text bundled with "
                                   "fusion_bench), a text/JSON-lines file or folder, a saved `datasets` folder or a "
                                   "hub dataset id (see fusion_bench.data.lm_text.load_texts).")
    calibration_split: str | None = option(None, help="Split of the calibration source (null: 'train' for builtin, "
                                           "whose 'test' part the perplexity pool reads; the source's default "
                                           "otherwise).")
    calibration_field: str = option("text", help="Text column of a dataset source.")
    n_samples: int = option(128, ge=1, le=10**7, help="Calibration sequences (the papers: 128).")
    seq_len: int = option(2048, ge=2, le=10**7, help="Tokens per calibration sequence (the papers: 2048; "
                          "shortened to the model's max_position_embeddings).")
    batch_size: int = option(8, ge=1, le=10**6, help="Calibration sequences per forward pass of a layer (does "
                             "not change the result beyond float rounding).")


# ----------------------------------------------------------------------------------------------
# which modules
# ----------------------------------------------------------------------------------------------
def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """``(path, layers)`` of the decoder-layer list of a Hugging Face causal LM, or None."""
    for path in DECODER_LAYER_PATHS:
        obj: Any = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, obj
    return None


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2, weight stored (in, out))."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The module's weight as (out, in) (a transposed view for Conv1D)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def set_weight_2d(module: nn.Module, w: torch.Tensor) -> None:
    """Write an (out, in) weight back in the module's layout and dtype."""
    with torch.no_grad():
        dst = weight_2d(module)
        dst.copy_(w.to(dst.dtype))


def _excluded(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def linear_targets(module: nn.Module, exclude: list[str], prefix: str = "") -> dict[str, nn.Module]:
    """Linear layers of ``module`` (names prefixed), minus the excluded ones."""
    out = {}
    for n, m in module.named_modules():
        if n and is_linear(m):
            full = f"{prefix}{n}"
            if not _excluded(full, exclude):
                out[full] = m
    return out


class _TensorWeight:
    """A stand-in module for one 2-D ``*.weight`` tensor of a plain state dict (a TensorBag)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight


def model_targets(model: nn.Module, exclude: list[str]) -> dict[str, Any]:
    """The linear layers a method compresses: inside the decoder layers for causal LMs, else every linear; for a
    plain state dict without an architecture, every 2-D floating ``*.weight`` tensor (taken as (out, in))."""
    from fusion_bench.modelpool.base import TensorBag

    if isinstance(model, TensorBag):
        return {k[: -len(".weight")]: _TensorWeight(v) for k, v in model.state_dict().items()
                if k.endswith(".weight") and v.dim() == 2 and v.is_floating_point()
                and not _excluded(k[: -len(".weight")], exclude)}
    found = find_decoder_layers(model)
    if found is None:
        return linear_targets(model, exclude)
    path, layers = found
    out: dict[str, nn.Module] = {}
    for i, layer in enumerate(layers):
        out.update(linear_targets(layer, exclude, prefix=f"{path}.{i}."))
    return out


# ----------------------------------------------------------------------------------------------
# model and calibration data
# ----------------------------------------------------------------------------------------------
def model_name(cfg: CompressionConfig, pool: ModelPool) -> str:
    name = cfg.model or pool.base_name()
    if name not in pool.names:
        from fusion_bench.errors import did_you_mean

        raise ConfigError(f"method.model='{name}' is not a model of the pool.{did_you_mean(name, pool.names)}")
    return name


def load_copy(pool: ModelPool, name: str) -> nn.Module:
    """The model to compress: a fresh load (a deep copy for live modules, which belong to the caller)."""
    model = pool.load_model(name)
    if pool.kind(name) == "module":
        model = copy.deepcopy(model)
    return model.eval()


def max_positions(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for k in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = getattr(cfg, k, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def calibration_ids(cfg: CalibrationConfig, pool: ModelPool, model: nn.Module) -> tuple[torch.Tensor, dict[str, Any]]:
    """``(n_samples, seq_len)`` token ids drawn from the calibration texts with the pool's tokenizer, and a
    description for the report."""
    try:
        from fusion_bench.data.lm_text import calibration_batches, load_texts
    except ImportError as e:  # pragma: no cover - the module ships with fusion_bench
        raise ConfigError(f"calibration text loader unavailable ({e})") from e
    tok_fn = getattr(pool, "load_tokenizer", None)
    if not callable(tok_fn):
        raise ConfigError("The calibration methods need a tokenizer: use a causal LM pool (modelpool.type=causal_lm) "
                          "with a tokenizer in the model folder or modelpool.tokenizer set.")
    tokenizer = tok_fn()
    seq_len = cfg.seq_len
    mp = max_positions(model)
    if mp is not None and seq_len > mp:
        seq_len = mp
    split = cfg.calibration_split
    if split is None and cfg.calibration_data == "builtin":
        split = "train"  # the builtin text's test part is left for perplexity
    texts = load_texts(cfg.calibration_data, split=split, field=cfg.calibration_field)
    ids = calibration_batches(tokenizer, texts, n_samples=cfg.n_samples, seq_len=seq_len, seed=cfg.seed)
    info = {"source": cfg.calibration_data, "split": split, "n_samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]), "tokens": int(ids.numel()), "seed": cfg.seed}
    return ids, info


def check_calibration(cfg: CalibrationConfig, pool: ModelPool) -> list[str]:
    """The dry run's check: the calibration texts load and the pool has a tokenizer (nothing is tokenized)."""
    from fusion_bench.data.lm_text import load_texts

    tok_fn = getattr(pool, "load_tokenizer", None)
    if not callable(tok_fn):
        raise ConfigError("The calibration methods need a tokenizer: use a causal LM pool (modelpool.type=causal_lm).")
    tok_fn()
    split = cfg.calibration_split
    if split is None and cfg.calibration_data == "builtin":
        split = "train"
    texts = load_texts(cfg.calibration_data, split=split, field=cfg.calibration_field)
    return [f"the {cfg.n_samples} x {cfg.seq_len}-token calibration windows are drawn only when the run starts "
            f"(calibration text '{cfg.calibration_data}', {len(texts)} texts, and the tokenizer load)"]


# ----------------------------------------------------------------------------------------------
# the layer-by-layer driver
# ----------------------------------------------------------------------------------------------
class _StopForward(Exception):
    pass


def _move_outside(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside ``layers`` to ``device``."""
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if id(m) in inside:
            continue
        for p in list(m.parameters(recurse=False)):
            if p.device != device:
                p.data = p.data.to(device)
        for n, b in list(m.named_buffers(recurse=False)):
            if b is not None and b.device != device:
                m._buffers[n] = b.to(device)



def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, tuple):
        return tuple(_to(v, device) for v in x)
    if isinstance(x, list):
        return [_to(v, device) for v in x]
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    return x


@dataclass
class LayerInputs:
    """The captured inputs of one decoder layer: hidden states and keyword arguments, one entry per batch."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, batch_size: int,
                               device: torch.device) -> LayerInputs:
    """Run the model on ``ids`` in batches up to decoder layer 0 and keep that layer's inputs (on ``device``)."""
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(module, args, kw):
        h = args[0] if args else kw.get("hidden_states")
        hidden.append(h.detach())
        kwargs.append({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    home = module_device(model)
    _move_outside(model, layers, device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for s in range(0, ids.shape[0], batch_size):
                try:
                    model(input_ids=ids[s:s + batch_size].to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        _move_outside(model, layers, home)
    if len(hidden) != math.ceil(ids.shape[0] / batch_size):
        raise ModelMismatchError("Could not capture the inputs of decoder layer 0 (the model's forward does not call "
                                 "its decoder layers in order).")
    return LayerInputs(hidden, kwargs)


def run_layer(layer: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """The layer's outputs on every captured batch."""
    outs = []
    with torch.no_grad():
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            o = layer(h, **kw)
            outs.append((o[0] if isinstance(o, (tuple, list)) else o).detach())
    return outs


def collect_linear_inputs(layer: nn.Module, inputs: LayerInputs, modules: dict[str, nn.Module],
                          make_stat: Callable[[str, nn.Module], Any]) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Run ``layer`` with forward hooks that feed each target module's inputs to its statistic
    (``make_stat(name, module)`` returns an object with ``add(x)``). Returns (stats, layer outputs)."""
    stats = {n: make_stat(n, m) for n, m in modules.items()}
    handles = []
    for n, m in modules.items():
        def hook(mod, args, out, _s=stats[n]):
            _s.add(args[0].detach())
        handles.append(m.register_forward_hook(hook))
    try:
        outs = run_layer(layer, inputs)
    finally:
        for h in handles:
            h.remove()
    return stats, outs


def layer_by_layer(model: nn.Module, ids: torch.Tensor, batch_size: int, device: torch.device,
                   process: Callable[[int, str, nn.Module, LayerInputs], list[torch.Tensor]],
                   progress: bool = True, label: str = "compressing",
                   load_layer: Callable[[int, str, nn.Module], None] | None = None,
                   store_layer: Callable[[int, str, nn.Module], None] | None = None) -> dict[str, Any]:
    """Capture the inputs of decoder layer 0, then for each layer call ``process(index, prefix, layer, inputs)``
    with the layer on ``device``; it compresses the layer and returns the outputs that become the next layer's
    inputs. ``load_layer(index, prefix, layer)`` / ``store_layer(...)``, when given, run before / after (the
    out-of-core path reads the layer's weights there and writes and frees them after). Returns memory figures of
    the driver (bytes of one layer's inputs, largest layer)."""
    found = find_decoder_layers(model)
    if found is None:
        raise ModelMismatchError(f"{type(model).__name__} has no decoder-layer list ({', '.join(DECODER_LAYER_PATHS)}); "
                                 "the calibration methods need a causal LM.")
    path, layers = found
    inputs = capture_first_layer_inputs(model, layers, ids, batch_size, device)
    act_bytes = inputs.nbytes()
    largest = 0
    from fusion_bench.methods._task_data import progress as progress_bar

    with progress_bar(label, len(layers), progress) as advance:
        for i, layer in enumerate(layers):
            prefix = f"{path}.{i}."
            if load_layer is not None:
                load_layer(i, prefix, layer)
            home = module_device(layer)
            layer.to(device)
            largest = max(largest, sum(p.numel() * p.element_size() for p in layer.parameters()))
            outs = process(i, prefix, layer, inputs)
            layer.to(home)
            if store_layer is not None:
                store_layer(i, prefix, layer)
            inputs = LayerInputs(outs, inputs.kwargs)
            advance()
    return {"decoder_layers": len(layers), "layer_input_bytes": act_bytes, "largest_layer_bytes": largest}


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------
def sparsity_report(model: nn.Module, targets: dict[str, nn.Module], nm: tuple[int, int] | None) -> dict[str, Any]:
    """Sparsity reached per compressed layer and overall, and bytes: dense (what safetensors writes: zeros are
    stored) and estimates of sparse storage (bitmask: nonzero values + 1 bit per weight; N:M: kept values +
    ceil(log2 M) bits of index per kept value)."""
    per_layer = {}
    zeros = numel = 0
    sparse_bytes = 0
    nm_bytes = 0
    for n, m in targets.items():
        w = weight_2d(m)
        z = int((w == 0).sum())
        per_layer[n] = round(z / w.numel(), 6)
        zeros += z
        numel += w.numel()
        es = w.element_size()
        sparse_bytes += (w.numel() - z) * es + math.ceil(w.numel() / 8)
        if nm is not None:
            kept = w.numel() * (nm[1] - nm[0]) // nm[1]
            nm_bytes += kept * es + math.ceil(kept * math.ceil(math.log2(nm[1])) / 8)
    dense = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    target_bytes = sum(weight_2d(m).numel() * weight_2d(m).element_size() for m in targets.values())
    out = {"sparsity_per_layer": per_layer, "sparsity_overall": round(zeros / max(1, numel), 6),
           "pruned_layers": len(targets), "weights_in_pruned_layers": numel, "zeros_in_pruned_layers": zeros,
           "sparsity_of_all_parameters": round(zeros / max(1, sum(p.numel() for p in model.parameters())), 6),
           "bytes_dense": dense, "bytes_sparse_bitmask_estimate": dense - target_bytes + sparse_bytes}
    if nm is not None:
        out["bytes_nm_compressed_estimate"] = dense - target_bytes + nm_bytes
    return out


def perplexity(model: nn.Module, cfg: Any, pool: ModelPool) -> dict[str, Any] | None:
    """Perplexity of ``model`` on ``cfg.perplexity_data`` by the ``causal_lm_perplexity`` task pool (strided
    windows of ``cfg.perplexity_max_length`` tokens); None when ``perplexity_data`` is unset."""
    src = getattr(cfg, "perplexity_data", None)
    if not src:
        return None
    from fusion_bench.taskpool.base import build_taskpool

    spec: dict[str, Any] = {"source": src}
    if src == "builtin":
        spec["split"] = "test"
    tok = pool.tokenizer_path() if callable(getattr(pool, "tokenizer_path", None)) else None
    tp_cfg = {"type": "causal_lm_perplexity", "tasks": {"perplexity": spec},
              "max_length": cfg.perplexity_max_length, "stride": cfg.perplexity_max_length,
              "max_tokens": cfg.perplexity_max_tokens, "device": cfg.device,
              **({"tokenizer": str(tok)} if tok is not None else {})}
    rep = build_taskpool(tp_cfg).evaluate(model)
    m = rep["tasks"]["perplexity"]
    return {k: m[k] for k in ("perplexity", "nll", "tokens", "wall_time_s") if k in m}
