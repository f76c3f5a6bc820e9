"""Results are checked: option ranges and finiteness, weight sums, non-finite merged tensors (nothing
written), mergekit parameter validation and Rich-safe method help."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn

from fusion_bench.config_schema import build_config, check_range, describe, in_range, option, range_text
from fusion_bench.errors import CheckpointError, ConfigError
from fusion_bench.methods import get_method_class, list_methods
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig
from fusion_bench.modelpool.base import ModelPool
from tests.conftest import make_toy, run_cli


# ----------------------------------------------------------------------------------------------
# every numeric option of every registered method declares a range that holds its default
# ----------------------------------------------------------------------------------------------
def _numeric(tp) -> bool:
    args = typing.get_args(tp)
    if tp in (int, float):
        return True
    if typing.get_origin(tp) in (list, tuple) and args:
        return args[0] in (int, float)
    return bool(args) and any(a in (int, float) for a in args)


@pytest.mark.parametrize("name", list_methods())
def test_every_numeric_option_has_a_range_holding_its_default(name):
    cfg = get_method_class(name).config_class
    hints = typing.get_type_hints(cfg)
    for f in dataclasses.fields(cfg):
        if not _numeric(hints[f.name]):
            continue
        rng = f.metadata.get("range")
        assert rng, f"{name}: option {f.name} declares no range (option(..., ge=/gt=/le=/lt=))"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        check_range(default, rng, f"method.{f.name}")  # raises when the default is outside
        help_ = {r[0]: r[3] for r in describe(cfg)}[f.name]
        assert f"(range: {range_text(rng)})" in help_


def test_program_and_taskpool_numeric_options_have_ranges():
    from fusion_bench.programs.fusion import ProgramConfig
    from fusion_bench.taskpool.base import TASKPOOLS

    classes = [ProgramConfig] + [TASKPOOLS.get(n).config_class for n in TASKPOOLS.names()
                                 if getattr(TASKPOOLS.get(n), "config_class", None)]
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _numeric(hints[f.name]):
                assert f.metadata.get("range"), f"{cls.__name__}.{f.name} declares no range"


@dataclasses.dataclass
class _Cfg:
    x: float = option(0.5, ge=0.0, le=1.0, help="a fraction")
    n: int = option(1, ge=1, help="a count")
    w: list[float] = option([], gt=-1.0, lt=1.0, help="weights")
    m: float | None = option(None, help="optional")


def test_option_ranges_and_finiteness():
    assert range_text({"ge": 0.0, "le": 1.0}) == "[0, 1]" and range_text({"gt": 0}) == "> 0"
    assert range_text({"ge": 0, "le": 2**63 - 1}) == "[0, 2**63 - 1]"
    assert in_range(1.0, {"ge": 0.0, "le": 1.0}) and not in_range(1.0, {"lt": 1.0})
    assert build_config(_Cfg, {"x": 1, "n": 3, "w": [0.5, -0.5]}).x == 1.0
    for values, msg in [({"x": 1.5}, r"method.x=1.5 is out of range: it must be in \[0, 1\]"),
                        ({"n": 0}, r"method.n=0 is out of range: it must be in >= 1"),
                        ({"w": [0.0, 1.0]}, r"method.w\[1\]=1.0 is out of range"),
                        ({"x": float("nan")}, "method.x=nan is not a finite number"),
                        ({"x": "inf"}, "method.x=inf is not a finite number"),
                        ({"m": float("-inf")}, "method.m=-inf is not a finite number"),
                        ({"x": 10**400}, "method.x=.* is not a finite number"),
                        ({"w": [0.1, float("nan")]}, r"method.w\[1\]=nan is not a finite number")]:
        with pytest.raises(ConfigError, match=msg):
            build_config(_Cfg, values, prefix="method")


# ----------------------------------------------------------------------------------------------
# the CLI: one error line, exit status 2, nothing written
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    info = make_toy(tmp_path, "abc")
    models, base = info["models"], info["base"]
    # a pool whose task vectors overflow float32 when added (3e38 + 3e38)
    huge = {k: torch.full_like(v, 3e38) for k, v in base.items()}
    save_file({k: torch.zeros_like(v) for k, v in base.items()}, models / "zero.safetensors")
    save_file(huge, models / "huge1.safetensors")
    save_file(huge, models / "huge2.safetensors")
    (tmp_path / "cfg" / "modelpool" / "huge.yaml").write_text(
        "models:\n" f"  _pretrained_: {models / 'zero.safetensors'}\n"
        f"  h1: {models / 'huge1.safetensors'}\n  h2: {models / 'huge2.safetensors'}\n")
    return info


_run = run_cli


def _one_error_line(code, err) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("error:"), err
    return lines[0]


@pytest.mark.parametrize("override, message", [
    ("method.scaling_factor=nan", "method.scaling_factor=nan is not a finite number"),
    ("method.scaling_factor=inf", "method.scaling_factor=inf is not a finite number"),
    ("method.scaling_factor=1e39", "method.scaling_factor=1e+39 is out of range: it must be in [-1000, 1000]"),
    ("seed=1180591620717411303424", "seed=1180591620717411303424 is out of range: it must be in [0, 2**63 - 1]"),
    ("seed=-1", "seed=-1 is out of range"),
])
def test_cli_refuses_bad_numbers(toy, capsys, override, message):
    out_path = toy["root"] / "merged.safetensors"
    code, _, err = _run(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=task_arithmetic",
                         override, f"merged_model_path={out_path}"], capsys)
    line = _one_error_line(code, err)
    assert message in line
    assert not out_path.exists()


@pytest.mark.parametrize("weights, message", [
    ("[0.5,-0.4999999999,0.0]", "method.weights=[0.5, -0.4999999999, 0.0] sum to 1e-10, (near) zero: normalising "
                                "would scale the merge by 1e+10"),
    ("[1.0,-1.0,0.0]", "sum to 0, (near) zero: normalising would divide by zero"),
    ("[1.0,nan,1.0]", "method.weights[1]=nan is not a finite number"),
])
def test_cli_refuses_degenerate_weights(toy, capsys, weights, message):
    out_path = toy["root"] / "merged.safetensors"
    code, _, err = _run(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=weighted_average",
                         f"method.weights={weights}", f"merged_model_path={out_path}"], capsys)
    assert message in _one_error_line(code, err)
    assert not out_path.exists()


def test_weighted_ensemble_refuses_near_zero_sum():
    from fusion_bench.methods.ensemble.ensemble import WeightedEnsemble

    m = WeightedEnsemble({"weights": [1.0, -1.0 + 1e-12]})
    with pytest.raises(ConfigError, match=r"\(near\) zero"):
        m.weights(["a", "b"])
    assert WeightedEnsemble({"weights": [1.0, -1.0], "normalize": False}).weights(["a", "b"]) == [1.0, -1.0]
    assert WeightedEnsemble({"weights": [1e-10, 1e-10]}).weights(["a", "b"]) == [0.5, 0.5]  # small, no cancellation


@pytest.mark.parametrize("engine", ["memory", "streaming"])
def test_non_finite_merge_stops_before_writing(toy, capsys, engine):
    out_path = toy["root"] / "merged"
    code, _, err = _run(["--config-dir", toy["cfg"], "modelpool=huge", "taskpool=count", "method=task_arithmetic",
                         "method.scaling_factor=1.0", f"engine={engine}", "evaluate=false",
                         f"merged_model_path={out_path}"], capsys)
    line = _one_error_line(code, err)
    assert "Method 'task_arithmetic' produced non-finite values (NaN/inf) in merged tensor 'layer." in line
    assert "nothing was written" in line and "scaling_factor=1.0" in line
    assert not out_path.exists()
    assert not [p for p in toy["root"].iterdir() if p.name.startswith(("merged", ".merged"))]


class _InfConfig(MethodConfig):
    pass


class _Overflow(FusionMethod):
    """A non-tensorwise method whose merged model holds inf (for the program-level check)."""

    name = "overflow_test"
    variant = "test only"
    config_class = dataclasses.dataclass(_InfConfig)

    def run(self, modelpool):
        model = nn.Linear(2, 2)
        with torch.no_grad():
            model.weight.fill_(float("inf"))
        return FusionResult("merged", model=model, metadata={})


def test_program_checks_non_tensorwise_merged_result(tmp_path):
    from fusion_bench.programs.fusion import run_program
    from fusion_bench.taskpool.base import build_taskpool

    pool = ModelPool(models={"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointError, match="Method 'overflow_test' produced non-finite values .* 'weight'"):
        run_program({"merged_model_path": str(out), "evaluate": False}, modelpool=pool, method=_Overflow(),
                    taskpool=build_taskpool({"type": "parameter_count"}), log=lambda *a: None)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# mergekit YAML
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from tests.test_streaming_helpers import save_zoo

    return save_zoo(tmp_path_factory.mktemp("trustzoo"), "llama", n=2, dtype=torch.float32)


def _mk(zoo, method="ties", params=None, gparams=None):
    doc = {"merge_method": method, "base_model": zoo["_pretrained_"],
           "models": [{"model": zoo["ft0"], "parameters": params or {"weight": 1.0, "density": 0.5}},
                      {"model": zoo["ft1"], "parameters": {"weight": 0.5, "density": 0.5}}]}
    if gparams is not None:
        doc["parameters"] = gparams
    return doc


@pytest.mark.parametrize("doc_fn, message", [
    (lambda z: _mk(z, params={"weight": float("nan"), "density": 0.5}),
     "mergekit parameter models[0].parameters.weight=nan is not a finite number"),
    (lambda z: _mk(z, params={"weight": 1.0, "density": 1.5}),
     "mergekit parameter models[0].parameters.density=1.5 is out of range: density must be in (0, 1]"),
    (lambda z: _mk(z, params={"weight": 1.0, "density": -0.2}),
     "mergekit parameter models[0].parameters.density=-0.2 is out of range"),
    (lambda z: _mk(z, params={"weight": 1.0, "densty": 0.5}),
     "Unknown mergekit parameter 'models[0].parameters.densty' for merge_method ties. Did you mean 'density'?"),
    (lambda z: _mk(z, gparams={"normalise": True}),
     "Unknown mergekit parameter 'parameters.normalise' for merge_method ties. Did you mean 'normalize'?"),
    (lambda z: _mk(z, params={"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
     "Unknown mergekit parameter 'models[0].parameters.epsilon' for merge_method ties."),
    (lambda z: _mk(z, params={"weight": 1.0, "lambda": 0.5}),
     "'models[0].parameters.lambda' is read by mergekit only from the top-level 'parameters'"),
    (lambda z: _mk(z, gparams={"normalize": "yes"}), "parameters.normalize='yes' must be true or false"),
    (lambda z: _mk(z, gparams={"lambda": float("inf")}), "parameters.lambda=inf is not a finite number"),
    (lambda z: _mk(z, gparams={"lambda": [1.0, 1e39]}), "parameters.lambda[1]=1e+39 is out of range"),
    (lambda z: _mk(z, "della", params={"weight": 1.0, "density": 0.5, "epsilon": 0.5}),
     "epsilon=0.5 is out of range: epsilon must be in [0, 0.5)"),
    (lambda z: _mk(z, "della", params={"weight": 1.0, "density": 0.2}, gparams={"epsilon": 0.3}),
     "mergekit della: density=0.2 with epsilon=0.3 (model 'ft0', tensor"),
    (lambda z: {"merge_method": "slerp", "base_model": z["_pretrained_"], "parameters": {"t": float("nan")},
                "models": [{"model": z["ft0"]}]}, "parameters.t=nan is not a finite number"),
    (lambda z: {"merge_method": "slerp", "base_model": z["_pretrained_"], "parameters": {"tt": 0.5},
                "models": [{"model": z["ft0"]}]}, "Did you mean 't'?"),
    (lambda z: {"merge_method": "linear", "models": [{"model": z["ft0"], "parameters": {"weight": 1.0}},
                                                     {"model": z["ft1"], "parameters": {"weight": -1.0}}]},
     "sum to 0, (near) zero: normalising would divide by zero; give weights with a clearly non-zero sum or set "
     "parameters.normalize: false"),
    (lambda z: {"merge_method": "passthrough", "slices": [{"sources": [{"model": z["ft0"], "layer_range": [0, 1],
                                                                        "parameters": {"scale": "half"}}]}]},
     "scale"),
    (lambda z: {"merge_method": "passthrough", "slices": [{"sources": [{"model": z["ft0"], "layer_rnge": [0, 1]}]}]},
     "Did you mean 'layer_range'?"),
])
def test_mergekit_parameters_validated_before_any_work(zoo, tmp_path, capsys, doc_fn, message):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(yaml.safe_dump(doc_fn(zoo), sort_keys=False))
    out = tmp_path / "out"
    code, _, err = _run(["mergekit", str(cfg), str(out)], capsys)
    assert message in _one_error_line(code, err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["merge.yml"]


def test_mergekit_yaml_nan_weight_from_yaml_text(zoo, tmp_path, capsys):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {zoo['ft0']}\n    parameters:\n      weight: .nan\n"
                   f"  - model: {zoo['ft1']}\n    parameters:\n      weight: 1.0\n")
    code, _, err = _run(["mergekit", str(cfg), str(tmp_path / "out")], capsys)
    assert "models[0].parameters.weight=nan is not a finite number" in _one_error_line(code, err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("- merge_method: ties\n- models: []\n", "must be a mapping of keys (merge_method, models, parameters, ...) at the "
                                             "top level, not a list"),
    ("merge_method: ties\nmodels: [\n  - model: a\n", "is not valid YAML: line 3, column 3:"),
    ("merge_method: ties\n  models: x\n", "is not valid YAML: line 2, column 9: mapping values are not allowed here"),
    ("", "is empty"),
])
def test_mergekit_yaml_shape_and_syntax(tmp_path, capsys, text, message):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(text)
    code, _, err = _run(["mergekit", str(cfg), str(tmp_path / "out")], capsys)
    line = _one_error_line(code, err)
    assert str(cfg) in line and message in line
    assert not (tmp_path / "out").exists()


def test_mergekit_valid_parameters_still_run(zoo, tmp_path):
    from fusion_bench.compat.mergekit import load_mergekit_config

    plan = load_mergekit_config(_mk(zoo, "della", params={"weight": 1.0, "density": 0.5},
                                    gparams={"lambda": 0.8, "normalize": True, "int8_mask": True, "epsilon": 0.1}))
    # gamma, epsilon and lambda are read per model and tensor (mergekit's semantics): (gammas, epsilons, lambda)
    assert plan.method.extras("model.norm.weight", ["ft0"])[1:] == ([0.1], 0.8)
    plan = load_mergekit_config(_mk(zoo, "breadcrumbs", params={"weight": 1.0, "density": 0.9},
                                    gparams={"gamma": 0.02}))
    assert plan.method.extras("model.norm.weight", ["ft0"])[0] == [0.02]


# ----------------------------------------------------------------------------------------------
# fusion_bench methods: method metadata is printed verbatim (no Rich markup)
# ----------------------------------------------------------------------------------------------
def test_methods_help_prints_brackets_verbatim(capsys):
    from fusion_bench.cli_tools import list_methods_main

    assert list_methods_main(["generalized_task_arithmetic", "dare_task_arithmetic", "linear_interpolation"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo Rich's line wrapping
    assert "[/ sum_i w_i m_i]" in out
    assert "[u_ij >= p]" in out
    assert "t outside [0, 1] extrapolates" in out
    assert "(range: [0, 1])" in out and "(range: [0, 2**63 - 1])" in out
    assert list_methods_main([]) == 0
    code, out, err = _run(["methods", "generalized_task_arithmetic"], capsys)
    assert code == 0 and "[/ sum_i w_i m_i]" in " ".join(out.split()) and not err.strip()
