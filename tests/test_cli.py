"""End-to-end tests of the fusion_bench command on a pool of tiny state-dict models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_toy, perturbed, run_cli  # noqa: F401  (run_cli: re-exported)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A config folder with a state-dict model pool (base + 3 models) and a parameter-count task pool."""
    monkeypatch.chdir(tmp_path)
    return make_toy(tmp_path, "abc", extra_base={"pos_ids": torch.arange(5)})


def test_task_arithmetic_end_to_end(toy, capsys):
    out_path = toy["root"] / "merged.safetensors"
    rep = toy["root"] / "rep.json"
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=task_arithmetic",
                              "method.scaling_factor=0.5", f"merged_model_path={out_path}", f"report_path={rep}"], capsys)
    assert code == 0, err
    merged = load_file(out_path)
    base = toy["base"]
    fts = [load_file(toy["models"] / f"{n}.safetensors") for n in "abc"]
    for k in ("layer.weight", "layer.bias"):
        ref = base[k] + 0.5 * sum(ft[k] - base[k] for ft in fts)
        torch.testing.assert_close(merged[k], ref)
    assert torch.equal(merged["pos_ids"], base["pos_ids"])
    report = json.loads(rep.read_text())
    assert report["method"]["name"] == "task_arithmetic"
    assert report["method"]["hyperparameters"]["scaling_factor"] == 0.5
    assert "Ilharco" in report["method"]["variant"]
    assert set(report["checkpoint_hashes"]) == {"_pretrained_", "a", "b", "c"}
    assert report["cost"]["merge_wall_time_s"] >= 0 and report["cost"]["peak_rss_mb"] > 0
    assert report["cost"]["extra_parameters"] == 0
    assert report["seed"] == 0 and report["config"]["method"]["scaling_factor"] == 0.5


def test_misspelt_key_one_clear_line(toy, capsys):
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count",
                              "method.scaling_facter=0.3"], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1
    assert "method.scaling_facter" in lines[0] and "Did you mean 'scaling_factor'" in lines[0]
    assert not (toy["root"] / "outputs").exists()


@pytest.mark.parametrize("args,needle", [
    (["method=ties_mergin"], "Unknown method 'ties_mergin'"),
    (["method.scaling_factor=abc"], "method.scaling_factor='abc' has the wrong type"),
    (["seed=1.5"], "seed=1.5 has the wrong type"),
    (["modelpool=toyy"], "Unknown modelpool 'toyy'. Did you mean 'toy'"),
    (["+method.foo=1"], "Unknown config key 'method.foo'"),
])
def test_bad_config_errors(toy, capsys, args, needle):
    base_args = ["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count"]
    code, out, err = run_cli(base_args + args, capsys)
    assert code == 2
    assert needle in err, err
    assert not (toy["root"] / "outputs").exists()


def test_model_mismatch_leaves_nothing(toy, capsys):
    bad = dict(toy["base"])
    bad["layer.weight"] = torch.randn(7, 4)
    save_file(bad, toy["models"] / "c.safetensors")
    out_path = toy["root"] / "merged.safetensors"
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count",
                              f"merged_model_path={out_path}"], capsys)
    assert code == 2
    assert "Tensor 'layer.weight' has shape [7, 4] in model 'c' but [6, 4]" in err
    assert not out_path.exists()
    assert not (toy["root"] / "outputs").exists()


def test_nan_weights_named(toy, capsys):
    bad = perturbed(toy["base"], 9)
    bad["layer.bias"][2] = float("nan")
    save_file(bad, toy["models"] / "b.safetensors")
    out_path = toy["root"] / "merged.safetensors"
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count",
                              f"merged_model_path={out_path}"], capsys)
    assert code == 2
    assert "Model 'b' has non-finite values (NaN/inf) in tensor 'layer.bias'" in err
    assert not out_path.exists()


def test_dry_run_and_cfg_job(toy, capsys):
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "dry_run=true",
                              "merged_model_path=never.safetensors"], capsys)
    assert code == 0 and "nothing merged" in out
    assert not Path("never.safetensors").exists()
    code, out, err = run_cli(["--cfg", "job", "--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count",
                              "method=simple_average"], capsys)
    assert code == 0 and "name: simple_average" in out and "_pretrained_" in out


def test_multirun_sweep(toy, capsys):
    code, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "-m",
                              "method.scaling_factor=0.1,0.7"], capsys)
    assert code == 0, err
    reports = sorted((toy["root"] / "multirun").rglob("report.json"))
    assert len(reports) == 2
    lambdas = sorted(json.loads(r.read_text())["method"]["hyperparameters"]["scaling_factor"] for r in reports)
    assert lambdas == [0.1, 0.7]


def test_methods_subcommand(capsys):
    code, out, err = run_cli(["methods"], capsys)
    assert code == 0 and "task_arithmetic" in out
    code, out, err = run_cli(["methods", "task_arithmetic"], capsys)
    assert code == 0 and "scaling_factor" in out


def test_console_script_subprocess(toy):
    """The installed console command, as a user runs it."""
    exe = Path(sys.executable).with_name("fusion_bench")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fusion_bench.cli"]
    out_path = toy["root"] / "avg.safetensors"
    p = subprocess.run(cmd + ["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=simple_average",
                              f"merged_model_path={out_path}"], capture_output=True, text=True,
                       env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)
    assert p.returncode == 0, p.stderr
    merged = load_file(out_path)
    fts = [load_file(toy["models"] / f"{n}.safetensors") for n in "abc"]
    torch.testing.assert_close(merged["layer.weight"], sum(ft["layer.weight"] for ft in fts) / 3)
