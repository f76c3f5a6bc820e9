"""Mixtral upcycling and Mixtral merging of dense causal LMs (Llama / Mistral -> Mixtral, Qwen2 -> Qwen2-MoE).

- ``mixtral_upscaling``: one dense model's MLP copied into ``num_experts`` experts of every layer
  (sparse upcycling, Komatsuzaki et al., ICLR 2023; FusionBench ``mixtral_moe_upscaling``).
- ``mixtral_merging``: several dense fine-tunes of one base become the experts (expert e of every
  layer = that model's MLP; mergekit-moe; FusionBench ``mixtral_moe_merging``); attention, norms,
  embeddings and head come from the base model or are the experts' average.

Routers are initialised as mergekit-moe 0.1.5 offers (:mod:`fusion_bench.kernels.mixing.mixtral`):
``random``, ``uniform_random`` (no data), ``cheap_embed`` (token embeddings of each expert's prompts:
tokenizer only), ``hidden`` / ``hidden_avg`` (hidden states of the base model on the prompts: a
forward pass, the only data-using modes).

Both build a plan of output tensors before reading any weight and produce each tensor from at most
one tensor per input model, so they run in the streaming engine (``engine=streaming``, or
``engine=auto`` with ``merged_model_path`` and ``evaluate=false``): memory is independent of the
model size (the hidden gate modes excepted: they load the base model once for the forward pass).
In memory the same plan is written to a temporary folder and loaded with ``from_pretrained``.

Output layout is the one of the published checkpoints, which every transformers version loads:
Mixtral ``model.layers.{l}.block_sparse_moe.gate.weight`` and ``...experts.{e}.w1/w2/w3.weight``
(w1 = gate_proj, w2 = down_proj, w3 = up_proj); Qwen2-MoE ``model.layers.{l}.mlp.gate.weight``,
``...mlp.experts.{e}.{gate,up,down}_proj.weight`` and the shared expert (see ``shared_expert``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from fusion_bench.config_schema import SEED_RANGE, option
from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError, did_you_mean
from fusion_bench.io.checkpoint import read_json_object
from fusion_bench.kernels.mixing.mixtral import (
    GATE_MODES,
    PROMPT_GATE_MODES,
    cheap_embed_vector,
    expert_gate_vectors,
    hidden_prompt_vectors,
    random_gate,
    stack_gates,
    uniform_random_gate,
)
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method
from fusion_bench.methods.mixing._pick import one_model

#: name of the computed-tensor reader the plan adds to the streaming engine's readers
PLAN_READER = "__mixing_plan__"
_MLP_RX = re.compile(r"^(?P<prefix>.*\.layers\.)(?P<layer>\d+)\.mlp\.(?P<proj>gate_proj|up_proj|down_proj)\."
                     r"(?P<kind>weight|bias)$")
_MIXTRAL_NAMES = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_EXPERT_KEYS = ("positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
@dataclass
class _MoEConfig:
    experts_per_token: int = option(2, ge=1, help="Experts each token is routed to (top-k; mergekit "
                                    "experts_per_token, Mixtral num_experts_per_tok). At most the number of experts.")
    gate_mode: str = option("random", choices=GATE_MODES, help=(
        "Router initialisation (mergekit-moe 0.1.5): random (standard normal), uniform_random (U(-1/sqrt(H), "
        "1/sqrt(H))), cheap_embed (summed token embeddings of each expert's prompts; tokenizer only), hidden / "
        "hidden_last (base model's hidden states at each prompt's last token, per layer: runs the base model on the "
        "prompts, the data-using mode), hidden_avg (the same, averaged over positions). Prompt modes need "
        "positive_prompts for every expert."))
    seed: int = option(0, **SEED_RANGE, help="Seed of the random gate modes and of expert noise_scale noise.")
    architecture: str = option("auto", choices=("auto", "mixtral", "qwen2_moe"), help=(
        "Output architecture: auto (llama/mistral -> MixtralForCausalLM, qwen2 -> Qwen2MoeForCausalLM), or forced."))
    shared_expert: str = option("zero", help=(
        "Qwen2-MoE only (its layers always hold a shared expert, added to the routed output times "
        "sigmoid(shared_expert_gate x)): 'zero' writes a width-1 shared expert and gate of zeros, so it adds "
        "exactly nothing; a model name of the pool copies that model's MLP as the shared expert (mergekit's "
        "qwen MoE), its gate row initialised by gate_mode from shared_expert_prompts (random modes: drawn)."))
    shared_expert_prompts: dict[str, Any] = option({}, help=(
        "Qwen2-MoE with a model as shared expert and a prompt gate mode: {positive_prompts: [...], "
        "negative_prompts: [...]} for its gate."))
    device: str = option("cpu", help="Device of the base model's forward pass in the hidden gate modes "
                         "(cpu, cuda, cuda:1, mps, auto).")


@dataclass
class MixtralUpscalingConfig(_MoEConfig):
    num_experts: int = option(4, ge=1, help="Experts per layer; each is a copy of the dense model's MLP.")
    experts: list[dict[str, Any]] = option([], help=(
        "Optional per-expert options, one mapping per expert in order: positive_prompts, negative_prompts "
        "(prompt gate modes), noise_scale (std of Gaussian noise added to the copied weights, seeded), "
        "residual_scale (factor on down_proj). Empty: plain copies."))
    model: str | None = option(None, help="The dense model to upcycle (default: '_pretrained_', else the pool's "
                               "only model).")


@dataclass
class MixtralMergingConfig(_MoEConfig):
    experts: list[Any] = option([], help=(
        "The experts in order: model names, or mappings {model: <name>, positive_prompts, negative_prompts, "
        "noise_scale, residual_scale}. Empty: every model of the pool except '_pretrained_', in pool order."))
    base_model: str | None = option(None, help=(
        "Model whose config, tokenizer and (shared_tensors=base) attention, norms, embeddings and head are used, "
        "and which the hidden gate modes run; default '_pretrained_', else the first expert."))
    shared_tensors: str = option("base", choices=("base", "average"), help=(
        "Tensors outside the MLPs: 'base' copies base_model's (mergekit-moe, FusionBench); 'average' takes the "
        "mean of the experts' models (float32, cast back)."))


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------
@dataclass
class OutTensor:
    """One output tensor: its name, shape, dtype and how it is produced (at most one tensor per input)."""

    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Any  # () -> tensor in ``dtype``


@dataclass
class MoEBuild:
    tensors: list[OutTensor]
    config: dict[str, Any]
    stats: dict[str, Any] = field(default_factory=dict)


class PlanReader:
    """The reader interface of the streaming engine over computed output tensors."""

    def __init__(self, tensors: list[OutTensor]):
        self.name = PLAN_READER
        self._t = {t.key: t for t in tensors}

    def keys(self) -> list[str]:
        return list(self._t)

    def __contains__(self, key: str) -> bool:
        return key in self._t

    def meta(self, key: str):
        from fusion_bench.io.checkpoint import TensorMeta

        t = self._t[key]
        return TensorMeta(t.shape, t.dtype)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = _produce(self._t[key])
        return t[rows[0]:rows[1]] if rows is not None else t

    def total_bytes(self) -> int:
        return sum(self.meta(k).nbytes for k in self._t)

    def close(self) -> None:
        pass


def _produce(t: OutTensor) -> torch.Tensor:
    """The tensor, checked finite (nothing non-finite is ever written)."""
    from fusion_bench.methods.base import all_finite

    x = t.produce()
    if not all_finite(x):
        raise CheckpointError(f"Output tensor '{t.key}' would hold NaN/inf (an input model holds non-finite values "
                              "there); fix or drop that checkpoint.")
    return x


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return int(n)


def _summary(total: int, active: int, one_model: int, router: int) -> dict[str, Any]:
    """The mixing family's common ``mixed_model`` block (no inference timing for causal LMs here)."""
    from fusion_bench.methods.mixing._moe_report import mixed_model_summary

    return mixed_model_summary(total=total, active=active, applied=active, one_model=one_model, router=router,
                               inference=None)


def _stable_seed(*parts: Any) -> int:
    h = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def _hf_config(pool, name: str) -> tuple[Path, dict[str, Any]]:
    folder = pool.hf_folder(name) if pool.kind(name) == "hf" else None
    if folder is None or not (folder / "config.json").exists():
        raise ConfigError(f"Model '{name}' is not a Hugging Face causal-LM folder with a config.json; Mixtral "
                          "upcycling and merging read Llama, Mistral or Qwen2 checkpoints (modelpool.type=causal_lm).")
    return folder, read_json_object(folder / "config.json", name)


def write_folder(tensors: list[OutTensor], config: dict[str, Any], folder: Path, side_from: Path | None,
                 max_shard_bytes: int = 5 * 2**30) -> None:
    """Write planned tensors (one at a time) and ``config.json`` into an existing folder."""
    from fusion_bench.io.outputs import safetensors_metadata
    from fusion_bench.io.stream import ShardedWriter

    w = ShardedWriter(folder, [(t.key, t.shape, t.dtype) for t in tensors], max_shard_bytes=max_shard_bytes,
                      metadata=safetensors_metadata("merged model"))
    try:
        for t in tensors:
            w.write(t.key, _produce(t))
        w.finish()
    finally:
        w.close()
    if side_from is not None:
        import shutil

        for f in sorted(side_from.iterdir()):
            if f.is_file() and f.suffix in (".json", ".txt", ".model", ".tiktoken", ".jinja") and \
                    not f.name.endswith(".index.json") and f.name != "config.json":
                shutil.copy2(f, folder / f.name)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


class _MixtralBase(FusionMethod):
    """Shared planning of upcycling and merging (subclasses say which models are the experts)."""

    family = "mixing"
    identity_on_equal_inputs = False
    permutation_invariant = False
    conformance_skip = ("builds a Mixtral / Qwen2-MoE from Llama, Mistral or Qwen2 checkpoints; the suite's "
                        "TinyNet pool has none (tested in tests/test_mixing_upcycle.py)")

    # -- what subclasses define ---------------------------------------------------------------------
    def _base(self, pool) -> str:
        raise NotImplementedError

    def _experts(self, pool) -> list[tuple[str, dict[str, Any]]]:
        """[(model name, expert options)] in expert order."""
        raise NotImplementedError

    def _shared_source(self, pool) -> str:  # 'base' or 'average'
        return "base"

    # -- streaming engine interface ---------------------------------------------------------------
    def config_source(self, pool) -> str:
        return self._base(pool)

    def stream_plan(self, pool, readers: dict[str, Any], out_dtype: torch.dtype | None):
        from fusion_bench.engine.streaming import Job, open_reader

        for n in self._needed(pool):
            if n not in readers:
                readers[n] = open_reader(pool, n)
        build = self.build(pool, readers, out_dtype)
        readers[PLAN_READER] = PlanReader(build.tensors)
        jobs = [Job(t.key, t.shape, t.dtype, "copy", {PLAN_READER: t.key}, copy_from=PLAN_READER, in_dtype=t.dtype)
                for t in build.tensors]
        self._stream_stats = build.stats
        base_cfg = _hf_config(pool, self._base(pool))[1]
        updates = {k: v for k, v in build.config.items() if base_cfg.get(k, object()) != v}
        return jobs, updates

    def streaming_metadata(self) -> dict[str, Any]:
        """Figures of the last streamed build (added to the run's metadata by the streaming engine)."""
        return dict(getattr(self, "_stream_stats", {}) or {})

    def _needed(self, pool) -> list[str]:
        names = [self._base(pool)] + [m for m, _ in self._experts(pool)]
        sh = self.config.shared_expert
        if sh != "zero" and sh in pool.names:
            names.append(sh)
        return list(dict.fromkeys(names))

    # -- validation ----------------------------------------------------------------------------------
    def _check(self, pool, experts: list[tuple[str, dict[str, Any]]], arch: str) -> None:
        c = self.config
        E = len(experts)
        if c.experts_per_token > E:
            raise ConfigError(f"method.experts_per_token={c.experts_per_token} exceeds the {E} experts; lower it "
                              "or add experts.")
        for i, (_m, o) in enumerate(experts):
            extra = set(o) - set(_EXPERT_KEYS) - {"model"}
            if extra:
                raise ConfigError(f"method.experts[{i}] has unknown key(s) {sorted(extra)}.{did_you_mean(sorted(extra)[0], _EXPERT_KEYS)}")
            for k in ("positive_prompts", "negative_prompts"):
                v = o.get(k)
                if v is not None and (isinstance(v, str) or not all(isinstance(p, str) for p in v)):
                    raise ConfigError(f"method.experts[{i}].{k} must be a list of strings.")
            for k in ("noise_scale", "residual_scale"):
                v = o.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise ConfigError(f"method.experts[{i}].{k} must be a number, got {v!r}.")
        if c.gate_mode in PROMPT_GATE_MODES:
            for i, (_m, o) in enumerate(experts):
                if not o.get("positive_prompts"):
                    raise ConfigError(f"gate_mode={c.gate_mode} needs prompts: method.experts[{i}] has no "
                                      "positive_prompts; give each expert a list of example prompts, or use "
                                      "gate_mode=random.")
            first = (tuple(experts[0][1]["positive_prompts"]), tuple(experts[0][1].get("negative_prompts") or ()))
            if E > 1 and all((tuple(o["positive_prompts"]), tuple(o.get("negative_prompts") or ())) == first
                             for _m, o in experts[1:]):
                raise ConfigError("Every expert has the same positive and negative prompts, so every router row "
                                  "would be equal; give each expert prompts of what should be routed to it.")
        if arch == "qwen2_moe" and c.shared_expert != "zero":
            if c.shared_expert not in pool.names:
                raise ConfigError(f"method.shared_expert='{c.shared_expert}' is neither 'zero' nor a model of the "
                                  f"pool.{did_you_mean(c.shared_expert, ['zero', *pool.names])}")
            if c.gate_mode in PROMPT_GATE_MODES and not (c.shared_expert_prompts or {}).get("positive_prompts"):
                raise ConfigError(f"gate_mode={c.gate_mode} with method.shared_expert='{c.shared_expert}' needs "
                                  "method.shared_expert_prompts.positive_prompts for the shared expert's gate.")
        elif c.shared_expert != "zero":
            raise ConfigError(f"method.shared_expert='{c.shared_expert}' applies to Qwen2-MoE outputs only; the "
                              f"output here is {arch}. Remove it.")

    def _arch(self, base_cfg: dict[str, Any], base: str) -> str:
        mt = base_cfg.get("model_type")
        want = {"llama": "mixtral", "mistral": "mixtral", "qwen2": "qwen2_moe"}.get(mt)
        arch = self.config.architecture
        if want is None:
            raise ModelMismatchError(f"Model '{base}' is model_type={mt!r}; Mixtral upcycling and merging take llama, "
                                     "mistral (-> Mixtral) or qwen2 (-> Qwen2-MoE) models.")
        if arch != "auto" and arch != want:
            raise ConfigError(f"method.architecture={arch} cannot hold model_type={mt} layers (its attention "
                              f"differs); use architecture={want} or auto.")
        if want == "mixtral":
            for k in ("attention_bias", "mlp_bias"):
                if base_cfg.get(k):
                    raise ModelMismatchError(f"Model '{base}' has {k}=true; Mixtral layers have no biases, so the "
                                             "model cannot be upcycled to Mixtral without changing it.")
        return want

    # -- gates -----------------------------------------------------------------------------------------
    def _tokenizer(self, pool, base_folder: Path):
        from transformers import AutoTokenizer

        from fusion_bench.modelpool.base import resolve_hf_path

        tok_ref = getattr(pool.config, "tokenizer", None)
        path = resolve_hf_path(str(tok_ref), "tokenizer") if tok_ref else base_folder
        try:
            tok = AutoTokenizer.from_pretrained(path)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"gate_mode={self.config.gate_mode} needs a tokenizer: none loads from {path} "
                                  f"({str(e).splitlines()[0][:200]}); set modelpool.tokenizer or use gate_mode=random.") from e
        tok.padding_side = "left"
        tok.pad_token_id = tok.bos_token_id
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if tok.pad_token_id is None:
            raise CheckpointError(f"The tokenizer at {path} has neither a BOS nor an EOS token to pad prompts with; "
                                  "set one in its config or use gate_mode=random.")
        return tok

    @staticmethod
    def _tokenize(tok, prompts: list[str]):
        return tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                   add_special_tokens=False)

    def _gates(self, pool, readers, base: str, base_folder: Path, cfg: dict[str, Any],
               prompts: list[dict[str, Any]], n_random: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Router rows ``(L, len(prompts), H)`` and a description of the data used."""
        c = self.config
        ck = json.dumps([str(base_folder), c.gate_mode, int(c.seed), prompts, n_random], sort_keys=True, default=str)
        cache = self.__dict__.setdefault("_gate_cache", {})
        if ck not in cache:  # the streaming engine plans twice; the hidden modes' forward pass runs once
            cache.clear()
            cache[ck] = self._compute_gates(pool, readers, base, base_folder, cfg, prompts, n_random)
        return cache[ck]

    def _compute_gates(self, pool, readers, base: str, base_folder: Path, cfg: dict[str, Any],
                       prompts: list[dict[str, Any]], n_random: int) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        L, H = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"])
        g = torch.Generator().manual_seed(int(c.seed))
        if c.gate_mode == "random":
            return random_gate(L, n_random, H, g), {"gate_data": "none (random)"}
        if c.gate_mode == "uniform_random":
            return uniform_random_gate(L, n_random, H, g), {"gate_data": "none (uniform_random)"}
        tok = self._tokenizer(pool, base_folder)
        n_pos = sum(len(p.get("positive_prompts") or []) for p in prompts)
        n_neg = sum(len(p.get("negative_prompts") or []) for p in prompts)
        if c.gate_mode == "cheap_embed":
            key = next((k for k in readers[base].keys() if k.endswith("embed_tokens.weight")), None)
            if key is None:
                raise ModelMismatchError(f"Model '{base}' has no '*embed_tokens.weight' tensor for gate_mode=cheap_embed.")
            embed = readers[base].read(key)

            def vec(ps: list[str]) -> torch.Tensor:
                t = self._tokenize(tok, ps)
                return cheap_embed_vector(embed, t["input_ids"], t["attention_mask"]).expand(L, H)
            what = f"{n_pos} positive and {n_neg} negative prompts (token embeddings of the base model, no forward pass)"
        else:
            model = self._load_base_model(base_folder)
            dev = next(model.parameters()).device

            def vec(ps: list[str]) -> torch.Tensor:
                t = self._tokenize(tok, ps)
                with torch.no_grad():
                    out = model(**{k: v.to(dev) for k, v in t.items()}, output_hidden_states=True, return_dict=True)
                hs = torch.stack(out.hidden_states[:-1]).float().cpu()  # inputs of layers 0..L-1
                return hidden_prompt_vectors(hs, average=c.gate_mode == "hidden_avg")
            what = (f"{n_pos} positive and {n_neg} negative prompts through the base model '{base}' (forward pass, "
                    "float32)")
        rows = []
        for p in prompts:
            pos = vec(list(p["positive_prompts"]))
            neg = vec(list(p["negative_prompts"])) if p.get("negative_prompts") else None
            rows.append(expert_gate_vectors(pos, neg))
        return stack_gates(rows), {"gate_data": what}

    def _load_base_model(self, folder: Path):
        from transformers import AutoModelForCausalLM

        from fusion_bench.utils import resolve_device

        dev = resolve_device(self.config.device)
        try:
            m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"gate_mode={self.config.gate_mode}: the base model at {folder} does not load "
                                  f"({str(e).splitlines()[0][:200]}).") from e
        return m.to(dev).eval()

    # -- the build -------------------------------------------------------------------------------------
    def build(self, pool, readers: dict[str, Any], out_dtype: torch.dtype | None) -> MoEBuild:
        """Plan every output tensor (nothing but headers and, for prompt gates, the gates is computed)."""
        c = self.config
        base = self._base(pool)
        base_folder, base_cfg = _hf_config(pool, base)
        arch = self._arch(base_cfg, base)
        experts = self._experts(pool)
        self._check(pool, experts, arch)
        E, k = len(experts), int(c.experts_per_token)
        rb = readers[base]
        keys = rb.keys()
        for m, _o in experts:
            if pool.kind(m) == "hf":
                mt = _hf_config(pool, m)[1].get("model_type")
                if mt != base_cfg.get("model_type"):
                    raise ModelMismatchError(f"Expert '{m}' is model_type={mt!r} but base '{base}' is "
                                             f"{base_cfg.get('model_type')!r}; experts must share the base architecture.")
        mlp: dict[int, dict[str, str]] = {}
        for key in keys:
            mm = _MLP_RX.match(key)
            if mm:
                if mm.group("kind") == "bias":
                    raise ModelMismatchError(f"Model '{base}' has MLP bias '{key}'; the MoE experts have none.")
                mlp.setdefault(int(mm.group("layer")), {})[mm.group("proj")] = key
        L = int(base_cfg.get("num_hidden_layers", 0))
        if sorted(mlp) != list(range(L)) or any(len(v) != 3 for v in mlp.values()):
            raise ModelMismatchError(f"Model '{base}' does not hold gate_proj, up_proj and down_proj for each of its "
                                     f"{L} layers under '*.layers.<i>.mlp.'; it is not a Llama/Mistral/Qwen2 checkpoint.")
        names = list(dict.fromkeys([base] + [m for m, _ in experts]))
        for m in names[1:]:
            r = readers[m]
            for key in keys:
                if key not in r:
                    raise ModelMismatchError(f"Model '{m}' lacks tensor '{key}' that base '{base}' has.")
                if tuple(r.meta(key).shape) != tuple(rb.meta(key).shape):
                    raise ModelMismatchError(f"Tensor '{key}' has shape {list(r.meta(key).shape)} in model '{m}' but "
                                             f"{list(rb.meta(key).shape)} in base '{base}'.")

        def odt(key: str, src_dtype: torch.dtype) -> torch.dtype:
            return out_dtype if (out_dtype is not None and src_dtype.is_floating_point) else src_dtype

        # gates
        H = int(base_cfg["hidden_size"])
        shared = c.shared_expert if arch == "qwen2_moe" else "zero"
        prompts = [o for _m, o in experts]
        if shared != "zero":
            prompts = prompts + [dict(c.shared_expert_prompts or {})]
        gates, gate_info = self._gates(pool, readers, base, base_folder, base_cfg, prompts,
                                       E + (1 if shared != "zero" else 0))
        gate_dtype = odt("gate", rb.meta(mlp[0]["gate_proj"]).dtype)
        degenerate = []
        if E <= H and E > 1:
            for layer in range(L):
                if float(torch.linalg.cond(gates[layer, :E].float())) > 5.0:
                    degenerate.append(layer)

        def read(m: str, key: str) -> torch.Tensor:
            return readers[m].read(key)

        shared_mode = self._shared_source(pool)
        expert_models = [m for m, _ in experts]

        def shared_tensor(key: str, dt: torch.dtype):
            if shared_mode == "base" or not dt.is_floating_point:
                return lambda: read(base, key).to(odt(key, dt))

            def avg() -> torch.Tensor:
                acc = None
                for m in expert_models:
                    t = read(m, key)
                    t = t.double() if t.dtype == torch.float64 else t.float()
                    acc = t if acc is None else acc.add_(t)
                return (acc / len(expert_models)).to(odt(key, dt))
            return avg

        def expert_tensor(m: str, key: str, e: int, opts: dict[str, Any], proj: str, dt: torch.dtype):
            noise = opts.get("noise_scale")
            res = opts.get("residual_scale") if proj == "down_proj" else None

            def f() -> torch.Tensor:
                t = read(m, key)
                if noise is None and res is None:
                    return t.to(odt(key, dt))
                t = t.float()
                if noise is not None:
                    gen = torch.Generator().manual_seed(_stable_seed(c.seed, "noise", e, key))
                    t = t + torch.randn(t.shape, generator=gen) * float(noise)
                if res is not None:
                    t = t * float(res)
                return t.to(odt(key, dt))
            return f

        out: list[OutTensor] = []
        done_layers: set[int] = set()
        mlp_numel: dict[int, int] = {}
        for key in keys:
            meta = rb.meta(key)
            mm = _MLP_RX.match(key)
            if not mm:
                out.append(OutTensor(key, tuple(meta.shape), odt(key, meta.dtype), shared_tensor(key, meta.dtype)))
                continue
            layer = int(mm.group("layer"))
            if layer in done_layers:
                continue
            done_layers.add(layer)
            prefix = f"{mm.group('prefix')}{layer}."
            group = "block_sparse_moe" if arch == "mixtral" else "mlp"
            out.append(OutTensor(f"{prefix}{group}.gate.weight", (E, H), gate_dtype,
                                 lambda layer=layer: gates[layer, :E].to(gate_dtype).contiguous()))
            mlp_numel[layer] = sum(rb.meta(mlp[layer][p]).numel for p in ("gate_proj", "up_proj", "down_proj"))
            for e, (m, opts) in enumerate(experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    src = mlp[layer][proj]
                    pm = rb.meta(src)
                    name = _MIXTRAL_NAMES[proj] if arch == "mixtral" else proj
                    out.append(OutTensor(f"{prefix}{group}.experts.{e}.{name}.weight", tuple(pm.shape),
                                         odt(src, pm.dtype), expert_tensor(m, src, e, opts, proj, pm.dtype)))
            if arch == "qwen2_moe":
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    src = mlp[layer][proj]
                    pm = rb.meta(src)
                    dt = odt(src, pm.dtype)
                    okey = f"{prefix}mlp.shared_expert.{proj}.weight"
                    if shared == "zero":
                        shape = (1, H) if proj != "down_proj" else (H, 1)
                        out.append(OutTensor(okey, shape, dt, lambda shape=shape, dt=dt: torch.zeros(shape, dtype=dt)))
                    else:
                        out.append(OutTensor(okey, tuple(pm.shape), dt,
                                             lambda src=src, dt=dt: read(shared, src).to(dt)))
                if shared == "zero":
                    out.append(OutTensor(f"{prefix}mlp.shared_expert_gate.weight", (1, H), gate_dtype,
                                         lambda: torch.zeros((1, H), dtype=gate_dtype)))
                else:
                    out.append(OutTensor(f"{prefix}mlp.shared_expert_gate.weight", (1, H), gate_dtype,
                                         lambda layer=layer: gates[layer, E:E + 1].to(gate_dtype).contiguous()))

        # config
        cfg = dict(base_cfg)
        inter = int(base_cfg.get("intermediate_size", 0))
        if arch == "mixtral":
            cfg.update({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "num_local_experts": E,
                        "num_experts_per_tok": k, "sliding_window": None, "output_router_logits": False})
        else:
            cfg.update({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"], "num_experts": E,
                        "num_experts_per_tok": k, "moe_intermediate_size": inter, "decoder_sparse_step": 1,
                        "mlp_only_layers": [], "norm_topk_prob": True, "qkv_bias": True,
                        "shared_expert_intermediate_size": 1 if shared == "zero" else inter,
                        "use_sliding_window": False, "output_router_logits": False})
        if out_dtype is not None:
            cfg["dtype"] = str(out_dtype).removeprefix("torch.")
            if "torch_dtype" in cfg:
                cfg["torch_dtype"] = cfg["dtype"]

        # parameter figures
        input_params = sum(rb.meta(x).numel for x in keys if rb.meta(x).dtype.is_floating_point)
        total = 0
        for t in out:
            if t.dtype.is_floating_point:
                n = 1
                for s in t.shape:
                    n *= s
                total += n
        inactive = sum((E - k) * n for n in mlp_numel.values())
        stats = {
            "architecture": cfg["architectures"][0], "num_experts": E, "experts_per_token": k,
            "experts": [m for m, _ in experts], "gate_mode": c.gate_mode, "seed": int(c.seed),
            "shared_tensors_from": shared_mode if shared_mode == "average" else base,
            "total_parameters": int(total), "active_parameters_per_token": int(total - inactive),
            "input_model_parameters": int(input_params), "extra_parameters": int(total - input_params),
            "parameter_ratio": round(total / max(1, input_params), 4),
            "active_parameter_ratio": round((total - inactive) / max(1, input_params), 4),
            "degenerate_gate_layers": degenerate, **gate_info,
        }
        if arch == "qwen2_moe":
            stats["shared_expert"] = shared
        router = sum(_numel(t.shape) for t in out if t.key.endswith("gate.weight") and ".experts." not in t.key)
        stats["mixed_model"] = _summary(total, total - inactive, input_params, router)
        return MoEBuild(out, cfg, stats)

    # -- in memory ----------------------------------------------------------------------------------
    def run(self, modelpool) -> FusionResult:
        from transformers import AutoModelForCausalLM

        from fusion_bench.engine.streaming import open_reader

        t0 = time.perf_counter()
        pool = modelpool
        readers = {n: open_reader(pool, n) for n in self._needed(pool)}
        try:
            build = self.build(pool, readers, pool.dtype)
            with tempfile.TemporaryDirectory(prefix="fusion_bench_moe_") as tmp:
                write_folder(build.tensors, build.config, Path(tmp), side_from=None)
                kw = {"dtype": pool.dtype} if pool.dtype is not None else {"dtype": "auto"}
                model = AutoModelForCausalLM.from_pretrained(tmp, **kw)
                model = model.eval()
        finally:
            for r in readers.values():
                r.close()
        return FusionResult("merged", model=model, metadata=self._metadata(t0, **build.stats))


# ----------------------------------------------------------------------------------------------
# the two methods
# ----------------------------------------------------------------------------------------------
@register_method
class MixtralUpscaling(_MixtralBase):
    """Upcycle one dense causal LM into a sparse mixture of experts (Mixtral or Qwen2-MoE).

    Paper: Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
    Checkpoints", ICLR 2023; FusionBench ``mixtral_moe_upscaling``; router initialisation as
    mergekit-moe 0.1.5. Variant: every layer's MLP copied into ``num_experts`` experts (optionally
    with seeded noise / residual scaling per expert), attention, norms, embeddings and head copied,
    router rows from ``gate_mode``; with plain copies the model computes the dense model's function
    for any router (the top-k weights sum to one).

    Args:
        config: :class:`MixtralUpscalingConfig`.
    """

    name = "mixtral_upscaling"
    config_class: ClassVar = MixtralUpscalingConfig
    summary = "Sparse upcycling: one dense LM's MLP copied into N experts of a Mixtral / Qwen2-MoE (mergekit gates)."
    variant = ("MLP copied into num_experts experts per layer (optional seeded noise_scale / residual_scale), other "
               "tensors copied, routers from gate_mode (mergekit-moe 0.1.5 random / uniform_random / cheap_embed / "
               "hidden / hidden_avg); Qwen2 -> Qwen2-MoE with a zero (or copied) shared expert.")

    def _base(self, pool) -> str:
        return one_model(pool, self.config.model, "mixtral_upscaling", "upcycles")

    def _experts(self, pool) -> list[tuple[str, dict[str, Any]]]:
        c = self.config
        opts = list(c.experts)
        if opts and len(opts) != c.num_experts:
            raise ConfigError(f"method.experts has {len(opts)} entries but num_experts={c.num_experts}; give one "
                              "mapping per expert or none.")
        for i, o in enumerate(opts):
            if not isinstance(o, dict):
                raise ConfigError(f"method.experts[{i}] must be a mapping (positive_prompts, negative_prompts, "
                                  "noise_scale, residual_scale).")
            if "model" in o:
                raise ConfigError(f"method.experts[{i}].model: upcycling copies one model; use mixtral_merging to "
                                  "take experts from several models.")
        base = self._base(pool)
        return [(base, dict(opts[e]) if opts else {}) for e in range(c.num_experts)]


@register_method
class MixtralMerging(_MixtralBase):
    """Merge dense fine-tunes of one base into a sparse mixture of experts (Mixtral or Qwen2-MoE).

    Paper / tool: mergekit-moe (Goddard et al., "Arcee's MergeKit", 2024) and FusionBench
    ``mixtral_moe_merging``. Variant: expert e of every layer = the MLP of the e-th expert model;
    tensors outside the MLPs from ``base_model`` (or the experts' mean, ``shared_tensors=average``);
    router rows from ``gate_mode`` (mergekit-moe 0.1.5 modes; the hidden modes run ``base_model``).

    Args:
        config: :class:`MixtralMergingConfig`.
    """

    name = "mixtral_merging"
    config_class: ClassVar = MixtralMergingConfig
    summary = "Dense fine-tunes become the experts of a Mixtral / Qwen2-MoE (mergekit-moe gates)."
    variant = ("Expert e = MLP of the e-th model, other tensors from base_model or the experts' mean, routers from "
               "gate_mode (mergekit-moe 0.1.5 random / uniform_random / cheap_embed / hidden / hidden_avg); Qwen2 -> "
               "Qwen2-MoE with a zero (or a model's) shared expert.")

    def _expert_entries(self, pool) -> list[tuple[str, dict[str, Any]]]:
        out = []
        entries = list(self.config.experts) or list(pool.model_names)
        for i, e in enumerate(entries):
            if isinstance(e, str):
                name, opts = e, {}
            elif isinstance(e, dict):
                if "model" not in e:
                    raise ConfigError(f"method.experts[{i}] needs 'model' (a model name of the pool).")
                name, opts = str(e["model"]), {k: v for k, v in e.items() if k != "model"}
            else:
                raise ConfigError(f"method.experts[{i}] must be a model name or a mapping with 'model'.")
            if name not in pool.names:
                raise ConfigError(f"method.experts[{i}]: model '{name}' is not in the pool.{did_you_mean(name, pool.names)}")
            out.append((name, opts))
        if not out:
            raise ConfigError("mixtral_merging needs at least one expert model in the pool besides '_pretrained_'.")
        return out

    def _experts(self, pool) -> list[tuple[str, dict[str, Any]]]:
        return self._expert_entries(pool)

    def _base(self, pool) -> str:
        b = self.config.base_model
        if b is not None:
            if b not in pool.names:
                raise ConfigError(f"method.base_model='{b}' is not in the pool.{did_you_mean(b, pool.names)}")
            return b
        return pool.base_name() if pool.has_pretrained else self._expert_entries(pool)[0][0]

    def _shared_source(self, pool) -> str:
        return self.config.shared_tensors
