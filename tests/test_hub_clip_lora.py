"""FusionBench's LoRA-16 CLIP pool (``modelpool=clip-vit-base-patch16_TA8_lora``): generated from the table,
adapters folded into full weights exactly as peft's own ``merge_and_unload``, and the shipped config run
unchanged (offline) against a local hub cache holding tiny r=16 adapters under the real ids."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fusion_bench.hub.clip_tasks import LORA_ADAPTERS, LORA_CONFIG, TA8, lora_id
from tests.conftest import run_cli
from tests.hubcache import build_clip_hub_cache, use_hub_cache

POOL = "clip-vit-base-patch16_TA8_lora"
TASKPOOL = "clip-vit-base-patch16_TA8"


def test_lora_table_is_fusionbenchs():
    # FusionBench config/modelpool/CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora.yaml and
    # config/method/classification/clip_finetune.yaml (lora_config), written by hand
    assert list(LORA_ADAPTERS) == ["clip-vit-base-patch16"] and LORA_ADAPTERS["clip-vit-base-patch16"][1] == TA8
    assert lora_id("clip-vit-base-patch16", "stanford-cars") == "tanganke/clip-vit-base-patch16_stanford-cars_lora-16"
    assert LORA_CONFIG == {"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.1,
                           "bias": "none"}
    from fusion_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="no LoRA-16 adapter"):
        lora_id("clip-vit-base-patch32", "sun397")


def test_generated_lora_pool():
    from fusion_bench.hub.write_configs import CONFIG_DIR, configs

    text = configs()[f"modelpool/{POOL}.yaml"]
    assert (CONFIG_DIR / "modelpool" / f"{POOL}.yaml").read_text(encoding="utf-8") == text
    mp = yaml.safe_load(text)
    assert mp["type"] == "clip_hub" and mp["processor"] == "openai/clip-vit-base-patch16"
    assert mp["models"] == {"_pretrained_": "openai/clip-vit-base-patch16",
                            **{t: f"tanganke/clip-vit-base-patch16_{t}_lora-16" for t in TA8}}
    assert list(mp["datasets"]) == list(TA8)


# ------------------------------------------------------------------------------------------------
# offline against the local hub cache
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    return build_clip_hub_cache(tmp_path_factory.mktemp("hf_hub_lora"), models=("openai/clip-vit-base-patch16",),
                                finetuned=False, lora=True, rows=4)


@pytest.fixture
def offline_hub(hub, monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, hub)
    monkeypatch.chdir(tmp_path)
    return hub


def _pool():
    from fusion_bench.hub.write_configs import CONFIG_DIR
    from fusion_bench.modelpool.base import build_modelpool

    return build_modelpool(yaml.safe_load((CONFIG_DIR / "modelpool" / f"{POOL}.yaml").read_text()))


def test_cache_holds_lora_adapters(hub):
    assert [m for m in hub["models"] if m.endswith("_lora-16")] == [lora_id("clip-vit-base-patch16", t) for t in TA8]
    assert "tanganke/clip-vit-base-patch16_sun397" not in hub["models"]  # finetuned=False


def test_loaded_lora_model_equals_peft_merge_and_unload(offline_hub):
    from peft import PeftModel
    from transformers import CLIPVisionModel

    from fusion_bench.modelpool.base import resolve_hf_path

    pool = _pool()
    assert pool.is_adapter("gtsrb") and not pool.is_adapter("_pretrained_")
    model = pool.load_model("gtsrb")
    pre = pool.load_model("_pretrained_")
    # peft's own fold of the same adapter, on the module FusionBench loads it on
    ref = CLIPVisionModel.from_pretrained(resolve_hf_path("openai/clip-vit-base-patch16", "ref"))
    target = getattr(ref, "vision_model", ref)
    merged = PeftModel.from_pretrained(target, str(resolve_hf_path(lora_id("clip-vit-base-patch16", "gtsrb"), "x")))
    merged = merged.merge_and_unload()
    if target is not ref:
        ref.vision_model = merged
    got, want, base = model.state_dict(), ref.state_dict(), pre.state_dict()
    assert set(got) == set(want) == set(base)
    changed = [k for k in got if not torch.equal(got[k], base[k])]
    assert changed and all(("q_proj.weight" in k or "v_proj.weight" in k) for k in changed)
    assert len(changed) == 2 * 2  # two layers x (q, v)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    # the streaming view is the merged model too
    src = pool.source("gtsrb")
    k = next(k for k in changed)
    assert torch.equal(src.get(k), got[k])
    assert pool.describe()["peft_adapters"]["models"] == list(TA8)


def test_adapter_on_the_wrong_module_is_refused(offline_hub, tmp_path):
    # an adapter whose tensors name no module of the base would merge as a silent no-op: refused instead
    import shutil

    from fusion_bench.errors import CheckpointError
    from fusion_bench.modelpool.base import resolve_hf_path
    from fusion_bench.modelpool.clip_hub import CLIPHubModelPool

    src = resolve_hf_path(lora_id("clip-vit-base-patch16", "mnist"), "mnist")
    bad = tmp_path / "bad_adapter"
    shutil.copytree(src, bad)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k.replace("base_model.model.", "base_model.model.other."): v for k, v in sd.items()},
              str(bad / "adapter_model.safetensors"))
    pool = CLIPHubModelPool(config={"models": {"_pretrained_": "openai/clip-vit-base-patch16", "mnist": str(bad)}})
    with pytest.raises(CheckpointError, match="missing adapter keys"):
        pool.load_model("mnist")


def _args(method: str, tmp_path) -> list[str]:
    return [f"method={method}", f"modelpool={POOL}", f"taskpool={TASKPOOL}", "taskpool.batch_size=16", "device=cpu",
            "print_table=false", f"report_path={tmp_path / 'report.json'}"]


@pytest.mark.parametrize("method", ["task_arithmetic", "simple_average"])
def test_shipped_lora_pool_dry_run(offline_hub, method, tmp_path, capsys):
    code, out, err = run_cli([*_args(method, tmp_path), "dry_run=true"], capsys)
    assert code == 0, err


_DATA = {"regmean": ["method.num_regmean_examples=2", "method.batch_size=2"]}


@pytest.mark.parametrize("method", ["task_arithmetic", "simple_average", "regmean"])
def test_shipped_lora_pool_runs_offline(offline_hub, method, tmp_path, capsys):
    """Data-free methods and a data-based one (the pool carries the train / validation / test datasets)."""
    code, out, err = run_cli([*_args(method, tmp_path), *_DATA.get(method, [])], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    tasks = report["evaluation"]["tasks"]
    assert list(tasks) == list(TA8)
    for task, metrics in tasks.items():
        assert 0.0 <= metrics["accuracy"] <= 1.0, task
    assert 0.0 <= report["evaluation"]["average"]["accuracy"] <= 1.0


def test_fusionbench_command_and_single_model_hint_run_offline(offline_hub, tmp_path, capsys):
    # FusionBench's names, and the command the individual_lora refusal points to (one adapter, merged)
    fb = ["method=task_arithmetic", "modelpool=CLIPVisionModelPool/clip-vit-base-patch16_TA8_lora",
          "taskpool=CLIPVisionModelTaskPool/clip-vit-classification_TA8_B16", "taskpool.batch_size=16", "device=cpu",
          "print_table=false", "+modelpool.select=[sun397,dtd]", f"report_save_path={tmp_path / 'fb.json'}"]
    code, out, err = run_cli(fb, capsys)
    assert code == 0, err
    assert list(json.loads((tmp_path / "fb.json").read_text())["evaluation"]["tasks"]) == list(TA8)
    hint = ["method=task_arithmetic", "method.scaling_factor=1.0", f"modelpool={POOL}", "+modelpool.select=[sun397]",
            f"taskpool={TASKPOOL}", "taskpool.batch_size=16", "device=cpu", "print_table=false",
            f"report_path={tmp_path / 'one.json'}"]
    code, out, err = run_cli(hint, capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "one.json").read_text())["evaluation"]["average"]["accuracy"] >= 0.0
