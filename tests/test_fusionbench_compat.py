"""FusionBench command lines: names, options and defaults mapped (fusion_bench/compat/fusionbench.py), the
FusionBench variants against references written from FusionBench's formulas, and 13 command lines
from FusionBench's docs run against the offline hub cache."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from fusion_bench.compat.fusionbench import TABLE, translate
from fusion_bench.errors import ConfigError
from fusion_bench.methods import build_method
from fusion_bench.modelpool.base import ModelPool
from fusion_bench.utils import seeded_generator
from tests.conftest import run_cli

CLIP_POOL = "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8"


def opts(argv: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in argv if "=" in a and not a.startswith(("-", "fusionbench=")))


# ----------------------------------------------------------------------------------------------
# the table: every FusionBench name maps to a method/pool we ship, with FusionBench's defaults
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fb", sorted(TABLE["method"]))
def test_every_method_name_maps_and_validates(fb):
    from fusion_bench.cli import preflight, register_method_configs

    argv, rec = translate([f"method={fb}", CLIP_POOL, "taskpool=dummy"])
    spec = TABLE["method"][fb]
    o = opts(argv)
    assert rec is not None and o["method"] == spec.ours
    for k, v in spec.defaults.items():
        assert o[f"method.{k}"] == (str(v).lower() if isinstance(v, bool) else str(v).replace(" ", "")), k
    register_method_configs()
    cfg = preflight(argv)  # composes and validates: every default is a valid option of ours
    assert cfg.fusionbench.original == [f"method={fb}", CLIP_POOL, "taskpool=dummy"]


@pytest.mark.parametrize("fb", sorted(TABLE["modelpool"]) + sorted(TABLE["taskpool"]))
def test_every_pool_name_maps_to_a_shipped_config(fb):
    group = "modelpool" if fb in TABLE["modelpool"] else "taskpool"
    try:
        argv, _ = translate(["method=dummy", f"{group}={fb}", "report_save_path=r.json"])
    except ConfigError as e:  # a pool another part of the project has not shipped yet: said in one line
        assert "does not ship" in str(e) and "\n" not in str(e)
        pytest.skip(str(e))
    ours = opts(argv)[group]
    assert (Path(__file__).parent.parent / "fusion_bench" / "config" / group / f"{ours}.yaml").is_file()


def test_options_and_top_level_keys():
    argv, rec = translate(["method=ties_merging", "method.threshold=20", "method.remove_keys=[]",
                           "method.merge_func=mean", "merged_model_save_path=out/m", "report_save_path=out/r.json",
                           "fast_dev_run=false", "print_config=false", "fabric.devices=1", CLIP_POOL,
                           "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8"])
    o = opts(argv)
    assert o["method.density"] == "0.2" and o["method.merge_func"] == "mean" and o["method.scaling_factor"] == "0.3"
    assert o["method.trim_scope"] == "global" and o["method.keep_rule"] == "fusionbench"
    assert o["merged_model_path"] == "out/m" and o["report_path"] == "out/r.json"
    assert o["modelpool"] == o["taskpool"] == "clip-vit-base-patch32_TA8"
    assert {"fast_dev_run=false", "print_config=false", "fabric.devices=1", "method.remove_keys=[]"} <= set(rec["ignored"])
    # a sweep of thresholds becomes a sweep of densities; a fraction stays a fraction (FusionBench: K <= 1)
    assert opts(translate(["method=ties_merging", "method.threshold=10,20,0.5"])[0])["method.density"] == "0.1,0.2,0.5"
    a = opts(translate(["method=adamerging/clip", "method.name=clip_task_wise_adamerging", "method.max_steps=5",
                        "method.init_values=0.4", "method.clamp_weights=true", "path.log_dir=o/x"])[0])
    assert (a["method"], a["method.granularity"], a["method.steps"], a["method.init_lambda"],
            a["method.clamp_lambdas"], a["hydra.run.dir"]) == ("adamerging", "task_wise", "5", "0.4", "true", "o/x")
    assert opts(translate(["method=adamerging/clip"])[0])["method.steps"] == "1000"
    assert opts(translate(["method=regmean/clip_regmean", "method.dataloader_kwargs.batch_size=8"])[0]) == {
        "method": "regmean", "method.batch_size": "8", "method.num_regmean_examples": "256",
        "method.reduce_non_diagonal_ratio": "0.95"}
    assert opts(translate(["method=magmax/magmax"])[0])["method.scaling_factor"] == "0.5"
    # the CLIP backbone of a FusionBench task pool picks ours
    t = opts(translate(["method=dummy", "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8",
                        "taskpool.clip_model=openai/clip-vit-large-patch14"])[0])
    assert t["taskpool"] == "clip-vit-large-patch14_TA8" and "taskpool.clip_model" not in t


def test_clip_lora_pool_name_maps():
    argv, rec = translate(["method=task_arithmetic", "modelpool=CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora",
                           "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_B16"])
    o = opts(argv)
    assert (o["modelpool"], o["taskpool"]) == ("clip-vit-base-patch16_TA8_lora", "clip-vit-base-patch16_TA8")
    assert rec is not None


def test_our_names_are_unchanged():
    for argv in (["method=ties_merging", "method.density=0.3", "modelpool=clip-vit-base-patch32_TA8"],
                 ["method=task_arithmetic", "taskpool=dummy", "seed=3"], ["method=dummy", "report_path=r.json"]):
        assert translate(argv) == (argv, None)


@pytest.mark.parametrize("argv, says", [
    (["method=trust_region/clip_task_arithmetic"], "zero_shot=true"),
    (["method=concrete_subspace/clip_safe_concrete_task_arithmetic"], "not supported"),
    (["method=pruning/magnitude_diff_pruning"], "returns the pretrained weights"),
    (["method=task_singular_vector/TaskSingularVectorMerging", "method.alpha=[1,0.5]"], "one number"),
    (["method=task_singular_vector/TaskSingularVectorMerging", "method.return_single_task_models=true"],
     "tsv_compress"),
    (["method=doge_ta/doge_ta", "method.K=300"], "(0, 100]"),
    (["method=adamerging/clip", "method.name=clip_layer_wise_adamerging_doge_ta"], "clip_task_wise_adamerging"),
    (["method=ties_merging", "method.remove_keys=[a.weight]"], "method.exclude"),
    (["method=ties_merging", "method.threshold=100"], "below 100"),
    (["method=dare/task_arithmetic", "method.only_on_linear_weights=true"], "method.exclude"),
    (["method=regmean/clip_regmean", "method.exclude_param_names_regex=[x]"], "glob"),
    (["method=adamerging/clip", "method.weights=w.pt"], "task_arithmetic"),
    (["method=task_arithmetic", "fast_dev_run=true"], "max_samples"),
    (["method=task_arithmetic", "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA4"], "--config-dir"),
    (["method=ties_merging", "method.threshold=20", "method.topk=3"], "no option 'topk'"),
    (["method=dummy", "modelpool=CLIPVisionModelPool/clip-vit-base-patch16_individual_lora"],
     "modelpool=clip-vit-base-patch16_TA8_lora +modelpool.select=[sun397]"),
])
def test_unsupported_names_give_one_line(argv, says, capsys):
    code, _, err = run_cli(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], err


# ----------------------------------------------------------------------------------------------
# FusionBench's variants against references written from its formulas
# ----------------------------------------------------------------------------------------------
def _pool(n=3, seed=0, cancel=False):
    g = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(7, 5, generator=g), "a.bias": torch.randn(7, generator=g),
            "b.weight": torch.randn(3, 7, generator=g)}
    models = {f"m{i}": {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n)}
    if cancel:  # exactly opposite task-vector entries (a zero sign vote) in every tensor
        for k in base:
            models["m1"][k].view(-1)[:4] = base[k].view(-1)[:4] - (models["m0"][k].view(-1)[:4] - base[k].view(-1)[:4])
            models["m2"][k].view(-1)[:4] = base[k].view(-1)[:4]
    return base, models


def _flat(sd, keys):
    return torch.cat([sd[k].reshape(-1) for k in keys])


def fusionbench_ties_reference(base, models, threshold, merge_func, scaling, dare=None):
    """FusionBench's TIES (paper + its ties_merging_utils facts): the task vectors of the whole model, keys
    sorted, flattened; trim: K = threshold/100 if threshold > 1; keep |tau| >= the (d - int(d*K))-th smallest
    magnitude; sign = sgn(sum_i tau_i), a 0 replaced by sgn(sum of all signs); keep entries of that sign
    (sign 0: the negative ones); sum / mean over kept non-zeros / max magnitude * sign."""
    keys = sorted(base)
    fb = _flat(base, keys).double()
    taus = []
    for name, sd in models.items():
        tau = _flat(sd, keys).double() - fb
        if dare is not None:
            tau = torch.cat([dare(k, (sd[k].double() - base[k].double()).reshape(-1), name) for k in keys])
        taus.append(tau)
    tv = torch.stack(taus)
    K = threshold / 100 if threshold > 1 else threshold
    d = tv.shape[1]
    kth = tv.abs().kthvalue(d - int(d * K), dim=1, keepdim=True).values
    tv = tv * (tv.abs() >= kth)
    sign = tv.sum(0).sign()
    sign[sign == 0] = sign.sum().sign()
    keep = torch.where(sign > 0, tv > 0, tv < 0)
    sel = tv * keep
    if merge_func == "sum":
        agg = sel.sum(0)
    elif merge_func == "mean":
        agg = sel.sum(0) / (sel != 0).sum(0).clamp(min=1)
    else:
        agg = sel.abs().max(0).values * sign
    merged, out, i = fb + scaling * agg, {}, 0
    for k in keys:
        out[k] = merged[i:i + base[k].numel()].reshape(base[k].shape)
        i += base[k].numel()
    return out


def _run(method_opts, base, models):
    pool = ModelPool({"_pretrained_": {k: v.double() for k, v in base.items()},
                      **{n: {k: v.double() for k, v in sd.items()} for n, sd in models.items()}})
    return build_method(method_opts).run(pool).model.state_dict()


def _yaml(v):
    import yaml

    return yaml.safe_load(v)


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [20, 50, 0.3])
@pytest.mark.parametrize("cancel", [False, True])
def test_fusionbench_ties_equals_reference(merge_func, threshold, cancel):
    base, models = _pool(cancel=cancel)
    argv, _ = translate(["method=ties_merging", f"method.threshold={threshold}", f"method.merge_func={merge_func}"])
    m = {k[len("method."):]: _yaml(v) for k, v in opts(argv).items() if k.startswith("method.")}
    got = _run({"name": "ties_merging", **m}, base, models)
    ref = fusionbench_ties_reference(base, models, threshold, merge_func, 0.3)
    for k in base:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)


def _dare_fn(p, seed=0, rescale=True):
    from fusion_bench.kernels.merging import dare as D

    return lambda key, tau, name: D.dare(tau.reshape(-1), p, seeded_generator(seed, key, name), rescale)


def test_fusionbench_dare_ties_equals_reference():
    base, models = _pool(n=4, seed=1)
    argv, _ = translate(["method=dare/ties_merging", "method.sparsity_ratio=0.3", "method.threshold=40"])
    m = {k[len("method."):]: _yaml(v) for k, v in opts(argv).items() if k.startswith("method.")}
    assert m["scaling_factor"] == 0.5 and m["merge_func"] == "sum"
    got = _run({"name": "dare_ties_merging", **m}, base, models)
    # DARE masks are drawn per tensor from (seed, tensor, model): the reference applies the same masks, then
    # FusionBench's TIES trim, sign and sum over the whole model
    ref = fusionbench_ties_reference(base, models, 40, "sum", 0.5, dare=_dare_fn(0.3))
    for k in base:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)


def test_fusionbench_dare_simple_average_equals_reference():
    base, models = _pool(n=3, seed=2)
    got = _run({"name": "dare_simple_average", "sparsity_ratio": 0.4}, base, models)
    dare = _dare_fn(0.4)
    for k in base:
        taus = [dare(k, sd[k].double() - base[k].double(), n).reshape(base[k].shape) for n, sd in models.items()]
        torch.testing.assert_close(got[k], base[k].double() + sum(taus) / 3, rtol=1e-12, atol=1e-12)


def test_dummy_returns_pretrained_or_first():
    base, models = _pool()
    got = _run({"name": "dummy"}, base, models)
    assert all(torch.equal(got[k], base[k].double()) for k in base)
    pool = ModelPool({n: sd for n, sd in models.items()})
    first = build_method("dummy").run(pool).model.state_dict()
    assert all(torch.equal(first[k], models["m0"][k]) for k in base)


# ----------------------------------------------------------------------------------------------
# 13 command lines from FusionBench's docs (github tanganke/fusion_bench, docs/), unchanged except
# where stated, against the offline hub cache. Each ends in a report or in one `error:` line.
# ----------------------------------------------------------------------------------------------
TA8 = "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8 taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8"
COMMANDS = [
    # (source, command after `fusion_bench`, expected: "report" | "refused: <text>", cache)
    ("docs/algorithms/README.md", f"method=task_arithmetic method.scaling_factor=0.3 {TA8}", "report", "clip"),
    ("docs/algorithms/ties_merging.md", "method=ties_merging method.scaling_factor=0.3 method.threshold=20 "
     "method.merge_func=sum modelpool=CLIPVisionModelPool/clip-vit-base-patch32_svhn_and_mnist "
     "taskpool=CLIPVisionModelTaskPool/clip-vit-base-patch32_svhn_and_mnist", "report", "clip"),
    ("docs/algorithms/dare.md", f"method=dare/task_arithmetic method.sparsity_ratio=0.5 method.scaling_factor=0.3 {TA8}",
     "report", "clip"),
    ("docs/algorithms/dare.md", f"method=dare/simple_average method.sparsity_ratio=0.5 method.rescale=true {TA8}",
     "report", "clip"),
    ("docs/algorithms/dare.md", f"method=dare/ties_merging method.sparsity_ratio=0.5 method.scaling_factor=0.5 "
     f"method.threshold=20 {TA8}", "report", "clip"),
    # AdaMerging: FusionBench's 1000 test-time steps are too slow for a unit test: dry_run=true (a FusionBench key)
    ("docs/algorithms/adamerging.md", "path.log_dir=outputs/ViT-B-32/task_wise_adamerging method=adamerging/clip "
     f"method.name=clip_task_wise_adamerging method.save_merging_weights=merging_weights.pt {TA8} dry_run=true",
     "dry run", "clip"),
    ("docs/algorithms/adamerging.md", "path.log_dir=outputs/ViT-B-32/layer_wise_adamerging method=adamerging/clip "
     f"method.name=clip_layer_wise_adamerging method.save_merging_weights=merging_weights.pt {TA8} dry_run=true",
     "dry run", "clip"),
    ("docs/algorithms/fisher_merging.md", f"method=fisher_merging/clip_fisher_merging {TA8}", "report", "clip"),
    ("docs/algorithms/regmean.md", f"method=regmean/clip_regmean {TA8}", "report", "clip"),
    ("docs/algorithms/magmax.md", f"method=magmax/magmax method.scaling_factor=0.5 {TA8}", "report", "clip"),
    ("docs/algorithms/weighted_averaging.md", "method=linear/weighted_average method.normalize=true "
     "method.weights=[0.3,0.3,0.3,0.3,0.3,0.3,0.3,0.3] "
     "modelpool=CLIPVisionModelPool/clip-vit-base-patch32_TA8_model_only "
     "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8", "report", "clip"),
    ("docs/modelpool/flan-t5_generation.md", "modelpool=Seq2SeqLMPool/flan-t5-base_glue method=dummy taskpool=dummy",
     "report", "text"),
    ("docs/modelpool/gpt2_classification.md", "method=simple_average modelpool=gpt-2_glue taskpool=gpt-2_glue",
     "report", "text"),
]


@pytest.fixture(scope="module")
def clip_hub(tmp_path_factory):
    hubcache = pytest.importorskip("tests.hubcache", reason="tests/hubcache.py (CLIP hub cache) not available")
    return hubcache.build_clip_hub_cache(tmp_path_factory.mktemp("hub"), rows=4)


@pytest.fixture(scope="module")
def text_hub(tmp_path_factory):
    hubcache = pytest.importorskip("tests.hubcache_text",
                                   reason="MISSING: tests/hubcache_text.py (Flan-T5/GPT-2 hub cache) not shipped yet")
    return hubcache.build_text_hub_cache(tmp_path_factory.mktemp("texthub"))


@pytest.mark.parametrize("source, command, expected, cache", COMMANDS, ids=[f"{i:02d}" for i in range(len(COMMANDS))])
def test_fusionbench_doc_commands(source, command, expected, cache, request, tmp_path, monkeypatch, capsys):
    assert len(COMMANDS) == 13
    if cache == "clip":
        from tests.hubcache import use_hub_cache

        use_hub_cache(monkeypatch, request.getfixturevalue("clip_hub"))
    else:
        import tests.hubcache_text as ht

        ht.use_text_hub_cache(monkeypatch, request.getfixturevalue("text_hub"))
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli([*shlex.split(command), "report_save_path=report.json"]
                             if expected.startswith("report") else shlex.split(command), capsys)
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if expected.startswith("refused"):
        assert code == 2 and len(errors) == 1 and expected.split(": ", 1)[1] in errors[0], err
        return
    assert code == 0, err[-2000:]
    if expected == "dry run":
        assert "dry run" in out + err
        return
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["fusionbench"]["original"][:len(shlex.split(command))] == shlex.split(command)


def test_svc_base_method_options_translate_once():
    """FusionBench's nested base_method options become base_options.* here; one the command line sets replaces
    its default (never both), the others keep FusionBench's defaults, and the result composes."""
    from fusion_bench.cli import preflight, register_method_configs

    argv, rec = translate(["method=singular_value_calibration/ties_merging", "method.base_method.threshold=10",
                           "method.alpha=0.3", CLIP_POOL, "taskpool=dummy"])
    o = opts(argv)
    dens = [a for a in argv if a.startswith("method.base_options.density=")]
    assert dens == ["method.base_options.density=0.1"]
    assert o["method"] == "svc" and o["method.base_method"] == "ties_merging" and o["method.alpha"] == "0.3"
    assert o["method.base_options.scaling_factor"] == "0.3" and o["method.base_options.merge_func"] == "sum"
    assert "method.alpha" not in rec["defaults_applied"] and "base_options.density" not in rec["defaults_applied"]
    register_method_configs()
    cfg = preflight(argv)
    assert cfg.method.base_options.density == 0.1 and cfg.method.base_options.trim_scope == "global"


@pytest.mark.parametrize("fb", sorted(TABLE["method"]))
def test_every_mapped_option_is_an_option_of_ours(fb):
    """A FusionBench option mapped by name must land on an option our method has (else it would fail only
    when a user sets it)."""
    import dataclasses

    from fusion_bench.methods import get_method_class

    spec = TABLE["method"][fb]
    fields = {f.name for f in dataclasses.fields(get_method_class(spec.ours).config_class)}
    for fb_opt, target in spec.options.items():
        name = target[0] if isinstance(target, tuple) else target
        if isinstance(name, str) and name != "ignored":
            assert name.split(".")[0] in fields, (fb, fb_opt, name)
