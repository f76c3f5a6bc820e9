"""``check_method``: the conformance suite every fusion method passes (scikit-learn's ``check_estimator`` style).

Run it on your own method (registered or not)::

    from fusion_bench.testing import check_method
    check_method(MyMethod)                       # raises MethodCheckError listing failed checks
    outcomes = check_method("ties_merging", raise_on_failure=False)

The checks run on a tiny pool of ``nn.Module`` models built in memory (a few hundred parameters,
float and non-float buffers), with the method's default config unless ``config`` is given:

- ``result``: ``run`` returns a :class:`FusionResult` of the declared kind (``result_kind`` class
  attribute if set, else ``"ensemble"`` for family ``ensemble`` and ``"merged"`` otherwise); a merged
  model of a ``merging`` method has the base model's tensor names and shapes, and finite values.
- ``inputs_unchanged``: the pool's models (live modules and state dicts) are not modified.
- ``identity``: when every model of the pool, the base ``_pretrained_`` included, is the same model,
  the result is that model (weights for merges, outputs for ensembles). Only where the class claims
  ``identity_on_equal_inputs``.
- ``permutation``: reordering the models to fuse (each keeps its name) gives the same result (up to
  float rounding of sums). Only where the class claims ``permutation_invariant``.
- ``dtypes``: float32, bfloat16 and float16 models give a result in the same dtypes.
- ``determinism``: two fresh instances, and one instance run twice, give bit-identical results.
  Skipped for classes with ``deterministic = False``.
- ``buffers``: integer and boolean buffers (e.g. position ids, masks) are copied unchanged.
- ``unknown_key``: a misspelt config key raises :class:`~fusion_bench.errors.ConfigError` naming the
  closest valid key.
- ``missing_base``: a method with ``requires_pretrained`` rejects a pool without ``_pretrained_``
  with a :class:`~fusion_bench.errors.FusionBenchError` before merging.
- ``streaming``: for tensor-wise merges (and methods with ``stream_plan``), the streaming engine
  (:mod:`fusion_bench.engine.streaming`, with tiny row blocks so that the row-block protocol is
  exercised) writes the same tensors as the in-memory engine, reading the models from safetensors
  files. The engine used is :data:`STREAMING_ENGINE` when set (a hook for other engines), else
  ``merge_to_folder``; the check is skipped with a reason when neither is available.

Not checked: device placement (the tiny pool lives on the CPU). ``identity`` is deliberately the
"all inputs equal" property: with a base different from the fine-tuned copies, methods that scale
task vectors (task arithmetic with lambda != 1/N, TIES, DARE) legitimately return another model.

Methods that need data or training (family ``training`` or ``uses_data``) are skipped with that
reason. A method that cannot run on the tiny pool for another reason sets the class attribute
``conformance_skip = "<reason>"``; ``conformance_config = {...}`` gives config values the suite
uses instead of the defaults (e.g. required keys).
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fusion_bench.errors import ConfigError, FusionBenchError
from fusion_bench.methods.base import FusionMethod, FusionResult, TensorwiseMerge, get_method_class

Status = Literal["passed", "skipped", "failed"]


class MethodCheckError(AssertionError):
    """A method failed one or more conformance checks (the message lists them)."""


class CheckSkipped(Exception):
    """Raised inside a check: the check does not apply (the message is the reason)."""


@dataclass
class CheckOutcome:
    check: str
    status: Status
    message: str = ""

    def __str__(self) -> str:
        return f"{self.check}: {self.status}" + (f" ({self.message})" if self.message else "")


# ----------------------------------------------------------------------------------------------
# the tiny pool
# ----------------------------------------------------------------------------------------------
class TinyNet(nn.Module):
    """A small MLP with a LayerNorm, an int64 buffer and a bool buffer (a few hundred parameters)."""

    def __init__(self, d_in: int = 8, d_hidden: int = 12, d_out: int = 5):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.norm = nn.LayerNorm(d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)
        self.register_buffer("position_ids", torch.arange(7) * 3 + 1)
        self.register_buffer("mask", torch.tensor([True, False, True, True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.norm(self.fc1(x))))


def tiny_model(seed: int, base: nn.Module | None = None, scale: float = 0.05) -> TinyNet:
    """A TinyNet: random (seeded) weights, or ``base`` plus seeded noise of std ``scale`` ("fine-tuned")."""
    g = torch.Generator().manual_seed(seed)
    m = TinyNet()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if base is None:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            else:
                ref = dict(base.named_parameters())[name]
                p.copy_(ref.float() + torch.randn(p.shape, generator=g) * scale)
    return m.eval()


def tiny_pool_models(n: int, *, dtype: torch.dtype = torch.float32, with_base: bool = True, identical: bool = False,
                     seed: int = 0) -> dict[str, nn.Module]:
    """``_pretrained_`` (optional) and ``n`` fine-tuned TinyNets named model_0..model_{n-1}.

    With ``identical`` every entry is a copy of one model.
    """
    base = tiny_model(seed)
    models: dict[str, nn.Module] = {}
    if with_base:
        models["_pretrained_"] = base
    for i in range(n):
        models[f"model_{i}"] = copy.deepcopy(base) if identical else tiny_model(seed + 101 + i, base)
    return {k: v.to(dtype) for k, v in models.items()}


def example_input(dtype: torch.dtype = torch.float32, seed: int = 7) -> torch.Tensor:
    return torch.randn(6, 8, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def declared_kind(cls: type[FusionMethod]) -> str:
    """The FusionResult kind a method class declares (``result_kind``, else from its family)."""
    kind = getattr(cls, "result_kind", None)
    if kind:
        return kind
    return "ensemble" if cls.family == "ensemble" else "merged"


def skip_reason(cls: type[FusionMethod]) -> str | None:
    """Why the suite does not run on this method class (None: it runs)."""
    own = getattr(cls, "conformance_skip", None)
    if own:
        return f"{cls.name}: {own}"
    if cls.family == "training":
        return f"{cls.name}: family 'training' (needs data and training), not run on the data-free tiny pool"
    if cls.uses_data:
        return f"{cls.name}: uses data (uses_data=True), not run on the data-free tiny pool"
    return None


def _resolve(method: str | type[FusionMethod] | FusionMethod,
             config: Mapping[str, Any] | None) -> tuple[type[FusionMethod], dict[str, Any]]:
    if isinstance(method, str):
        cls = get_method_class(method)
        cfg: dict[str, Any] = {}
    elif isinstance(method, type):
        cls, cfg = method, {}
    else:
        cls = type(method)
        cfg = {f.name: copy.deepcopy(getattr(method.config, f.name)) for f in dataclasses.fields(method.config)}
    cfg = {**dict(getattr(cls, "conformance_config", None) or {}), **cfg, **dict(config or {})}
    return cls, cfg


class _Ctx:
    """What every check gets: the class, the config and a cache of the pool size."""

    def __init__(self, cls: type[FusionMethod], config: dict[str, Any], tmp: Path):
        self.cls = cls
        self.config = config
        self.tmp = tmp
        self._n: int | None = None

    def new(self) -> FusionMethod:
        return self.cls(copy.deepcopy(self.config))

    def n_models(self) -> int:
        """3 models, or the first of 2, min_models, 4, 1 that the method accepts (its ``check_pool``
        for tensor-wise merges, else a trial run), e.g. 2 for two-model methods."""
        if self._n is None:
            cls = self.cls
            lo = max(1, cls.min_models if issubclass(cls, TensorwiseMerge) else 1)
            hi = getattr(cls, "max_models", None)
            cands = [n for n in dict.fromkeys([3, 2, lo, 4]) if n >= lo and (hi is None or n <= hi)]
            cands += [n for n in (1,) if n not in cands and n >= lo]
            chosen = cands[0]
            for n in cands:
                try:
                    if issubclass(cls, TensorwiseMerge):  # the method's own pre-flight check
                        self.new().check_pool([f"model_{i}" for i in range(n)], True)
                    else:  # no pre-flight hook: a trial run
                        self.run(tiny_pool_models(n))
                except FusionBenchError:
                    continue
                chosen = n
                break
            self._n = chosen
        return self._n

    def with_base(self) -> bool:
        return True

    def run(self, models: Mapping[str, Any], method: FusionMethod | None = None) -> FusionResult:
        from fusion_bench.modelpool.base import ModelPool

        m = method or self.new()
        with torch.no_grad():
            return m.run(ModelPool(dict(models)))


def _state(result: FusionResult) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in result.model.state_dict().items()}


def _outputs(result: FusionResult, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = result.model(x)
    return out.logits if hasattr(out, "logits") else out


def _close(a: torch.Tensor, b: torch.Tensor, what: str, *, exact: bool = False, rtol: float | None = None,
           atol: float | None = None) -> None:
    if a.dtype != b.dtype or a.shape != b.shape:
        raise AssertionError(f"{what}: dtype/shape {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}")
    if exact or not a.dtype.is_floating_point:
        if not torch.equal(a, b):
            raise AssertionError(f"{what}: values differ (max abs diff "
                                 f"{(a.double() - b.double()).abs().max().item():.3g})")
        return
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def _compare_states(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], what: str, **kw: Any) -> None:
    if set(a) != set(b):
        raise AssertionError(f"{what}: tensor names differ: {sorted(set(a) ^ set(b))[:5]}")
    for k in a:
        _close(a[k], b[k], f"{what}, tensor '{k}'", **kw)


def _compare_results(r1: FusionResult, r2: FusionResult, what: str, x: torch.Tensor, **kw: Any) -> None:
    if r1.kind != r2.kind:
        raise AssertionError(f"{what}: result kinds differ ({r1.kind} vs {r2.kind})")
    if r1.kind == "per_task":
        if set(r1.models) != set(r2.models):
            raise AssertionError(f"{what}: per-task model names differ")
        for t in r1.models:
            _compare_states(r1.models[t].state_dict(), r2.models[t].state_dict(), f"{what} (task {t})", **kw)
        return
    if r1.kind == "ensemble":
        _close(_outputs(r1, x), _outputs(r2, x), f"{what} (ensemble outputs)", **kw)
        return
    _compare_states(_state(r1), _state(r2), what, **kw)


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------
def check_result(ctx: _Ctx) -> None:
    models = tiny_pool_models(ctx.n_models(), with_base=ctx.with_base())
    res = ctx.run(models)
    if not isinstance(res, FusionResult):
        raise AssertionError(f"run() returned {type(res).__name__}, expected FusionResult")
    want = declared_kind(ctx.cls)
    if res.kind != want:
        raise AssertionError(f"result kind is {res.kind!r}, the class declares {want!r}")
    if not isinstance(res.metadata, dict):
        raise AssertionError("FusionResult.metadata must be a dict")
    if res.kind in ("merged", "ensemble") and not isinstance(res.model, nn.Module):
        raise AssertionError(f"FusionResult.model is {type(res.model).__name__}, expected an nn.Module")
    if res.kind == "merged" and ctx.cls.family == "merging":
        ref = models["_pretrained_"].state_dict()
        got = res.model.state_dict()
        if set(got) != set(ref):
            raise AssertionError(f"merged model's tensor names differ from the base: {sorted(set(got) ^ set(ref))[:5]}")
        for k, v in ref.items():
            if got[k].shape != v.shape:
                raise AssertionError(f"tensor '{k}' has shape {tuple(got[k].shape)}, expected {tuple(v.shape)}")
            if got[k].is_floating_point() and not torch.isfinite(got[k]).all():
                raise AssertionError(f"tensor '{k}' has non-finite values")
    if res.kind == "ensemble":
        out = _outputs(res, example_input())
        if not torch.isfinite(out).all():
            raise AssertionError("ensemble outputs are not finite")


def check_inputs_unchanged(ctx: _Ctx) -> None:
    """The method must not modify the pool's models (state dicts and modules are shared, not copied)."""
    for dtype in (torch.float32, torch.bfloat16):
        models = tiny_pool_models(ctx.n_models(), dtype=dtype, with_base=ctx.with_base())
        as_dicts = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in models.items()}
        before = {n: {k: v.clone() for k, v in sd.items()} for n, sd in as_dicts.items()}
        ctx.run(models)  # live modules
        ctx.run(as_dicts)  # in-memory state dicts
        for n, m in models.items():
            _compare_states(m.state_dict(), before[n], f"{dtype} model '{n}' (module) after the run", exact=True)
            _compare_states(as_dicts[n], before[n], f"{dtype} model '{n}' (state dict) after the run", exact=True)


def check_identity(ctx: _Ctx) -> None:
    if not ctx.cls.identity_on_equal_inputs:
        raise CheckSkipped("the class does not claim identity_on_equal_inputs")
    for dtype in (torch.float32, torch.bfloat16):
        models = tiny_pool_models(ctx.n_models(), dtype=dtype, identical=True, with_base=ctx.with_base())
        one = models["model_0"]
        res = ctx.run(models)
        if res.kind == "ensemble":
            x = example_input(dtype)
            with torch.no_grad():
                ref = one(x).float()
            _close(_outputs(res, x).float(), ref, f"ensemble of identical {dtype} models vs one model")
        elif res.kind == "merged":
            _compare_states(_state(res), one.state_dict(), f"merge of identical {dtype} models vs the model")
        else:
            for t, m in res.models.items():
                _compare_states(m.state_dict(), one.state_dict(), f"task {t}: merge of identical models vs the model")


def check_permutation(ctx: _Ctx) -> None:
    if not ctx.cls.permutation_invariant:
        raise CheckSkipped("the class does not claim permutation_invariant")
    n = ctx.n_models()
    if n < 2:
        raise CheckSkipped("the method merges a single model here")
    models = tiny_pool_models(n, with_base=ctx.with_base())
    names = [k for k in models if k != "_pretrained_"]
    order = names[1:] + names[:1]  # rotate
    permuted = {**({"_pretrained_": models["_pretrained_"]} if "_pretrained_" in models else {}),
                **{k: models[k] for k in order}}
    _compare_results(ctx.run(models), ctx.run(permuted), f"models {names} vs {order}", example_input(),
                     rtol=1e-5, atol=1e-6)


def check_dtypes(ctx: _Ctx) -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        models = tiny_pool_models(ctx.n_models(), dtype=dtype, with_base=ctx.with_base())
        ref = models["_pretrained_"].state_dict() if "_pretrained_" in models else models["model_0"].state_dict()
        res = ctx.run(models)
        mods = _result_models(res)
        for m in mods:
            for k, v in m.state_dict().items():
                if k in ref and v.dtype != ref[k].dtype:
                    raise AssertionError(f"{dtype} inputs: tensor '{k}' came back as {v.dtype}")
                if v.is_floating_point() and not torch.isfinite(v).all():
                    raise AssertionError(f"{dtype} inputs: tensor '{k}' has non-finite values")


def check_determinism(ctx: _Ctx) -> None:
    if not ctx.cls.deterministic:
        raise CheckSkipped("the class declares deterministic = False")
    models = tiny_pool_models(ctx.n_models(), with_base=ctx.with_base())
    m = ctx.new()
    r1 = ctx.run(models, m)
    r2 = ctx.run(models, m)
    r3 = ctx.run(models)
    x = example_input()
    _compare_results(r1, r2, "one instance run twice", x, exact=True)
    _compare_results(r1, r3, "two instances with the same config", x, exact=True)


def check_buffers(ctx: _Ctx) -> None:
    models = tiny_pool_models(ctx.n_models(), with_base=ctx.with_base())
    ref = models.get("_pretrained_", models["model_0"])
    want = {k: v for k, v in ref.state_dict().items() if not v.is_floating_point()}
    res = ctx.run(models)
    for m in _result_models(res):
        sd = m.state_dict()
        for k, v in want.items():
            if k not in sd:
                raise AssertionError(f"non-float buffer '{k}' is missing from the result")
            _close(sd[k], v, f"non-float buffer '{k}'", exact=True)


def _result_models(res: FusionResult) -> list[nn.Module]:
    """The models of a result whose state dicts use the pool's tensor names (ensemble: its members)."""
    if res.kind == "per_task":
        return list(res.models.values())
    if res.kind == "ensemble":
        members = [m for m in res.model.modules() if isinstance(m, TinyNet)]
        if not members:
            raise AssertionError("the ensemble holds no member model of the pool")
        return members
    return [res.model]


def _typo(name: str) -> str:
    return name[:-1] if len(name) > 3 else name + "x"


def check_unknown_key(ctx: _Ctx) -> None:
    fields = [f.name for f in dataclasses.fields(ctx.cls.config_class) if f.init]
    targets = fields or [None]
    for f in targets:
        bad = _typo(f) if f else "no_such_option"
        if bad in fields:
            continue
        try:
            ctx.cls({**ctx.config, bad: 1})
        except ConfigError as e:
            msg = str(e)
            if bad not in msg:
                raise AssertionError(f"ConfigError for unknown key '{bad}' does not name it: {msg}") from None
            if f is not None and f"'{f}'" not in msg:
                raise AssertionError(f"ConfigError for unknown key '{bad}' does not suggest '{f}': {msg}") from None
        except Exception as e:  # noqa: BLE001 - any other type is a failure
            raise AssertionError(f"unknown key '{bad}' raised {type(e).__name__}, expected ConfigError: {e}") from None
        else:
            raise AssertionError(f"unknown config key '{bad}' was accepted silently")


def check_missing_base(ctx: _Ctx) -> None:
    if not ctx.cls.requires_pretrained:
        raise CheckSkipped("the class does not require '_pretrained_'")
    models = tiny_pool_models(ctx.n_models(), with_base=False)
    try:
        ctx.run(models)
    except FusionBenchError:
        return
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"a pool without '_pretrained_' raised {type(e).__name__} ({e}), "
                             "expected a FusionBenchError naming the missing base model") from None
    raise AssertionError("a pool without '_pretrained_' was merged, but the class sets requires_pretrained")


#: the streaming check: set to None to disable; a callable(method, pool, out_dir) -> None writing a folder
STREAMING_ENGINE: Callable[..., Any] | None = None


def _streaming_engine() -> Callable[..., Any] | None:
    if STREAMING_ENGINE is not None:
        return STREAMING_ENGINE
    try:
        from fusion_bench.engine.streaming import merge_to_folder
    except ImportError:
        return None
    return merge_to_folder


def check_streaming(ctx: _Ctx) -> None:
    """Streaming engine output == in-memory engine output, models read from safetensors files."""
    if not issubclass(ctx.cls, TensorwiseMerge) and not callable(getattr(ctx.cls, "stream_plan", None)):
        raise CheckSkipped("neither a tensor-wise merge nor a stream_plan method: the streaming engine does not apply")
    engine = _streaming_engine()
    if engine is None:
        raise CheckSkipped("fusion_bench.engine.streaming is not available")
    from safetensors.torch import save_file

    from fusion_bench.io.checkpoint import open_checkpoint
    from fusion_bench.modelpool.base import ModelPool

    models = tiny_pool_models(ctx.n_models(), with_base=ctx.with_base())
    folder = Path(tempfile.mkdtemp(dir=ctx.tmp))
    paths = {}
    for n, m in models.items():
        p = folder / f"{n}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p))
        paths[n] = str(p)
    with torch.no_grad():
        mem = ctx.new().run(ModelPool(paths))
        out = folder / "streamed"
        # tiny row blocks (24 elements per input) so that the row-block protocol is exercised
        engine(ctx.new(), ModelPool(paths), out, block_elements=24, progress=False)
    streamed = open_checkpoint(out).to_state_dict()
    _compare_states(streamed, _state(mem), "streaming vs in-memory", rtol=1e-6, atol=1e-7)


CHECKS: dict[str, Callable[[_Ctx], None]] = {
    "result": check_result,
    "inputs_unchanged": check_inputs_unchanged,
    "identity": check_identity,
    "permutation": check_permutation,
    "dtypes": check_dtypes,
    "determinism": check_determinism,
    "buffers": check_buffers,
    "unknown_key": check_unknown_key,
    "missing_base": check_missing_base,
    "streaming": check_streaming,
}


def check_method(method: str | type[FusionMethod] | FusionMethod, *, config: Mapping[str, Any] | None = None,
                 checks: Sequence[str] | None = None, raise_on_failure: bool = True) -> list[CheckOutcome]:
    """Run the conformance checks on a method.

    Args:
        method: a registered name, a method class (registered or not) or an instance (its config is used).
        config: config values used instead of the defaults (merged over an instance's config).
        checks: names of the checks to run (default: all of :data:`CHECKS`).
        raise_on_failure: raise :class:`MethodCheckError` listing the failed checks.
    Returns:
        one :class:`CheckOutcome` per check (passed, skipped with the reason, or failed with the message).
    """
    cls, cfg = _resolve(method, config)
    names = list(checks) if checks is not None else list(CHECKS)
    unknown = [c for c in names if c not in CHECKS]
    if unknown:
        from fusion_bench.errors import did_you_mean

        raise ConfigError(f"Unknown conformance check '{unknown[0]}'.{did_you_mean(unknown[0], CHECKS)}")
    reason = skip_reason(cls)
    if reason:
        return [CheckOutcome(c, "skipped", reason) for c in names]
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="fusion_bench_check_") as tmp:
        ctx = _Ctx(cls, cfg, Path(tmp))
        for c in names:
            try:
                CHECKS[c](ctx)
            except CheckSkipped as e:
                outcomes.append(CheckOutcome(c, "skipped", str(e)))
            except Exception as e:  # noqa: BLE001 - every failure is reported, not raised one by one
                outcomes.append(CheckOutcome(c, "failed", f"{type(e).__name__}: {e}"))
            else:
                outcomes.append(CheckOutcome(c, "passed"))
    failed = [o for o in outcomes if o.status == "failed"]
    if failed and raise_on_failure:
        raise MethodCheckError(f"method '{cls.name or cls.__name__}' failed {len(failed)} check(s):\n"
                               + "\n".join(f"  - {o.check}: {o.message}" for o in failed))
    return outcomes
