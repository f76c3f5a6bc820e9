"""Continual merging (issue 15): each method against a naive reference written from its paper / reference code
on small tensors, the O(1) state, and the continual program (per-step evaluation, BWT, plot, CLI)."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from fusion_bench.errors import ConfigError
from fusion_bench.methods import build_method, list_methods
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.taskpool.base import TaskPool, TaskPoolConfig, register_taskpool
from fusion_bench.testing.check_method import TinyNet, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CONTINUAL = ["opcm", "dop", "continual_task_arithmetic", "continual_ties_merging", "continual_weight_average",
             "continual_magmax"]


def _models(n: int, dtype=torch.float64, seed: int = 0, scale: float = 0.05) -> dict[str, torch.nn.Module]:
    base = tiny_model(seed)
    out = {"_pretrained_": base}
    for i in range(n):
        out[f"task_{i}"] = tiny_model(seed + 11 + i, base, scale=scale)
    return {k: copy.deepcopy(v).to(dtype) for k, v in out.items()}


def _np(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


LINEAR = {"fc1.weight", "fc2.weight"}


def _steps(method: str, models: dict, **cfg) -> list[dict[str, np.ndarray]]:
    m = build_method({"name": method, **cfg})
    order = [k for k in models if k != "_pretrained_"]
    return [_np(mm) for _, _, mm in m.steps(ModelPool(models), order)]


def _gnorm(d: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float((v ** 2).sum()) for v in d.values()))


# ----------------------------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------------------------
def ref_opcm_project(prev_tv: np.ndarray, tau: np.ndarray, alpha: float) -> np.ndarray:
    """Sum over the pairs (i, j) of <tau, u_i v_j^T> u_i v_j^T, leaving out i == j and i, j < r (the paper's
    projection in the full SVD basis of the previous merged task vector)."""
    u, s, vh = np.linalg.svd(prev_tv, full_matrices=True)
    shares = np.cumsum(s) / s.sum()
    r = next((i for i, c in enumerate(shares) if c > alpha), 0)
    out = np.zeros_like(tau)
    for i in range(u.shape[1]):
        for j in range(vh.shape[0]):
            if i == j or (i < r and j < r):
                continue
            ui, vj = u[:, i], vh[j]
            out += float(ui @ tau @ vj) * np.outer(ui, vj)
    return out


def ref_opcm(models: dict, alpha: float) -> list[dict[str, np.ndarray]]:
    """OPCM as the reference code writes it: lambda_t bookkeeping on the merged task vector."""
    pre = _np(models["_pretrained_"])
    seq = [_np(v) for k, v in models.items() if k != "_pretrained_"]
    merged = seq[0]
    norms = [_gnorm({k: seq[0][k] - pre[k] for k in pre})]
    prev_lam = 1.0
    out = [merged]
    for m in seq[1:]:
        norms.append(_gnorm({k: m[k] - pre[k] for k in pre}))
        avg = sum(norms) / len(norms)
        new = {}
        for k in pre:
            prev_tv, tau = merged[k] - pre[k], m[k] - pre[k]
            clean = ref_opcm_project(prev_tv, tau, alpha) if k in LINEAR else tau
            new[k] = prev_lam * prev_tv + clean
        n = _gnorm(new)
        prev_lam = n / avg
        merged = {k: pre[k] + new[k] * avg / n for k in pre}
        out.append(merged)
    return out


def ref_dop_weight(w0, wm, wn, *, lr, steps, alpha, beta, eps, mgda=True, ema=True, space="uv"):
    """DOP's layer optimisation with closed-form gradients, the two-point min-norm rule and a hand-written Adam."""
    targets = [wm, wn]
    subs = []
    for t in targets:
        u, s, vh = np.linalg.svd(t - w0, full_matrices=True)
        shares = np.cumsum(s) / s.sum()
        k = int(sum(1 for c in shares if c < eps))
        subs.append((u[:, :k], s[:k], vh[:k].T))
    w = (wm + wn) / 2
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    c = [alpha, 1 - alpha]
    for it in range(1, steps + 1):
        losses, grads = [], []
        for t, (u, s, vv) in zip(targets, subs):
            d = w - t
            loss, g = 0.0, np.zeros_like(w)
            if "u" in space:
                loss += float(((np.diag(s) @ u.T @ d) ** 2).sum())
                g += 2 * u @ np.diag(s ** 2) @ u.T @ d
            if "v" in space:
                loss += float(((d @ vv @ np.diag(s)) ** 2).sum())
                g += 2 * d @ vv @ np.diag(s ** 2) @ vv.T
            losses.append(loss)
            grads.append(g)
        if mgda:
            n1, n2 = grads[0] / losses[0], grads[1] / losses[1]
            a, b, cc = float((n1 * n1).sum()), float((n1 * n2).sum()), float((n2 * n2).sum())
            gamma = 0.999 if b >= a else (0.001 if b >= cc else (cc - b) / (a + cc - 2 * b))
            sol = [gamma, 1 - gamma]
            if ema:
                c = [beta * ci + (1 - beta) * si for ci, si in zip(c, sol)]
                sol = c
        else:
            sol = c
        g = sol[0] * grads[0] + sol[1] * grads[1]
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - lr * (m / (1 - 0.9 ** it)) / (np.sqrt(v / (1 - 0.999 ** it)) + 1e-8)
    return w


def ref_ties_rows(rows: np.ndarray, threshold: float) -> np.ndarray:
    k = threshold / 100
    trimmed = []
    for r in rows:
        d = r.size
        cut = np.sort(np.abs(r))[d - int(d * k) - 1]
        trimmed.append(np.where(np.abs(r) >= cut, r, 0.0))
    trimmed = np.stack(trimmed)
    sign = np.sign(trimmed.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    out = np.zeros(rows.shape[1])
    for j in range(rows.shape[1]):
        for i in range(rows.shape[0]):
            x = trimmed[i, j]
            if (sign[j] > 0 and x > 0) or (sign[j] <= 0 and x < 0):
                out[j] += x
    return out


# ----------------------------------------------------------------------------------------------
# methods against their references
# ----------------------------------------------------------------------------------------------
def test_registered_as_continual_family():
    assert sorted(list_methods("continual")) == sorted(CONTINUAL)


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_opcm_projection_equals_pairwise_reference(alpha):
    from fusion_bench.kernels.continual.opcm import opcm_project

    g = torch.Generator().manual_seed(1)
    for shape in [(6, 4), (4, 7), (5, 5)]:
        prev = torch.randn(*shape, generator=g, dtype=torch.float64)
        tau = torch.randn(*shape, generator=g, dtype=torch.float64)
        got = opcm_project(prev, tau, alpha).numpy()
        np.testing.assert_allclose(got, ref_opcm_project(prev.numpy(), tau.numpy(), alpha), atol=1e-10)
        # the result has no component along the previous update's own directions u_i v_i^T
        u, _, vh = np.linalg.svd(prev.numpy())
        assert max(abs(float(u[:, i] @ got @ vh[i])) for i in range(min(shape))) < 1e-10


def test_opcm_sequence_equals_reference_code_bookkeeping():
    models = _models(5)
    got = _steps("opcm", models, alpha=0.5)
    want = ref_opcm(models, 0.5)
    assert len(got) == 5
    for g, w in zip(got, want):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], atol=1e-9, err_msg=k)
    # the merged task vector keeps the mean norm of the task vectors seen (adaptive scaling)
    pre = _np(models["_pretrained_"])
    taus = [_gnorm({k: _np(models[f"task_{i}"])[k] - pre[k] for k in pre}) for i in range(5)]
    assert _gnorm({k: got[-1][k] - pre[k] for k in pre}) == pytest.approx(sum(taus) / 5, rel=1e-9)


def test_dop_layer_equals_hand_written_adam_reference():
    from fusion_bench.kernels.continual.dop import dop_merge_weight

    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(6, 5, generator=g, dtype=torch.float64)
    wm = w0 + 0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    wn = w0 + 0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    for kw in [dict(mgda=True, ema=True, space="uv", beta=0.9, eps=0.95), dict(mgda=True, ema=False, space="u",
               beta=0.9, eps=0.99999), dict(mgda=False, ema=True, space="v", beta=0.9, eps=0.8)]:
        got = dop_merge_weight(w0, wm, wn, lr=1e-2, steps=25, mgda=kw["mgda"], ema=kw["ema"], alpha=0.7,
                               ema_beta=kw["beta"], epsilon=kw["eps"], proj_space=kw["space"]).numpy()
        want = ref_dop_weight(w0.numpy(), wm.numpy(), wn.numpy(), lr=1e-2, steps=25, alpha=0.7, beta=kw["beta"],
                              eps=kw["eps"], mgda=kw["mgda"], ema=kw["ema"], space=kw["space"])
        np.testing.assert_allclose(got, want, atol=1e-9, err_msg=str(kw))
        assert np.abs(got - (wm.numpy() + wn.numpy()) / 2).max() > 1e-3  # it moved


def test_dop_method_linear_by_reference_others_averaged():
    models = _models(3)
    cfg = dict(lr=1e-2, num_steps=10, ema_beta=0.9)
    got = _steps("dop", models, **cfg)
    pre = _np(models["_pretrained_"])
    seq = [_np(models[f"task_{i}"]) for i in range(3)]
    merged = seq[0]
    for k in merged:
        np.testing.assert_allclose(got[0][k], merged[k], atol=0)
    for t in (1, 2):
        new = {}
        for k in pre:
            if k in LINEAR:
                new[k] = ref_dop_weight(pre[k], merged[k], seq[t][k], lr=1e-2, steps=10, alpha=0.8, beta=0.9,
                                        eps=0.99999)
            else:
                new[k] = (merged[k] + seq[t][k]) / 2
        merged = new
        for k in merged:
            np.testing.assert_allclose(got[t][k], merged[k], atol=1e-9, err_msg=f"step {t + 1} {k}")


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_continual_task_arithmetic_is_task_arithmetic_of_the_prefix(lam):
    models = _models(4)
    got = _steps("continual_task_arithmetic", models, scaling_factor=lam)
    pre = _np(models["_pretrained_"])
    for t in range(4):
        for k in pre:
            want = pre[k] + lam * sum(_np(models[f"task_{i}"])[k] - pre[k] for i in range(t + 1))
            np.testing.assert_allclose(got[t][k], want, atol=1e-12)


def test_continual_weight_average_is_the_running_mean():
    models = _models(4)
    got = _steps("continual_weight_average", models)
    for t in range(4):
        for k in got[t]:
            want = sum(_np(models[f"task_{i}"])[k] for i in range(t + 1)) / (t + 1)
            np.testing.assert_allclose(got[t][k], want, atol=1e-12)


def test_continual_magmax_keeps_the_max_magnitude_entry_seen():
    models = _models(4)
    # a magnitude tie of opposite signs in one entry: the larger signed value wins, whatever the order
    with torch.no_grad():
        pre_w = models["_pretrained_"].fc1.weight[0, 0].item()
        models["task_1"].fc1.weight[0, 0] = pre_w - 1.0
        models["task_2"].fc1.weight[0, 0] = pre_w + 1.0
    got = _steps("continual_magmax", models, scaling_factor=0.5)
    pre = _np(models["_pretrained_"])
    for t in range(4):
        taus = [_np(models[f"task_{i}"]) for i in range(t + 1)]
        for k in pre:
            flat = [(m[k] - pre[k]).reshape(-1) for m in taus]
            best = np.empty_like(flat[0])
            for j in range(best.size):
                vals = [f[j] for f in flat]
                top = max(abs(v) for v in vals)
                best[j] = max(v for v in vals if abs(v) == top)
            np.testing.assert_allclose(got[t][k], pre[k] + 0.5 * best.reshape(pre[k].shape), atol=1e-12)
    assert got[3]["fc1.weight"][0, 0] == pytest.approx(pre["fc1.weight"][0, 0] + 0.5 * 1.0)


def test_continual_ties_follows_the_two_row_reference():
    models = _models(3)
    got = _steps("continual_ties_merging", models, scaling_factor=0.5, threshold=20)
    pre = _np(models["_pretrained_"])
    keys = sorted(pre)
    merged_tv = {k: 0.5 * (_np(models["task_0"])[k] - pre[k]) for k in keys}
    for k in keys:
        np.testing.assert_allclose(got[0][k], pre[k] + merged_tv[k], atol=1e-12)
    for t in (1, 2):
        tau = {k: _np(models[f"task_{t}"])[k] - pre[k] for k in keys}
        rows = np.stack([np.concatenate([merged_tv[k].ravel() for k in keys]),
                         np.concatenate([tau[k].ravel() for k in keys])])
        ties = ref_ties_rows(rows, 20)
        off = 0
        for k in keys:
            n = merged_tv[k].size
            merged_tv[k] = merged_tv[k] + 0.5 * ties[off:off + n].reshape(merged_tv[k].shape)
            off += n
        for k in keys:
            np.testing.assert_allclose(got[t][k], pre[k] + merged_tv[k], atol=1e-12, err_msg=f"step {t + 1} {k}")


@pytest.mark.parametrize("name", CONTINUAL)
def test_each_step_equals_a_fresh_run_on_the_prefix(name):
    """update() yields the merged model of the models seen so far: the same as run() on that prefix."""
    cfg = {"num_steps": 5} if name == "dop" else {}
    models = _models(4, dtype=torch.float32)
    got = _steps(name, models, **cfg)
    for t in (1, 3):
        prefix = {k: v for k, v in models.items() if k == "_pretrained_" or int(k.split("_")[1]) <= t}
        res = build_method({"name": name, **cfg}).run(ModelPool(prefix))
        assert res.metadata["order"] == [k for k in prefix if k != "_pretrained_"]
        for k, v in _np(res.model).items():
            np.testing.assert_array_equal(got[t][k], v, err_msg=f"{name} step {t + 1} {k}")


@pytest.mark.parametrize("name", CONTINUAL)
def test_state_is_constant_in_the_number_of_models(name):
    cfg = {"num_steps": 1} if name == "dop" else {}
    sizes = {}
    for n in (3, 6):
        m = build_method({"name": name, **cfg})
        models = _models(n, dtype=torch.float32)
        per_step = [m.state_bytes() for _ in m.steps(ModelPool(models), [k for k in models if k != "_pretrained_"])]
        assert len(set(per_step[1:])) == 1, per_step
        sizes[n] = per_step[-1]
    assert sizes[3] == sizes[6]
    one_model = sum(v.numel() * v.element_size() for v in TinyNet().state_dict().values() if v.is_floating_point())
    assert sizes[6] <= 4 * one_model  # pretrained copy + accumulator + merged model (+ nothing per model)


def test_run_shuffle_order_is_seeded():
    models = _models(5, dtype=torch.float32)
    a = build_method({"name": "opcm", "shuffle_order": True, "seed": 3}).run(ModelPool(models)).metadata["order"]
    b = build_method({"name": "opcm", "shuffle_order": True, "seed": 3}).run(ModelPool(models)).metadata["order"]
    c = build_method({"name": "opcm", "shuffle_order": True, "seed": 4}).run(ModelPool(models)).metadata["order"]
    assert a == b and sorted(a) == sorted(c) and a != c


def test_mismatched_model_is_refused_naming_it():
    from fusion_bench.errors import ModelMismatchError

    models = _models(2, dtype=torch.float32)
    bad = torch.nn.Module()
    bad.fc1 = torch.nn.Linear(3, 3)
    models["task_1"] = bad
    with pytest.raises(ModelMismatchError, match="task_1"):
        build_method("opcm").run(ModelPool(models))


# ----------------------------------------------------------------------------------------------
# the continual program
# ----------------------------------------------------------------------------------------------
def test_order_metrics_by_hand():
    from fusion_bench.programs.continual import order_metrics

    acc = [{"a": 0.9}, {"a": 0.7, "b": 0.8}, {"a": 0.6, "b": 0.5, "c": 0.9}]
    m = order_metrics(["a", "b", "c"], acc)
    assert m["avg_acc_curve"] == pytest.approx([0.9, 0.75, 2.0 / 3])
    assert m["final_avg_acc"] == pytest.approx(2.0 / 3)
    assert m["avg_acc_over_steps"] == pytest.approx((0.9 + 0.75 + 2.0 / 3) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.5 - 0.8)) / 2)


@register_taskpool("continual_probe")
class ProbeTaskPool(TaskPool):
    """A data-free test task pool: the 'accuracy' of a model on task X is 1 / (1 + ||theta - theta_X||)."""

    config_class = TaskPoolConfig
    targets: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def tasks(self):
        return list(self.targets)

    def evaluate(self, model, tasks=None):
        sd = model.state_dict()
        out = {}
        for t in tasks or self.tasks:
            d = sum(float(((sd[k].double() - v.double()) ** 2).sum()) for k, v in self.targets[t].items())
            out[t] = {"accuracy": 1.0 / (1.0 + math.sqrt(d))}
        return {"tasks": out, "average": {"accuracy": sum(v["accuracy"] for v in out.values()) / len(out)}}


def test_program_reports_per_step_accuracy_bwt_memory_and_plot(tmp_path):
    from fusion_bench.programs.continual import run_continual

    models = _models(4, dtype=torch.float32)
    ProbeTaskPool.targets = {k: {n: v.clone() for n, v in m.state_dict().items() if v.is_floating_point()}
                             for k, m in models.items() if k != "_pretrained_"}
    lines = []
    rep = run_continual({"method": {"name": "continual_task_arithmetic", "scaling_factor": 0.5},
                         "report_path": str(tmp_path / "report.json")},
                        {"orders": 3, "order_seed": 5}, modelpool=ModelPool(models), taskpool=ProbeTaskPool(),
                        log=lines.append)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(rep["summary"]))
    assert (tmp_path / "report_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(rep["per_order"]) == 3
    pre = {k: v.double() for k, v in models["_pretrained_"].state_dict().items() if v.is_floating_point()}
    for o in rep["per_order"]:
        order = o["order"]
        assert sorted(order) == sorted(ProbeTaskPool.targets)
        acc = []
        for t in range(4):  # naive: task arithmetic of the prefix, scored by the probe
            merged = {k: pre[k] + 0.5 * sum(ProbeTaskPool.targets[n][k].double() - pre[k] for n in order[:t + 1])
                      for k in pre}
            acc.append({n: 1 / (1 + math.sqrt(sum(float(((merged[k] - ProbeTaskPool.targets[n][k].double()) ** 2)
                                                          .sum()) for k in pre))) for n in order[:t + 1]})
            assert o["steps"][t]["accuracy"] == pytest.approx(acc[t], rel=1e-5)
        want_bwt = sum(acc[3][order[i]] - acc[i][order[i]] for i in range(3)) / 3
        assert o["bwt"] == pytest.approx(want_bwt, rel=1e-5)
        assert o["final_avg_acc"] == pytest.approx(sum(acc[3].values()) / 4, rel=1e-5)
    orders = [tuple(o["order"]) for o in rep["per_order"]]
    assert len(set(orders)) > 1  # seeded orders differ
    s = rep["summary"]
    assert s["final_avg_acc"]["mean"] == pytest.approx(np.mean([o["final_avg_acc"] for o in rep["per_order"]]))
    assert s["state_constant_after_step_2"] is True
    assert len(s["avg_acc_curve"]) == 4
    assert any("| step | mean |" in line for line in lines)
    # the same seeds give the same orders
    rep2 = run_continual({"method": {"name": "continual_task_arithmetic", "scaling_factor": 0.5}},
                         {"orders": 3, "order_seed": 5, "plot": False}, modelpool=ModelPool(models),
                         taskpool=ProbeTaskPool(), log=lambda s: None)
    assert [tuple(o["order"]) for o in rep2["per_order"]] == orders


def test_program_refuses_a_non_continual_method_and_unknown_tasks():
    from fusion_bench.programs.continual import run_continual

    models = _models(2, dtype=torch.float32)
    ProbeTaskPool.targets = {"task_0": {}, "task_1": {}}
    with pytest.raises(ConfigError, match="continual method.*opcm"):
        run_continual({"method": {"name": "task_arithmetic"}}, {}, modelpool=ModelPool(models),
                      taskpool=ProbeTaskPool())
    ProbeTaskPool.targets = {"task_0": {}}
    with pytest.raises(ConfigError, match="task_1"):
        run_continual({"method": {"name": "opcm"}}, {}, modelpool=ModelPool(models), taskpool=ProbeTaskPool())


def _toy_cli(tmp_path):
    from safetensors.torch import save_file

    models = _models(3, dtype=torch.float32)
    folder = tmp_path / "models"
    folder.mkdir()
    for k, m in models.items():
        save_file({n: v.contiguous() for n, v in m.state_dict().items()}, folder / f"{k}.safetensors")
    ProbeTaskPool.targets = {k: {n: v.clone() for n, v in m.state_dict().items() if v.is_floating_point()}
                             for k, m in models.items() if k != "_pretrained_"}
    cfg = tmp_path / "cfg"
    (cfg / "modelpool").mkdir(parents=True)
    (cfg / "taskpool").mkdir()
    (cfg / "modelpool" / "toy.yaml").write_text(
        "# fusion_bench --config-dir cfg modelpool=toy taskpool=probe program=continual\nmodels:\n"
        + "".join(f"  {k}: {folder / (k + '.safetensors')}\n" for k in models))
    (cfg / "taskpool" / "probe.yaml").write_text("type: continual_probe\n")
    return str(cfg)


def test_cli_program_continual(tmp_path, capsys, monkeypatch):
    from tests.conftest import run_cli

    cfg = _toy_cli(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    code, stdout, stderr = run_cli(["--config-dir", cfg, "method=opcm", "modelpool=toy", "taskpool=probe",
                                    "program=continual", "program.orders=2", f"report_path={out}"], capsys)
    assert code == 0, stderr
    rep = json.loads(out.read_text())
    assert rep["program"] == "continual" and rep["summary"]["orders"] == 2 and rep["summary"]["steps"] == 3
    assert rep["config"]["program"]["orders"] == 2
    assert "| step | mean |" in stdout and (tmp_path / "r_accuracy.png").exists()


@pytest.mark.parametrize("args, message", [
    (["program=continual", "program.ordrs=2"], "orders"),
    (["program=continuel"], "continual"),
    (["method=task_arithmetic", "program=continual"], "continual method"),
])
def test_cli_program_errors_are_one_line(tmp_path, capsys, monkeypatch, args, message):
    from tests.conftest import run_cli

    cfg = _toy_cli(tmp_path)
    monkeypatch.chdir(tmp_path)
    base = ["--config-dir", cfg, "method=opcm", "modelpool=toy", "taskpool=probe"]
    code, _, stderr = run_cli(base + args, capsys)
    assert code == 2 and stderr.startswith("error:") and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
