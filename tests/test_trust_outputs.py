"""Outputs never destroy anything: existing destinations, inputs, concurrent runs, disk errors, signals.

One test per fault class. Each checks the error message, that the inputs are byte-for-byte unchanged
and that nothing is left beside the destination (no temporary, no lock file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fusion_bench.cli import main as cli_main
from fusion_bench.errors import CheckpointError
from fusion_bench.io.atomic import atomic_dir
from fusion_bench.io.outputs import (
    MARKER,
    OutputExistsError,
    OutputLockedError,
    acquire_lock,
    is_fusion_bench_output,
    lock_path,
    output_dir,
    release_lock,
)
from fusion_bench.programs.fusion import run_program
from tests.conftest import make_toy

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def toy(tmp_path, monkeypatch):
    """A state-dict pool (base + 2 models) as .safetensors files, and a run config writing beside it."""
    monkeypatch.chdir(tmp_path)
    return make_toy(tmp_path, "ab")


def run(pool, **kw):
    cfg = {"method": {"name": "simple_average"}, "modelpool": pool, "taskpool": {}, "evaluate": False,
           "print_table": False, "engine": "memory", **kw}
    return run_program(cfg, log=lambda *a: None)


def cli(args, capsys):
    code = 0
    try:
        cli_main(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def tree_hash(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporaries and lock files anywhere under ``folder``."""
    return sorted(p.name for p in folder.rglob("*") if "fusion_bench-tmp" in p.name or p.name.endswith(".fusion_bench.lock"))


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1, err
    return lines[0]


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture(scope="module")
def hfzoo(tmp_path_factory):
    from tests.test_streaming_helpers import save_zoo

    return save_zoo(tmp_path_factory.mktemp("trustzoo") / "zoo", "llama", n=2, dtype=torch.float32, tokenizer=False)


def mergekit_yaml(tmp_path: Path, zoo: dict[str, str]) -> str:
    doc = {"merge_method": "linear", "dtype": "float32",
           "models": [{"model": zoo["ft0"], "parameters": {"weight": 0.5}},
                      {"model": zoo["ft1"], "parameters": {"weight": 0.5}}]}
    p = tmp_path / "merge.yml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(p)


# ----------------------------------------------------------------------------------------------
# existing destinations
# ----------------------------------------------------------------------------------------------
def test_existing_folder_refused(hfzoo, tmp_path, capsys):
    zoo_root = Path(hfzoo["ft0"]).parent
    before = tree_hash(zoo_root)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    code, _, err = cli(["mergekit", mergekit_yaml(tmp_path, hfzoo), str(out)], capsys)
    assert code == 2
    assert f"The merged model folder {out} already exists; choose another path, or pass --overwrite to replace " \
           "an output that fusion_bench wrote." in one_line(err)
    assert sorted(os.listdir(out)) == ["mine.txt"] and (out / "mine.txt").read_text() == "user data"
    assert tree_hash(zoo_root) == before
    assert leftovers(tmp_path) == [] and leftovers(zoo_root) == []


def test_existing_file_refused(toy, capsys):
    out = toy["root"] / "merged.safetensors"
    out.write_bytes(b"precious")
    rep = toy["root"] / "report.json"
    before = tree_hash(toy["models"])
    with pytest.raises(OutputExistsError) as ei:
        run(toy["pool"], merged_model_path=str(out), report_path=str(rep))
    assert str(ei.value) == (f"The merged model {out} already exists; choose another path, or pass overwrite=true "
                             "to replace an output that fusion_bench wrote.")
    assert out.read_bytes() == b"precious" and not rep.exists()
    # the report too, checked before any merging
    rep.write_text('{"mine": 1}')
    with pytest.raises(OutputExistsError, match=f"The report {rep} already exists"):
        run(toy["pool"], merged_model_path=str(toy["root"] / "new.safetensors"), report_path=str(rep))
    assert rep.read_text() == '{"mine": 1}' and not (toy["root"] / "new.safetensors").exists()
    assert tree_hash(toy["models"]) == before and leftovers(toy["root"]) == []


def test_overwrite_replaces_a_marked_output(toy, hfzoo, tmp_path, capsys):
    out = toy["root"] / "merged.safetensors"
    rep = toy["root"] / "report.json"
    before = tree_hash(toy["models"])
    run(toy["pool"], merged_model_path=str(out), report_path=str(rep))
    assert is_fusion_bench_output(out) and is_fusion_bench_output(rep)
    first = out.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):  # marked, but overwrite not given
        run(toy["pool"], merged_model_path=str(out), report_path=str(rep))
    run({**toy["pool"], "models": {k: v for k, v in toy["pool"]["models"].items() if k != "b"}},
        merged_model_path=str(out), report_path=str(rep), overwrite=True)
    assert out.read_bytes() != first and set(load_file(out)) == {"layer.weight", "layer.bias"}
    assert json.loads(rep.read_text())["config"]["overwrite"] is True
    assert tree_hash(toy["models"]) == before and leftovers(toy["root"]) == []
    # a folder written by the mergekit CLI carries the marker and is replaced with --overwrite
    folder = tmp_path / "mk"
    cfg = mergekit_yaml(tmp_path, hfzoo)
    assert cli(["mergekit", cfg, str(folder)], capsys)[0] == 0
    assert json.loads((folder / MARKER).read_text())["tool"] == "fusion_bench"
    (folder / "stale.txt").write_text("from the first run")
    code, _, err = cli(["mergekit", cfg, str(folder), "--overwrite"], capsys)
    assert code == 0, err
    assert not (folder / "stale.txt").exists() and (folder / "model.safetensors").exists()
    assert cli(["mergekit", cfg, str(tmp_path / "mk2"), "--no-overwrite"], capsys)[0] == 0  # old flag: a no-op
    assert leftovers(tmp_path) == []


def test_overwrite_refuses_an_unmarked_folder(hfzoo, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's model")
    code, _, err = cli(["mergekit", mergekit_yaml(tmp_path, hfzoo), str(out), "--overwrite"], capsys)
    assert code == 2
    assert f"Refusing to replace {out} with the merged model folder: fusion_bench did not write it (no {MARKER} " \
           "file inside), so --overwrite does not apply; choose another path, or move it away yourself." in one_line(err)
    assert (out / "model.safetensors").read_bytes() == b"someone else's model"
    assert leftovers(tmp_path) == []


def test_overwrite_never_replaces_inputs(toy, hfzoo, tmp_path, capsys):
    models = toy["models"]
    before = tree_hash(models)
    # the folder holding the inputs, even when it carries our marker
    (models / MARKER).write_text(json.dumps({"tool": "fusion_bench"}))
    with pytest.raises(OutputExistsError) as ei:
        run(toy["pool"], merged_model_path=str(models / "x.safetensors"), report_path=str(models), overwrite=True)
    assert str(ei.value) == (f"Refusing to write the report to {models}: it holds the input '_pretrained_' "
                             f"({models / 'base.safetensors'}) of this run; choose another path (overwrite=true never "
                             "replaces inputs).")
    # a parent of the inputs
    with pytest.raises(OutputExistsError, match=f"Refusing to write the report to {toy['root']}: it holds the input"):
        run(toy["pool"], report_path=str(toy["root"]), overwrite=True)
    # an input itself (a file, made to look like our output)
    with pytest.raises(OutputExistsError) as ei:
        run(toy["pool"], merged_model_path=str(models / "a.safetensors"), overwrite=True)
    assert str(ei.value).startswith(f"Refusing to write the merged model to {models / 'a.safetensors'}: it is the "
                                    f"input 'a' ({models / 'a.safetensors'}) of this run")
    (models / MARKER).unlink()
    assert tree_hash(models) == before and leftovers(toy["root"]) == []
    # the streaming engine / mergekit: OUT_DIR = the folder of an input model
    zoo_root = Path(hfzoo["ft0"]).parent
    zbefore = tree_hash(zoo_root)
    code, _, err = cli(["mergekit", mergekit_yaml(tmp_path, hfzoo), str(zoo_root), "--overwrite"], capsys)
    assert code == 2 and f"Refusing to write the merged model folder to {zoo_root}: it holds the input" in one_line(err)
    code, _, err = cli(["mergekit", mergekit_yaml(tmp_path, hfzoo), hfzoo["ft1"], "--overwrite"], capsys)
    assert code == 2 and "it is the input" in err
    assert tree_hash(zoo_root) == zbefore and leftovers(zoo_root) == [] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------------
# concurrency and stale state
# ----------------------------------------------------------------------------------------------
def test_concurrent_run_gets_lock_error(toy):
    out = toy["root"] / "merged.safetensors"
    before = tree_hash(toy["models"])
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from fusion_bench.io.outputs import acquire_lock
            acquire_lock({str(out)!r}, "merged model")
            print("held", flush=True)
            time.sleep(60)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputLockedError) as ei:
            run(toy["pool"], merged_model_path=str(out))
        msg = str(ei.value)
        assert msg.startswith(f"The merged model {out} is being written by another fusion_bench run (pid {holder.pid} on ")
        assert msg.endswith(f"lock {lock_path(out)}); wait for it to finish or choose another path.")
        assert not out.exists()
    finally:
        holder.kill()  # SIGKILL: its lock file stays, but the kernel drops the flock
        holder.wait()
    assert lock_path(out).exists()
    run(toy["pool"], merged_model_path=str(out))  # the dead run's lock is taken over
    assert out.exists() and tree_hash(toy["models"]) == before and leftovers(toy["root"]) == []
    # within one process the lock is re-entrant and released by the last holder
    acquire_lock(out)
    acquire_lock(out)
    release_lock(out)
    assert lock_path(out).exists()
    release_lock(out)
    assert not lock_path(out).exists()


def test_stale_temporaries_of_dead_pids_removed(toy):
    root = toy["root"]
    pid = dead_pid()
    stale_dir = root / f".merged.safetensors.fusion_bench-tmp-{pid}-0123abcd"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x" * 1000)
    stale_file = root / f".other.fusion_bench-tmp-{pid}-89abcdef"
    stale_file.write_bytes(b"y")
    legacy = root / f".old.tmp-{pid}-deadbeef"  # the naming of earlier versions
    legacy.mkdir()
    live = root / f".keep.fusion_bench-tmp-{os.getpid()}-00000000"  # a live process's: kept
    live.write_bytes(b"z")
    (root / f".gone{'.fusion_bench.lock'}").write_text(json.dumps({"pid": pid}))  # a lock nobody holds
    run(toy["pool"], merged_model_path=str(root / "merged.safetensors"))
    assert not stale_dir.exists() and not stale_file.exists() and not legacy.exists()
    assert not (root / ".gone.fusion_bench.lock").exists()
    assert live.exists()
    live.unlink()
    assert leftovers(root) == []


# ----------------------------------------------------------------------------------------------
# operating-system errors
# ----------------------------------------------------------------------------------------------
def test_parent_is_a_file(toy):
    blocker = toy["root"] / "afile"
    blocker.write_text("not a folder")
    before = tree_hash(toy["models"])
    with pytest.raises(CheckpointError) as ei:
        run(toy["pool"], merged_model_path=str(blocker / "merged.safetensors"))
    assert str(ei.value) == (f"Cannot write the merged model {blocker / 'merged.safetensors'}: File exists (errno "
                             "EEXIST); a parent of that path is a file, not a folder; choose another path.")
    assert "\n" not in str(ei.value)
    assert blocker.read_text() == "not a folder" and tree_hash(toy["models"]) == before
    assert leftovers(toy["root"]) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(toy):
    ro = toy["root"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(CheckpointError, match=r"Cannot write the merged model .*Permission denied.*check the write "
                                                  r"permission of"):
            run(toy["pool"], merged_model_path=str(ro / "merged.safetensors"))
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_read_only_filesystem_simulated(hfzoo, tmp_path, monkeypatch):
    """EROFS when the shards are created (the lock could be taken: e.g. another mount point)."""
    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool import build_modelpool

    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if "fusion_bench-tmp" in str(path) and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", ro_open)
    out = tmp_path / "out"
    pool = build_modelpool({"type": "causal_lm", "models": {"_pretrained_": hfzoo["_pretrained_"], "a": hfzoo["ft0"],
                                                            "b": hfzoo["ft1"]}})
    with pytest.raises(CheckpointError) as ei:
        merge_to_folder(build_method("task_arithmetic"), pool, out)
    assert str(ei.value) == (f"Cannot write the merged model {out}: Read-only file system (errno EROFS); the "
                             "filesystem is read-only; choose a writable path.")
    assert os.listdir(tmp_path) == []


def test_disk_full(toy, hfzoo, tmp_path, monkeypatch):
    """ENOSPC from the streaming engine's pwrite and from safetensors' save_file."""
    import safetensors.torch

    from fusion_bench.engine.streaming import merge_to_folder
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool import build_modelpool

    before = tree_hash(Path(hfzoo["ft0"]).parent)

    real_pwrite = os.pwrite

    def full(fd, data, offset):  # the tensor data of the shards (headers and the lock file go at offset 0)
        if offset > 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_pwrite(fd, data, offset)

    out = tmp_path / "out"
    pool = build_modelpool({"type": "causal_lm", "models": {"_pretrained_": hfzoo["_pretrained_"], "a": hfzoo["ft0"],
                                                            "b": hfzoo["ft1"]}})
    with monkeypatch.context() as m:
        m.setattr(os, "pwrite", full)
        with pytest.raises(CheckpointError) as ei:
            merge_to_folder(build_method("task_arithmetic"), pool, out)
    msg = f"Cannot write the merged model {out}: No space left on device (errno ENOSPC); free disk space (or quota) " \
          "on that filesystem, or choose a path on another disk."
    assert str(ei.value) == msg
    assert sorted(os.listdir(tmp_path)) == ["cfg", "models"]  # the toy pool's folders only
    assert tree_hash(Path(hfzoo["ft0"]).parent) == before

    # safetensors' writer reports the OS error inside its own exception type
    class SafetensorError(Exception):
        pass

    def full_rust(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    dest = toy["root"] / "merged.safetensors"
    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", full_rust)
        with pytest.raises(CheckpointError) as ei:
            run(toy["pool"], merged_model_path=str(dest))
    assert str(ei.value) == msg.replace(f"model {out}", f"model {dest}")
    assert not dest.exists() and leftovers(toy["root"]) == []


# ----------------------------------------------------------------------------------------------
# real signals
# ----------------------------------------------------------------------------------------------
_SLOW_SAVE = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background shell job ignores SIGINT
import json, sys, time
import safetensors.torch
real = safetensors.torch.save_file
def slow(sd, path, metadata=None):
    real(sd, path, metadata=metadata)
    print("writing", flush=True)
    time.sleep(60)
safetensors.torch.save_file = slow
from fusion_bench.programs.fusion import run_program
run_program({{"method": {{"name": "simple_average"}}, "modelpool": json.loads({pool!r}), "taskpool": {{}},
             "evaluate": False, "print_table": False, "engine": "memory", "merged_model_path": {dest!r}}},
            log=lambda *a: None)
"""

_SLOW_STREAM = """
import signal
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background shell job ignores SIGINT
import json, time
import torch
from fusion_bench.engine.streaming import merge_to_folder
from fusion_bench.methods.base import TensorwiseMerge
from fusion_bench.modelpool import build_modelpool

class Slow(TensorwiseMerge):
    name = "slow_test_only"
    variant = "test"
    elementwise = True
    def merge_tensor(self, key, base, tensors, names):
        print("writing", flush=True)
        time.sleep(0.5)
        return tensors[0]

pool = build_modelpool({{"type": "causal_lm", "models": json.loads({pool!r})}})
merge_to_folder(Slow(), pool, {dest!r}, workers=1)
"""


def _start(script: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = p.stdout.readline()
    if line.strip() != "writing":
        p.kill()
        raise AssertionError(f"child did not start writing: {line!r} {p.stderr.read()}")
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_removes_temporaries(toy, hfzoo, sig):
    root = toy["root"]
    if sig == signal.SIGTERM:  # in-memory engine, file output
        dest = root / "merged.safetensors"
        script = _SLOW_SAVE.format(pool=json.dumps(toy["pool"]), dest=str(dest))
    else:  # streaming engine, folder output
        dest = root / "merged"
        models = {"_pretrained_": hfzoo["_pretrained_"], "a": hfzoo["ft0"], "b": hfzoo["ft1"]}
        script = _SLOW_STREAM.format(pool=json.dumps(models), dest=str(dest))
    before = tree_hash(toy["models"])
    p = _start(script)
    assert leftovers(root) != []  # the temporary and the lock exist while it writes
    p.send_signal(sig)
    p.wait(timeout=30)
    assert p.returncode == -sig or p.returncode == 128 + sig, (p.returncode, p.stderr.read())
    assert not dest.exists() and leftovers(root) == []
    assert tree_hash(toy["models"]) == before


def test_sigkill_then_later_run_cleans_up(toy):
    root = toy["root"]
    dest = root / "merged.safetensors"
    p = _start(_SLOW_SAVE.format(pool=json.dumps(toy["pool"]), dest=str(dest)))
    p.kill()
    p.wait(timeout=30)
    left = leftovers(root)
    assert any(f".fusion_bench-tmp-{p.pid}-" in n for n in left) and lock_path(dest).name in left
    assert not dest.exists()
    run(toy["pool"], merged_model_path=str(dest))
    assert is_fusion_bench_output(dest) and leftovers(root) == []


def test_cache_writers_keep_replacing(tmp_path):
    """Tool-owned caches (atomic_dir) still replace their own entries, with the new temporary names."""
    dest = tmp_path / "entry"
    with atomic_dir(dest) as tmp:
        assert ".fusion_bench-tmp-" in tmp.name
        (tmp / "a").write_text("1")
    with atomic_dir(dest) as tmp:
        (tmp / "b").write_text("2")
    assert os.listdir(dest) == ["b"] and os.listdir(tmp_path) == ["entry"]
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))
    # handlers are installed only while a write is in progress
    with output_dir(tmp_path / "o") as tmp:
        assert signal.getsignal(signal.SIGTERM).__name__ == "_on_signal"
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "_on_signal"
    assert (tmp_path / "o" / MARKER).exists()


def test_dry_run_checks_outputs(toy):
    out = toy["root"] / "merged.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match=f"The merged model {out} already exists"):
        run(toy["pool"], merged_model_path=str(out), dry_run=True)
    rep = run(toy["pool"], merged_model_path=str(toy["root"] / "new.safetensors"), dry_run=True)
    assert any("output(s) may be written" in c for c in rep["plan"]["checked"])
    assert out.read_bytes() == b"precious" and leftovers(toy["root"]) == []
    assert not (toy["root"] / "new.safetensors").exists()


def test_zoo_builds_remove_only_dead_fusion_bench_temporaries(tmp_path):
    """A zoo root may be any folder the user names: a build removes only fusion_bench's own temporaries of
    processes that are gone, never a user's file that merely looks like one."""
    import subprocess

    from fusion_bench.benchmark.zoo import remove_stale_in

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    user = tmp_path / ".notes.tmp-draft"
    user.write_text("mine")
    mine_alive = tmp_path / f".entry.fusion_bench-tmp-{os.getpid()}-0123abcd"
    mine_alive.mkdir()
    stale = tmp_path / f".entry.fusion_bench-tmp-{dead.pid}-89abcdef"
    stale.mkdir()
    remove_stale_in(tmp_path)
    assert user.read_text() == "mine" and mine_alive.is_dir() and not stale.exists()


def test_per_task_results_are_saved_as_one_folder(toy, tmp_path):
    """A one-model-per-task result (EMR) given merged_model_path writes every task's model under that folder,
    atomically and marked as ours (a second run without overwrite is refused); each file holds the method's
    model for that task."""
    from safetensors.torch import load_file

    from fusion_bench.methods import build_method
    from fusion_bench.modelpool import build_modelpool

    out = tmp_path / "per_task"
    rep = run(toy["pool"], method={"name": "emr_merging"}, merged_model_path=str(out))
    assert rep["result_kind"] == "per_task" and set(rep["per_task_model_paths"]) == {"a", "b"}
    ref = build_method({"name": "emr_merging"}).run(build_modelpool(toy["pool"])).models
    for task in ("a", "b"):
        got = load_file(str(out / f"{task}.safetensors"))
        want = ref[task].state_dict()
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in got)
    assert (out / ".fusion_bench_output").exists()
    with pytest.raises(OutputExistsError):
        run(toy["pool"], method={"name": "emr_merging"}, merged_model_path=str(out))
    rep = run(toy["pool"], method={"name": "simple_ensemble"}, merged_model_path=str(tmp_path / "ens"))
    assert rep["merged_model_path"] is None and "nothing was saved" in rep["merged_model_path_note"]
