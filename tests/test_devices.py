"""Devices (fusion_bench.engine.devices): device names, CPU fallback, placement across device slots, batch split,
mixed precision, and the rule that nothing outside the device helper spells a GPU device.

No GPU here: the multi-device code runs on several CPU slots (devices=[cpu, cpu, ...]: one replica and one thread
per slot, exactly the GPU code path) and must give the single-device results; the GPU-only branches (which GPU
indices exist) are tested by pretending torch sees two GPUs, without moving any tensor there.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fusion_bench.engine import devices as D
from fusion_bench.errors import ConfigError
from fusion_bench.models.ensemble import Ensemble
from fusion_bench.testing import tiny_pool_models

CPU = torch.device("cpu")


# -- names, fallback, precision ---------------------------------------------------------------------------------

def test_resolve_device_names_and_cpu_fallback(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(D, "_gpu_kind", lambda: None)
    assert D.resolve_device("auto") == CPU and D.resolve_device(None) == CPU and D.resolve_device("CPU") == CPU
    D._warned.clear()
    with pytest.warns(RuntimeWarning, match="no cuda device on this machine; running on the CPU"):
        assert D.resolve_device("cuda:1") == CPU
    with pytest.warns(RuntimeWarning, match="no mps device"):
        assert D.resolve_device("mps") == CPU
    with pytest.raises(ConfigError, match=r"device='gpu' is not a device.*Did you mean 'cpu'"):
        D.resolve_device("gpu")
    with pytest.raises(ConfigError, match=r"taskpool\.device='cuda:x'"):
        D.resolve_device("cuda:x", key="taskpool.device")
    from fusion_bench.utils import resolve_device  # the old helper delegates here

    assert resolve_device("auto") == CPU


def test_resolve_devices_lists_counts_and_auto_on_cpu(monkeypatch):
    monkeypatch.setattr(D, "_gpu_kind", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_devices("cpu", None) == [CPU]
    assert D.resolve_devices("cpu", []) == [CPU]
    assert D.resolve_devices("auto", ["cpu", "cpu", "cpu"]) == [CPU, CPU, CPU]
    assert D.resolve_devices("cpu", "auto") == [CPU] and D.resolve_devices("cpu", "all") == [CPU]
    D._warned.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert D.resolve_devices("auto", 2) == [CPU] and D.resolve_devices("auto", "2") == [CPU]
        assert D.resolve_devices("auto", ["cuda:0", "cuda:1"]) == [CPU, CPU]
    assert any("no GPU on this machine" in str(x.message) for x in w)
    with pytest.raises(ConfigError, match=r"devices\[1\]='tpu'"):
        D.resolve_devices("auto", ["cpu", "tpu"])
    with pytest.raises(ConfigError, match="devices=0 must be at least 1"):
        D.resolve_devices("auto", 0)
    with pytest.raises(ConfigError, match="not a device list"):
        D.resolve_devices("auto", "lots")


def test_gpu_branches_with_two_pretend_gpus(monkeypatch):
    """What a 2-GPU machine resolves (no tensor is moved: only names are checked)."""
    monkeypatch.setattr(D, "_gpu_kind", lambda: "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("auto") == torch.device("cuda")
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert D.resolve_devices("auto", "auto") == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert D.resolve_devices("auto", 1) == [torch.device("cuda", 0)]
    with pytest.raises(ConfigError, match=r"devices=3: this machine has 2 cuda device\(s\)"):
        D.resolve_devices("auto", 3)
    with pytest.raises(ConfigError, match=r"device=cuda:2: this machine has 2 cuda device\(s\) \(cuda:0 \.\. cuda:1\)"):
        D.resolve_device("cuda:2")


def test_peak_cuda_memory_counts_every_gpu(monkeypatch):
    """measure() resets and reads the peak of each visible GPU (pretend two; no tensor is moved)."""
    from fusion_bench.utils import measure

    reset, peaks = [], {0: 3 * 2**20, 1: 5 * 2**20}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d=None: reset.append(d))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda d=None: peaks[d])
    with measure() as m:
        pass
    assert reset == [0, 1]
    assert m.peak_cuda_bytes == 8 * 2**20 and m.as_dict()["peak_cuda_mb"] == 8.0
    assert m.extra["peak_cuda_bytes_per_device"] == [3 * 2**20, 5 * 2**20]


def test_parse_precision():
    assert [D.parse_precision(v) for v in (32, "32", "32-true", "float32", None)] == ["32"] * 5
    assert D.parse_precision("bf16") == D.parse_precision("bf16-mixed") == "bf16-mixed"
    assert D.parse_precision("16-mixed") == D.parse_precision(16) == "16-mixed"
    with pytest.raises(ConfigError, match=r"precision='fp8' is not a precision.*"):
        D.parse_precision("fp8")


# -- placement ------------------------------------------------------------------------------------------------

def test_round_robin_and_slot_assignment():
    a, b = torch.device("cuda", 0), torch.device("cuda", 1)
    assert D.round_robin(5, [a, b]) == [a, b, a, b, a]
    assert D.assign_slots(5, 2) == [[0], [1], [0], [1], [0]]  # members >= slots: round-robin
    assert D.assign_slots(1, 3) == [[0, 1, 2]]  # one model: its batch split over every slot
    assert D.assign_slots(2, 5) == [[0, 2, 4], [1, 3]]  # fewer members than slots: each member's share
    assert sorted(s for m in D.assign_slots(3, 7) for s in m) == list(range(7))  # every slot used once


def _x(n=23, seed=1):
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slots", [2, 3, 5])
def test_one_model_batch_split_equals_single_device(slots):
    net = tiny_pool_models(1, seed=3)["model_0"].eval()
    x = _x()
    with torch.no_grad():
        want = net(x)
    plan = D.DevicePlan([net], [CPU] * slots)
    assert plan.slots == [list(range(slots))] and plan.placements() == [["cpu"] * slots]
    assert len({id(plan._replicas[(0, s)]) for s in range(slots)}) == slots  # a replica per slot
    (got,) = plan.map(lambda i, m, xc: m(xc), x)
    # each example's row is computed from the same weights; only the batch is cut, so equal to float32 rounding
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert got.shape == want.shape
    plan.release()
    assert plan._replicas[(0, 0)] is net and len(plan._replicas) == 1


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_ensemble_members_round_robin_equals_single_device(slots):
    models = tiny_pool_models(3, seed=5)
    members = [models[f"model_{i}"].eval() for i in range(3)]
    x = _x(17)
    with torch.no_grad():
        want = [m(x) for m in members]
    plan = D.DevicePlan(members, [CPU] * slots)
    outs = plan.map(lambda i, m, xc: m(xc), x)
    for g, w in zip(outs, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)  # whole batch per member: bitwise equal
    assert plan.slots == D.assign_slots(3, slots)


def test_nested_outputs_are_gathered_in_batch_order():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 3)

        def forward(self, x):
            return {"logits": self.lin(x), "index": x[:, 0]}

    torch.manual_seed(0)
    net = TwoHeads()
    x = _x(10)
    (got,) = D.DevicePlan([net], [CPU, CPU, CPU]).map(lambda i, m, xc: m(xc), x)
    assert torch.equal(got["index"], x[:, 0])  # chunks back in order
    torch.testing.assert_close(got["logits"], net(x)["logits"], rtol=1e-6, atol=1e-6)


def test_ensemble_method_places_members_round_robin():
    from fusion_bench.methods import build_method
    from fusion_bench.modelpool.base import ModelPool

    models = tiny_pool_models(3, seed=4)
    plain = build_method("simple_ensemble").run(ModelPool(dict(models)))
    placed = build_method("simple_ensemble", devices=["cpu", "cpu"]).run(ModelPool(tiny_pool_models(3, seed=4)))
    assert placed.metadata["member_devices"] == ["cpu", "cpu", "cpu"]
    assert placed.model.member_devices == [CPU, CPU, CPU] and plain.model.member_devices is None
    x = _x(9)
    with torch.no_grad():
        torch.testing.assert_close(placed.model(x), plain.model(x), rtol=0, atol=0)
    with pytest.raises(ConfigError, match=r"method\.devices\[0\]='gpu0'"):
        build_method("simple_ensemble", devices=["gpu0"]).run(ModelPool(tiny_pool_models(2, seed=4)))


@pytest.mark.parametrize("method,opts", [("regmean", {}), ("fisher_merging", {"label_source": "dataset"})])
def test_data_methods_across_cpu_slots_equal_one_device(method, opts, monkeypatch):
    """Fisher and RegMean compute each model's statistics on its own slot (K models at once): same merge."""
    from fusion_bench.methods import _task_data, build_method

    waves = []
    parallel = _task_data._per_model_statistics_parallel

    def spy(*a, **k):
        waves.append(k["devices"])
        yield from parallel(*a, **k)

    monkeypatch.setattr(_task_data, "_per_model_statistics_parallel", spy)
    from tests.test_data_methods import make_pool, mlp

    base = mlp(0)
    models, data = {}, {}
    for i, t in enumerate("abcde"):  # five models on two slots: waves of 2, 2, 1
        models[t] = mlp(i + 1)
        g = torch.Generator().manual_seed(100 + i)
        data[t] = {"train": (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))}
    one = build_method(method, batch_size=5, **opts).run(make_pool(base, models, data))
    two = build_method(method, batch_size=5, devices=["cpu", "cpu"], **opts).run(make_pool(base, models, data))
    want, got = one.model.state_dict(), two.model.state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    assert not torch.equal(want["0.weight"], base.state_dict()["0.weight"])  # a real merge happened
    assert two.metadata["data_used"] == one.metadata["data_used"]
    assert waves == [[CPU, CPU]]  # the two-slot run took the threaded path


# -- mixed precision --------------------------------------------------------------------------------------------

def test_bf16_autocast_on_cpu_is_close_and_really_bf16():
    net = tiny_pool_models(1, seed=3)["model_0"].eval()
    x = _x(64)
    seen = []

    def fwd(i, m, xc):
        h = m.fc1(xc)
        seen.append(h.dtype)
        return m(xc).float()

    (exact,) = D.DevicePlan([net], [CPU]).map(fwd, x)
    (fast,) = D.DevicePlan([net], [CPU, CPU], precision="bf16-mixed").map(fwd, x)
    assert seen[0] == torch.float32 and set(seen[1:]) == {torch.bfloat16}  # autocast reached both slot threads
    # bfloat16 keeps 8 mantissa bits: relative error about 2**-8 per operation; two layers stay within 5e-2
    torch.testing.assert_close(fast, exact, rtol=5e-2, atol=5e-2)
    assert not torch.equal(fast, exact)
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.9


# -- task pools on several CPU slots ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    from tests.test_taskpool_clip import build_image_dataset, build_tiny_clip

    root = tmp_path_factory.mktemp("dev_clip")
    return {"root": root, "clip": build_tiny_clip(root / "clip"), "data": build_image_dataset(root / "data")}


def _clip_pool(setup, **kw):
    from tests.test_taskpool_clip import make_pool

    return make_pool(setup, **kw)


def test_clip_taskpool_across_cpu_slots_equals_one_device(clip_setup):
    from tests.test_taskpool_clip import perturbed_vision

    one = perturbed_vision(clip_setup["clip"], seed=3, scale=0.3)
    base = _clip_pool(clip_setup).evaluate(one)
    split = _clip_pool(clip_setup, devices=["cpu", "cpu", "cpu"]).evaluate(one)
    members = [perturbed_vision(clip_setup["clip"], seed=s, scale=0.3) for s in (3, 4, 5)]
    ens_base = _clip_pool(clip_setup).evaluate(Ensemble(members))
    ens_rr = _clip_pool(clip_setup, devices=["cpu", "cpu"]).evaluate(Ensemble(members))
    for got, want in ((split, base), (ens_rr, ens_base)):
        for task, m in want["tasks"].items():
            assert got["tasks"][task]["accuracy"] == m["accuracy"]
            assert got["tasks"][task]["loss"] == pytest.approx(m["loss"], rel=1e-6, abs=1e-7)
    assert ens_base["average"]["accuracy"] != base["average"]["accuracy"] or ens_base["average"]["loss"] != base[
        "average"]["loss"]  # the ensemble is a different model: the comparison above is not vacuous
    # bf16 autocast on CPU through the new precision name: close to float32 (same bound as the clip pool's own test)
    fast = _clip_pool(clip_setup, precision="bf16-mixed", devices=["cpu", "cpu"]).evaluate(one)
    for task, m in base["tasks"].items():
        assert fast["tasks"][task]["loss"] == pytest.approx(m["loss"], rel=0.05)
        assert abs(fast["tasks"][task]["accuracy"] - m["accuracy"]) <= 2 / 18


def test_image_classification_across_cpu_slots_equals_one_device(tmp_path):
    from transformers import CLIPImageProcessor, ViTConfig, ViTForImageClassification

    from fusion_bench.taskpool.image_classification import ImageClassificationTaskPool
    from tests.test_taskpool_clip import build_image_dataset

    data = build_image_dataset(tmp_path / "data", n_per_class=4)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "p")
    cfg = ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                    patch_size=8, num_labels=3)
    torch.manual_seed(0)
    vits = [ViTForImageClassification(cfg).eval() for _ in range(3)]

    def pool(**kw):
        return ImageClassificationTaskPool({"tasks": {"colors": str(data)}, "processor": str(tmp_path / "p"),
                                            "batch_size": 5, "device": "cpu", **kw})

    for model, devs in ((vits[0], ["cpu", "cpu"]), (Ensemble(vits, mode="max_confidence"), ["cpu", "cpu"]),
                        (Ensemble(vits[:2]), ["cpu"] * 4)):
        want = pool().evaluate(model)["tasks"]["colors"]
        got = pool(devices=devs).evaluate(model)["tasks"]["colors"]
        assert got["accuracy"] == want["accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
    with pytest.raises(ConfigError, match=r"taskpool\.precision='fp8' is not one of"):
        pool(precision="fp8")


def test_text_classification_across_cpu_slots_equals_one_device(tmp_path):
    """A tiny BERT with a head per task (built here): ensembles round-robin and one model's batches split over
    CPU slots give the one-device accuracy and loss."""
    import datasets
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    from fusion_bench.taskpool.text_classification import TextClassificationTaskPool

    words = ["good", "bad", "fine", "awful", "great", "poor", "nice", "dull"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizer(str(tmp_path / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=20, max_position_embeddings=32, num_labels=2)
    torch.manual_seed(0)
    head = BertForSequenceClassification(cfg)
    head.save_pretrained(tmp_path / "head")
    tok.save_pretrained(tmp_path / "head")
    rng = torch.Generator().manual_seed(1)
    texts = [" ".join(words[int(i)] for i in torch.randint(0, 8, (int(n),), generator=rng))
             for n in torch.randint(1, 7, (23,), generator=rng)]  # lengths 1..6: padding differs per batch
    labels = [int(v) for v in torch.randint(0, 2, (23,), generator=rng)]
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"sentence": texts, "label": labels})}).save_to_disk(
        str(tmp_path / "data"))
    backbones = []
    for s in range(3):
        torch.manual_seed(10 + s)
        backbones.append(BertModel(cfg, add_pooling_layer=True).eval())

    def pool(**kw):
        return TextClassificationTaskPool({"tasks": {"t": {"dataset": str(tmp_path / "data"), "head": str(tmp_path / "head"),
                                                           "text_fields": ["sentence"]}},
                                           "batch_size": 8, "device": "cpu", **kw})

    wants = []
    for model, devs in ((backbones[0], ["cpu", "cpu", "cpu"]), (Ensemble(backbones), ["cpu", "cpu"])):
        want = pool().evaluate(model)["tasks"]["t"]
        got = pool(devices=devs).evaluate(model)["tasks"]["t"]
        assert got["accuracy"] == want["accuracy"]
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-6, abs=1e-7)
        wants.append(want)
    assert wants[0]["loss"] != wants[1]["loss"]  # two different models were compared
    fast = pool(precision="bf16-mixed").evaluate(backbones[0])["tasks"]["t"]
    assert fast["loss"] == pytest.approx(wants[0]["loss"], rel=0.05)


def test_run_wide_options_reach_taskpool_and_ensemble():
    from fusion_bench.config_schema import build_config
    from fusion_bench.programs.fusion import ProgramConfig

    cfg = build_config(ProgramConfig, {"device": "cpu", "devices": ["cpu", "cpu"], "precision": "bf16-mixed",
                                       "method": {"name": "simple_ensemble"},
                                       "taskpool": {"type": "clip_zeroshot", "device": "auto", "precision": "float32"}})
    method, taskpool = D.run_device_options(cfg)
    assert method == {"name": "simple_ensemble", "devices": ["cpu", "cpu"]}
    assert taskpool["device"] == "cpu" and taskpool["devices"] == ["cpu", "cpu"] and taskpool["precision"] == "bf16-mixed"
    own = build_config(ProgramConfig, {"devices": ["cpu", "cpu"], "method": {"name": "task_arithmetic"},
                                       "taskpool": {"type": "clip_zeroshot", "device": "cpu", "devices": ["cpu"]}})
    method, taskpool = D.run_device_options(own)
    assert "devices" not in method  # task arithmetic has no devices option
    assert taskpool["devices"] == ["cpu"] and taskpool["device"] == "cpu"  # the pool's own choice stays
    with pytest.raises(ConfigError, match=r"precision='fp8' is not one of"):
        build_config(ProgramConfig, {"precision": "fp8"})


# -- nothing hard-codes a GPU -------------------------------------------------------------------------------------

#: the one module allowed to name GPU backends as device strings
ALLOWED = {"engine/devices.py"}
_GPU_DEVICE = ("cuda", "mps", "xpu")


def _violations(src: str) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            name = node.value.strip().lower()
            if name.split(":")[0] in _GPU_DEVICE and (":" not in name or name.split(":", 1)[1].isdigit()):
                out.append(f"line {node.lineno}: device string {node.value!r}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("cuda", "mps"):
            out.append(f"line {node.lineno}: .{node.func.attr}() call")
    return out


def test_scanner_finds_hard_coded_devices():
    bad = 'x.to("cuda")\ny = torch.device("cuda:1")\nz = m.cuda()\nd = {"device": "mps"}\nok = "cuda is nice"\n'
    assert len(_violations(bad)) == 4


def test_no_hard_coded_gpu_devices_in_the_package():
    root = Path(D.__file__).resolve().parents[1]  # the fusion_bench package folder
    found = []
    files = sorted(root.rglob("*.py"))
    assert len(files) > 100 and (root / "engine" / "devices.py") in files
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel in ALLOWED:
            continue
        found += [f"{rel} {v}" for v in _violations(path.read_text())]
    assert not found, "hard-coded GPU devices (ask fusion_bench.engine.devices instead):\n" + "\n".join(found)
