"""The CLIP hub experiments: the table against FusionBench's counts, the shipped configs against the
generator, the validation hold-out against FusionBench's split, and the shipped ViT-B/32 TA8 pair run
unchanged (offline) against a local hub cache of tiny models and datasets under the real ids."""

from __future__ import annotations

import json

import pytest
import torch

from fusion_bench.hub import clip_tasks
from fusion_bench.hub.clip_tasks import TA8, TALL14, TALL20, TASKS
from tests.conftest import run_cli
from tests.hubcache import build_clip_hub_cache, use_hub_cache

# (classes, templates) per task as FusionBench's fusion_bench/tasks/clip_classification lists them
# (TA8 templates: CLIP / task-arithmetic papers: SUN397 2, Cars 8, RESISC45 18, EuroSAT 3, SVHN 1,
# GTSRB 3, MNIST 1, DTD 8), written by hand, not computed from our table.
FUSIONBENCH_COUNTS = {
    "sun397": (397, 2), "stanford-cars": (196, 8), "resisc45": (45, 18), "eurosat": (10, 3), "svhn": (10, 1),
    "gtsrb": (43, 3), "mnist": (10, 1), "dtd": (47, 8),
    "oxford_flowers102": (102, 1), "pcam": (2, 1), "fer2013": (7, 6), "oxford-iiit-pet": (37, 1), "stl10": (10, 2),
    "cifar100": (100, 18),
    "cifar10": (10, 18), "food101": (101, 1), "fashion_mnist": (10, 2), "emnist_letters": (26, 1), "kmnist": (10, 1),
    "rendered-sst2": (2, 1),
}


def test_task_sets_in_fusionbench_order():
    assert TA8 == ("sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd")
    assert TALL14[8:] == ("oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100")
    assert TALL20[14:] == ("cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2")
    assert list(TASKS) == list(TALL20)


@pytest.mark.parametrize("task", TALL20)
def test_class_and_template_counts_equal_fusionbench(task):
    names, templates = clip_tasks.classnames(task), clip_tasks.templates(task)
    assert (len(names), len(templates)) == FUSIONBENCH_COUNTS[task]
    assert len(set(names)) == len(names) and all(t.count("{}") == 1 for t in templates)


def test_a_few_hand_written_names():
    assert clip_tasks.classnames("gtsrb")[0] == "red and white circle 20 kph speed limit"
    assert clip_tasks.classnames("eurosat")[0] == "annual crop land"
    assert clip_tasks.templates("eurosat")[0] == "a centered satellite photo of {}."
    assert clip_tasks.templates("mnist") == ['a photo of the number: "{}".']


def test_docs_counts_table_matches():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "hub_experiments.md").read_text()
    for task, (c, t) in FUSIONBENCH_COUNTS.items():
        assert f"| {task} | {c} | {c} | {t} | {t} |" in text, task


def test_shipped_configs_equal_generated():
    from fusion_bench.hub.write_configs import CONFIG_DIR, configs

    generated = configs()
    assert len(generated) == 48  # + the ViT-B/16 TA8 LoRA-16 model pool + 5 small ViT-B/32 pairs
    for rel, text in generated.items():
        path = CONFIG_DIR / rel
        assert path.exists() and path.read_text(encoding="utf-8") == text, \
            f"{rel} differs from the table: run python -m fusion_bench.hub.write_configs"


def test_generated_yaml_parses_to_the_table():
    import yaml

    from fusion_bench.hub.write_configs import configs

    gen = configs()
    mp = yaml.safe_load(gen["modelpool/clip-vit-large-patch14_TALL20.yaml"])
    assert list(mp["models"]) == ["_pretrained_", *TALL20]
    assert mp["models"]["food101"] == "tanganke/clip-vit-large-patch14_food101"
    assert mp["datasets"]["svhn"]["validation"] == {"path": "ufldl-stanford/svhn", "name": "cropped_digits",
                                                    "split": "train",
                                                    "holdout": {"fraction": 0.1, "seed": 0, "part": "validation"}}
    assert mp["datasets"]["food101"]["test"]["split"] == "validation"
    tp = yaml.safe_load(gen["taskpool/clip-vit-base-patch32_robustness_pixelate.yaml"])
    assert list(tp["tasks"]) == ["stanford-cars", "eurosat", "resisc45", "gtsrb"]
    assert {t["split"] for t in tp["tasks"].values()} == {"pixelate"}
    assert tp["tasks"]["gtsrb"]["prompts"] == "gtsrb"


def test_holdout_equals_fusionbench_random_split():
    from torch.utils.data import random_split

    from fusion_bench.data.loading import holdout_indices

    for n in (9, 10, 57, 1234):
        k = int(n * 0.1)
        tr, va = random_split(range(n), [n - k, k], generator=torch.Generator().manual_seed(0))
        assert holdout_indices(n, 0.1, 0, "validation") == list(va.indices)
        assert holdout_indices(n, 0.1, 0, "train") == list(tr.indices)


def test_holdout_reference_errors_name_the_key():
    from fusion_bench.data.loading import load_dataset_ref
    from fusion_bench.errors import ConfigError

    with pytest.raises(ConfigError, match="Did you mean 'fraction'"):
        load_dataset_ref({"path": "org/x", "split": "train", "holdout": {"fractoin": 0.1}})
    with pytest.raises(ConfigError, match="part"):
        load_dataset_ref({"path": "org/x", "split": "train", "holdout": {"part": "test"}})
    with pytest.raises(ConfigError, match="fraction"):
        load_dataset_ref({"path": "org/x", "split": "train", "holdout": {"fraction": 1.5}})


# ------------------------------------------------------------------------------------------------
# offline end to end against the local hub cache
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    return build_clip_hub_cache(tmp_path_factory.mktemp("hf_hub"))


@pytest.fixture
def offline_hub(hub, monkeypatch, tmp_path):
    use_hub_cache(monkeypatch, hub)
    monkeypatch.chdir(tmp_path)
    return hub


def test_cache_loads_with_the_real_ids(offline_hub):
    from fusion_bench.data.loading import load_dataset_ref
    from fusion_bench.modelpool.base import build_modelpool

    for task in TA8:
        t = TASKS[task]
        test = load_dataset_ref(t.dataset_ref(t.test_split))
        train = load_dataset_ref(t.dataset_ref(t.train_split))
        val = load_dataset_ref(t.dataset_ref(t.train_split, holdout="validation"))
        rest = load_dataset_ref(t.dataset_ref(t.train_split, holdout="train"))
        assert len(test) == 10 and len(val) == 1 and len(rest) == len(train) - 1
        assert test.features[t.label_column].num_classes == len(t.classnames)
    import yaml

    from fusion_bench.hub.write_configs import CONFIG_DIR

    cfg = yaml.safe_load((CONFIG_DIR / "modelpool" / "clip-vit-base-patch32_TA8.yaml").read_text())
    pool = build_modelpool(cfg)
    assert pool.task_info("gtsrb")["classnames"][0] == "red and white circle 20 kph speed limit"
    assert len(pool.dataset("eurosat", "validation")) == 1


METHOD_RUNS = {
    "task_arithmetic": ["method=task_arithmetic"],
    "simple_ensemble": ["method=simple_ensemble"],
    "fisher_merging": ["method=fisher_merging", "method.num_fisher_examples=2", "method.batch_size=2"],
    "regmean": ["method=regmean", "method.num_regmean_examples=2", "method.batch_size=2"],
    "adamerging": ["method=adamerging", "method.steps=1", "method.batch_size=2", "method.max_test_samples=2"],
}


def _args(method: str, tmp_path) -> list[str]:
    return ["modelpool=clip-vit-base-patch32_TA8", "taskpool=clip-vit-base-patch32_TA8", *METHOD_RUNS[method],
            "taskpool.batch_size=16", "device=cpu", "print_table=false", f"report_path={tmp_path / 'report.json'}"]


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_shipped_ta8_pair_dry_run(offline_hub, method, tmp_path, capsys):
    code, out, err = run_cli([*_args(method, tmp_path), "dry_run=true"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("method", list(METHOD_RUNS))
def test_shipped_ta8_pair_runs_offline(offline_hub, method, tmp_path, capsys):
    code, out, err = run_cli(_args(method, tmp_path), capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    tasks = report["evaluation"]["tasks"]
    assert list(tasks) == list(TA8)
    for task, metrics in tasks.items():
        assert 0.0 <= metrics["accuracy"] <= 1.0, task
    assert 0.0 <= report["evaluation"]["average"]["accuracy"] <= 1.0
