"""Fault injection at the command line: every failure the user can cause is one `error:` line with
exit code 2, the inputs are unchanged and no run folder is left behind; our own bugs are one line
with exit code 1 (the traceback only with --debug); the dry run checks what the real run needs."""

import errno
import hashlib

import pytest
import torch
from safetensors.torch import save_file

from tests.test_cli import run_cli, toy  # noqa: F401  (fixture)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def nothing_left(root):
    assert not (root / "outputs").exists(), list((root / "outputs").rglob("*"))
    assert not (root / "multirun").exists()
    assert not list(root.glob("merged*")) and not list(root.glob(".merged*"))


def cli_fails(toy, capsys, args, needle, code=2):  # noqa: F811
    before = digest(toy["models"])
    got, _out, err = run_cli(["--config-dir", toy["cfg"], *args], capsys)
    assert got == code, err
    line = one_error(err)
    for n in ([needle] if isinstance(needle, str) else needle):
        assert n in line, line
    assert digest(toy["models"]) == before
    nothing_left(toy["root"])
    return line


@pytest.mark.parametrize("value", ["../../../../tmp/evil", "/etc/passwd", "..", "a/../../b"])
def test_config_group_name_cannot_leave_config_folders(toy, capsys, value):  # noqa: F811
    (toy["root"] / "evil.yaml").write_text("models:\n  a: x\n")
    cli_fails(toy, capsys, [f"modelpool={value}", "taskpool=count", "dry_run=true"],
              ["cannot leave the config folders", "--config-dir"])


def test_escape_in_a_sweep_value_is_refused(toy, capsys):  # noqa: F811
    cli_fails(toy, capsys, ["-m", "modelpool=toy,../../evil", "taskpool=count"], "cannot leave the config folders")


def test_yaml_syntax_error_is_one_line(toy, capsys):  # noqa: F811
    (toy["root"] / "cfg" / "modelpool" / "broken.yaml").write_text("models: [unclosed\n  a: {b\n")
    cli_fails(toy, capsys, ["modelpool=broken", "taskpool=count"], "error: ")


def test_missing_config_dir(toy, capsys, tmp_path):  # noqa: F811
    got, _, err = run_cli(["--config-dir", str(tmp_path / "absent"), "modelpool=toy"], capsys)
    assert got == 2 and "no such folder" in one_error(err)


def test_sweep_whose_second_value_is_invalid_fails_before_any_run(toy, capsys):  # noqa: F811
    line = cli_fails(toy, capsys, ["-m", "modelpool=toy", "taskpool=count", "method=task_arithmetic",
                                   "method.scaling_factor=0.3,abc", f"merged_model_path={toy['root'] / 'merged'}"],
                     "method.scaling_factor")
    assert "abc" in line


def test_dry_run_reads_every_tensor_and_names_an_infinite_one(toy, capsys):  # noqa: F811
    bad = dict(toy["base"])
    bad["layer.weight"] = bad["layer.weight"].clone()
    bad["layer.weight"][2, 1] = float("inf")
    save_file(bad, toy["models"] / "b.safetensors")
    cli_fails(toy, capsys, ["modelpool=toy", "taskpool=count", "method=simple_ensemble", "dry_run=true"],
              ["Model 'b'", "layer.weight", "inf"])


def test_dry_run_of_a_data_method_checks_its_datasets(toy, capsys):  # noqa: F811
    for method in ("fisher_merging", "regmean", "adamerging"):
        cli_fails(toy, capsys, ["modelpool=toy", "taskpool=count", f"method={method}", "dry_run=true"],
                  ["modelpool.datasets", method])


def test_dry_run_of_a_data_method_checks_the_split(toy, capsys):  # noqa: F811
    data = toy["root"] / "data.pt"
    torch.save({"x": 1}, data)
    cfg = toy["root"] / "cfg" / "modelpool" / "withdata.yaml"
    cfg.write_text((toy["root"] / "cfg" / "modelpool" / "toy.yaml").read_text() + "datasets:\n"
                   + "".join(f"  {n}:\n    validation: {toy['root'] / 'absent'}\n" for n in "abc"))
    cli_fails(toy, capsys, ["modelpool=withdata", "taskpool=count", "method=fisher_merging", "dry_run=true"],
              ["split 'train'", "modelpool.datasets.a"])


def test_dry_run_of_an_unreachable_hub_model(toy, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = toy["root"] / "cfg" / "modelpool" / "hub.yaml"
    cfg.write_text("models:\n  _pretrained_: fusion-bench-test/no-such-model\n"
                   f"  a: {toy['models'] / 'a.safetensors'}\n")
    cli_fails(toy, capsys, ["modelpool=hub", "taskpool=count", "method=simple_average", "dry_run=true"],
              ["Model '_pretrained_'", "fusion-bench-test/no-such-model"])


def test_dry_run_success_says_what_it_checked(toy, capsys):  # noqa: F811
    got, out, err = run_cli(["--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count", "method=ties_merging",
                             "dry_run=true"], capsys)
    assert got == 0, err
    assert "all finite" in out and "are valid; nothing merged" in out
    nothing_left(toy["root"])


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def test_os_errors_are_one_line_naming_the_path(toy, capsys, monkeypatch):  # noqa: F811
    import fusion_bench.programs.fusion as prog

    target = toy["root"] / "somewhere" / "model.safetensors"
    monkeypatch.setattr(prog, "run_program", _raise(OSError(errno.ENOSPC, "No space left on device", str(target))))
    line = cli_fails(toy, capsys, ["modelpool=toy", "taskpool=count"], [str(target), "ENOSPC", "free disk space"])
    assert "Traceback" not in line


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(toy, capsys, monkeypatch):  # noqa: F811
    import fusion_bench.programs.fusion as prog

    monkeypatch.setattr(prog, "run_program", _raise(RuntimeError("boom")))
    line = cli_fails(toy, capsys, ["modelpool=toy", "taskpool=count"], ["internal error", "boom", "--debug"], code=1)
    assert "bug in fusion_bench" in line
    # --debug sets FUSION_BENCH_DEBUG (and HYDRA_FULL_ERROR); monkeypatch restores both afterwards
    monkeypatch.setenv("FUSION_BENCH_DEBUG", "0")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    with pytest.raises(RuntimeError, match="boom"):
        run_cli(["--debug", "--config-dir", toy["cfg"], "modelpool=toy", "taskpool=count"], capsys)


def test_subcommand_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.yml").write_text("merge_method: linear\nmodels: [\n")
    got, _, err = run_cli(["mergekit", str(tmp_path / "m.yml"), str(tmp_path / "out")], capsys)
    assert got == 2, err
    one_error(err)
    assert not (tmp_path / "out").exists()


def test_merged_model_path_at_the_inputs_folder_is_refused(toy, capsys):  # noqa: F811
    for extra in ([], ["overwrite=true"]):
        cli_fails(toy, capsys, ["modelpool=toy", "taskpool=count", f"merged_model_path={toy['models']}", *extra],
                  ["existing folder", "merged.safetensors"])
        cli_fails(toy, capsys, ["modelpool=toy", "taskpool=count", f"merged_model_path={toy['models'] / 'a.safetensors'}",
                                *extra], ["a.safetensors"])


_SLOW_CLI = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background shell job ignores SIGINT
import sys, time
import safetensors.torch
real = safetensors.torch.save_file
def slow(sd, path, metadata=None):
    real(sd, path, metadata=metadata)
    print("writing", flush=True)
    time.sleep(60)
safetensors.torch.save_file = slow
from fusion_bench.cli import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_during_a_cli_run_leaves_nothing(toy, sig):  # noqa: F811
    """A real `fusion_bench` process stopped while it writes the merged model: one error line, the
    usual exit status, no temporary, no lock, no run folder, inputs unchanged."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = toy["root"]
    dest = root / "merged.safetensors"
    before = digest(toy["models"])
    repo = Path(__file__).resolve().parents[1]
    p = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, "--config-dir", toy["cfg"], "modelpool=toy",
                          "taskpool=count", f"merged_model_path={dest}"], cwd=root, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)})
    assert p.stdout.readline().strip() == "writing", p.stderr.read()
    assert [n for n in os.listdir(root) if "fusion_bench" in n]  # the temporary and the lock exist meanwhile
    p.send_signal(getattr(signal, sig))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + getattr(signal, sig), (p.returncode, err)
    assert one_error(err).startswith("error: ")
    assert not dest.exists() and not [n for n in os.listdir(root) if "fusion_bench" in n]
    nothing_left(root)
    assert digest(toy["models"]) == before
