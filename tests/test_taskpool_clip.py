"""The CLIP zero-shot task pool against a by-hand computation on a tiny random CLIP model.

The reference in this file follows Radford et al. 2021 directly: per class, the mean of the unit-norm
text embeddings of every template, renormalised; logits = exp(logit_scale) * cos(image, class).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fusion_bench.errors import CheckpointError, ConfigError, ModelMismatchError

CLASSNAMES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a {}."]


# ------------------------------------------------------------------------------------------------
# tiny model, tokenizer, processor and dataset (built locally; nothing from the Hub)
# ------------------------------------------------------------------------------------------------
def build_tiny_clip(folder: Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a random CLIPModel (hidden size 32) with a character-level CLIP tokenizer and processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = "abcdefghijklmnopqrstuvwxyz.,-'"
    vocab: dict[str, int] = {}
    for c in letters:
        vocab[c] = len(vocab)
    for c in letters:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(folder)
    eos = vocab["<|endoftext|>"]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    model.save_pretrained(folder)
    return folder


def build_image_dataset(folder: Path, n_per_class: int = 6, seed: int = 0, n_classes: int = 3,
                        names: list[str] | None = None) -> Path:
    """A DatasetDict (test, test_gaussian_noise) of 32x32 RGB images whose colour depends on the class."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(seed)
    feats = datasets.Features({"image": datasets.Image(),
                               "label": datasets.ClassLabel(names=names or CLASSNAMES[:n_classes])})
    splits = {}
    for split, noise in (("test", 60), ("test_gaussian_noise", 120)):
        images, labels = [], []
        for i in range(n_per_class * n_classes):
            c = i % n_classes
            base = rng.uniform(0, 128, (32, 32, 3))
            base[..., c % 3] += 100
            arr = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
            images.append(Image.fromarray(arr, "RGB"))
            labels.append(c if i % 2 else int(rng.integers(n_classes)))  # half the labels random
        splits[split] = datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_tp")
    clip = build_tiny_clip(root / "clip")
    data = build_image_dataset(root / "data")
    return {"root": root, "clip": clip, "data": data}


def perturbed_vision(clip_folder: Path, seed: int, scale: float = 0.05):
    from transformers import CLIPVisionModel

    from fusion_bench.modelpool.base import _quiet_from_pretrained

    m = _quiet_from_pretrained(CLIPVisionModel, clip_folder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m.eval()


def make_pool(tiny, **kw):
    from fusion_bench.taskpool.clip_zeroshot import CLIPZeroShotTaskPool

    tasks = kw.pop("tasks", None) or {
        "colors": {"dataset": str(tiny["data"]), "split": "test", "templates": TEMPLATES},
        "colors_noise": {"dataset": str(tiny["data"]), "split": "test_gaussian_noise", "templates": TEMPLATES,
                         "classnames": ["a cat", "a dog", "a bird"]},
    }
    return CLIPZeroShotTaskPool({"clip_model": str(tiny["clip"]), "tasks": tasks, "batch_size": 5,
                                 "device": "cpu", **kw})


# ------------------------------------------------------------------------------------------------
# independent reference
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _load_reference_clip(folder: str):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)


def reference_logits(clip_folder: Path, data_folder: Path, split: str, classnames: list[str], templates: list[str],
                     image_logits_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and labels by hand: text embeddings per caption, averaged per class."""
    import datasets

    clip, proc = _load_reference_clip(str(clip_folder))
    rows = []
    with torch.no_grad():
        for c in classnames:
            embs = []
            for t in templates:
                tok = proc.tokenizer([t.format(c)], return_tensors="pt")
                out = clip.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
                e = out if isinstance(out, torch.Tensor) else out.pooler_output
                embs.append(e[0] / e[0].norm())
            m = torch.stack(embs).mean(0)
            rows.append(m / m.norm())
        head = torch.stack(rows)
        ds = datasets.load_from_disk(str(data_folder))[split]
        pixels = proc.image_processor(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
        feats = image_logits_fn(clip, pixels)
        feats = feats / feats.norm(dim=-1, keepdim=True)
        logits = clip.logit_scale.exp() * feats @ head.T
    return logits, torch.tensor(ds["label"])


def acc_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    n = labels.numel()
    correct = sum(int(logits[i].argmax()) == int(labels[i]) for i in range(n))
    loss = 0.0
    for i in range(n):
        z = logits[i].double()
        loss += float(torch.logsumexp(z, 0) - z[int(labels[i])])
    return correct / n, loss / n


def vision_feats(vision):
    def fn(clip, pixels):
        return clip.visual_projection(vision(pixel_values=pixels).pooler_output)
    return fn


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------
def test_clip_vision_model_matches_reference(tiny):
    vision = perturbed_vision(tiny["clip"], seed=1, scale=0.3)
    pool = make_pool(tiny)
    rep = pool.evaluate(vision)
    assert set(rep["tasks"]) == {"colors", "colors_noise"}
    accs = []
    for task, split, names in (("colors", "test", CLASSNAMES), ("colors_noise", "test_gaussian_noise",
                                                                ["a cat", "a dog", "a bird"])):
        logits, labels = reference_logits(tiny["clip"], tiny["data"], split, names, TEMPLATES, vision_feats(vision))
        acc, loss = acc_loss(logits, labels)
        accs.append(acc)
        assert rep["tasks"][task]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert rep["tasks"][task]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert any(0 < a < 1 for a in accs), accs  # the data is not degenerate for this seed
    avg = rep["average"]
    assert avg["accuracy"] == pytest.approx((rep["tasks"]["colors"]["accuracy"]
                                             + rep["tasks"]["colors_noise"]["accuracy"]) / 2)
    assert 0.0 <= avg["accuracy"] <= 1.0 and math.isfinite(avg["loss"])


def test_full_clip_model_uses_its_own_projection(tiny):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    with torch.no_grad():
        model.visual_projection.weight.mul_(-1.5)  # differs from the pool's projection
    pool = make_pool(tiny)
    rep = pool.evaluate(model, tasks=["colors"])
    logits, labels = reference_logits(
        tiny["clip"], tiny["data"], "test", CLASSNAMES, TEMPLATES,
        lambda clip, px: model.visual_projection(model.vision_model(pixel_values=px).pooler_output))
    acc, loss = acc_loss(logits, labels)
    assert list(rep["tasks"]) == ["colors"]
    assert rep["tasks"]["colors"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rep["tasks"]["colors"]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)


def test_ensemble_combines_member_logits(tiny):
    from fusion_bench.models.ensemble import Ensemble

    a, b = perturbed_vision(tiny["clip"], seed=2, scale=0.3), perturbed_vision(tiny["clip"], seed=3, scale=0.3)
    pool = make_pool(tiny)
    la, labels = reference_logits(tiny["clip"], tiny["data"], "test", CLASSNAMES, TEMPLATES, vision_feats(a))
    lb, _ = reference_logits(tiny["clip"], tiny["data"], "test", CLASSNAMES, TEMPLATES, vision_feats(b))
    for mode, weights, expected in (
        ("mean", None, (la + lb) / 2),
        ("weighted", [0.25, 0.75], 0.25 * la + 0.75 * lb),
        ("max_confidence", None, torch.stack([la[i] if la[i].softmax(-1).max() >= lb[i].softmax(-1).max() else lb[i]
                                              for i in range(len(la))])),
    ):
        rep = pool.evaluate(Ensemble({"a": a, "b": b}, mode=mode, weights=weights), tasks=["colors"])
        acc, loss = acc_loss(expected, labels)
        assert rep["tasks"]["colors"]["accuracy"] == pytest.approx(acc, abs=1e-9), mode
        assert rep["tasks"]["colors"]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5), mode


def test_caches_hit_on_second_call_and_agree_with_uncached(tiny, tmp_path):
    from fusion_bench.data import images as image_cache
    from fusion_bench.taskpool import clip_zeroshot as cz

    vision = perturbed_vision(tiny["clip"], seed=4)
    cache = tmp_path / "cache"
    image_cache.clear_memory_cache()
    cz._HEADS.clear()
    h0, i0 = dict(cz.HEAD_STATS), dict(image_cache.STATS)
    first = make_pool(tiny, cache_dir=str(cache)).evaluate(vision)
    assert cz.HEAD_STATS["computed"] - h0["computed"] == 2
    assert image_cache.STATS["decoded"] - i0["decoded"] == 2
    assert len(list((cache / "heads").glob("*.pt"))) == 2
    assert len(list((cache / "images").glob("*.pt"))) == 2
    assert not [p for p in cache.rglob("*") if ".fusion_bench-tmp-" in p.name]

    # same process, new pool: memory hits, the text encoder is not run
    pool2 = make_pool(tiny, cache_dir=str(cache))
    calls = {"n": 0}
    hook = pool2.clip_model.text_model.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    second = pool2.evaluate(vision)
    hook.remove()
    assert calls["n"] == 0
    assert cz.HEAD_STATS["computed"] - h0["computed"] == 2 and image_cache.STATS["decoded"] - i0["decoded"] == 2
    assert cz.HEAD_STATS["memory_hits"] - h0["memory_hits"] >= 2
    assert second == first

    # a fresh process (memory cleared): disk hits
    image_cache.clear_memory_cache()
    cz._HEADS.clear()
    third = make_pool(tiny, cache_dir=str(cache)).evaluate(vision)
    assert cz.HEAD_STATS["disk_hits"] - h0["disk_hits"] == 2
    assert image_cache.STATS["disk_hits"] - i0["disk_hits"] == 2
    assert third == first

    # without caches: the same numbers, and nothing new written
    uncached = make_pool(tiny, cache_dir=str(tmp_path / "none"), use_cache=False).evaluate(vision)
    assert not (tmp_path / "none").exists()
    for t in first["tasks"]:
        assert uncached["tasks"][t]["accuracy"] == first["tasks"][t]["accuracy"]
        assert uncached["tasks"][t]["loss"] == pytest.approx(first["tasks"][t]["loss"], rel=1e-5)

    # other templates -> another head; max_samples -> another image cache entry
    make_pool(tiny, cache_dir=str(cache), max_samples=4).evaluate(vision, tasks=["colors"])
    assert len(list((cache / "images").glob("*.pt"))) == 3


def test_max_samples_evenly_spaced(tiny):
    from fusion_bench.data.images import subset_indices

    assert subset_indices(10, 4) == [0, 2, 5, 7]
    assert subset_indices(3, 10) == [0, 1, 2]
    vision = perturbed_vision(tiny["clip"], seed=5)
    pool = make_pool(tiny, max_samples=6)
    rep = pool.evaluate(vision, tasks=["colors"])
    logits, labels = reference_logits(tiny["clip"], tiny["data"], "test", CLASSNAMES, TEMPLATES, vision_feats(vision))
    idx = [int(i * 18 / 6) for i in range(6)]
    acc, loss = acc_loss(logits[idx], labels[idx])
    assert rep["tasks"]["colors"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rep["tasks"]["colors"]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert pool.report_extras()["evaluation_splits"]["colors"]["samples"] == 6


def test_per_task_result_evaluates_each_model_on_its_task(tiny):
    from fusion_bench.methods.base import FusionResult
    from fusion_bench.programs.fusion import evaluate_result

    a, b = perturbed_vision(tiny["clip"], seed=6, scale=0.3), perturbed_vision(tiny["clip"], seed=7, scale=0.3)
    pool = make_pool(tiny)
    rep = evaluate_result(FusionResult("per_task", models={"colors": a, "colors_noise": b}), pool)
    assert rep["tasks"]["colors"] == pool.evaluate(a, tasks=["colors"])["tasks"]["colors"]
    assert rep["tasks"]["colors_noise"] == pool.evaluate(b, tasks=["colors_noise"])["tasks"]["colors_noise"]


def test_config_errors_name_the_key(tiny):
    from fusion_bench.taskpool.base import build_taskpool

    with pytest.raises(ConfigError, match=r"taskpool\.tasks\.x\.splitt.*split"):
        make_pool(tiny, tasks={"x": {"dataset": str(tiny["data"]), "splitt": "test"}})
    with pytest.raises(ConfigError, match="no split 'tset'.*test"):
        make_pool(tiny, tasks={"x": {"dataset": str(tiny["data"]), "split": "tset"}}).evaluate(
            perturbed_vision(tiny["clip"], 0))
    with pytest.raises(ConfigError, match=r"templates.*\{\}"):
        make_pool(tiny, tasks={"x": {"dataset": str(tiny["data"]), "templates": ["a photo"]}})
    with pytest.raises(ConfigError, match="no task 'colours'"):
        make_pool(tiny).evaluate(perturbed_vision(tiny["clip"], 0), tasks=["colours"])
    with pytest.raises(ConfigError, match="labels range"):
        make_pool(tiny, tasks={"x": {"dataset": str(tiny["data"]), "classnames": ["a", "b"]}}).evaluate(
            perturbed_vision(tiny["clip"], 0))
    with pytest.raises(CheckpointError, match="taskpool.clip_model"):
        make_pool({**tiny, "clip": tiny["root"] / "missing"}).evaluate(perturbed_vision(tiny["clip"], 0))
    pool = build_taskpool({"type": "clip_zeroshot", "clip_model": str(tiny["clip"]),
                           "tasks": {"colors": str(tiny["data"])}}, device="cpu")
    assert pool.tasks == ["colors"] and pool.config.device == "cpu"


def test_image_size_mismatch_is_reported(tiny, tmp_path):
    other = build_tiny_clip(tmp_path / "clip64", image_size=64)
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(other)
    with pytest.raises(ModelMismatchError, match="expects 64x64 images"):
        make_pool(tiny).evaluate(vision, tasks=["colors"])


def test_bf16_precision_close_to_float32(tiny):
    vision = perturbed_vision(tiny["clip"], seed=8, scale=0.3)
    exact = make_pool(tiny).evaluate(vision, tasks=["colors"])["tasks"]["colors"]
    fast = make_pool(tiny, precision="bf16").evaluate(vision, tasks=["colors"])["tasks"]["colors"]
    assert fast["loss"] == pytest.approx(exact["loss"], rel=0.05)
    assert abs(fast["accuracy"] - exact["accuracy"]) <= 2 / 18
    with pytest.raises(ConfigError, match="precision"):
        make_pool(tiny, precision="fp8")


def test_run_program_merges_and_evaluates(tiny, tmp_path):
    """A CLIP merge through run_program: the report's evaluation equals the pool on the reloaded model."""
    from transformers import CLIPVisionModel

    from fusion_bench.programs.fusion import run_program

    models = {"_pretrained_": str(tiny["clip"])}
    for i in (1, 2):
        perturbed_vision(tiny["clip"], seed=10 + i, scale=0.2).save_pretrained(tmp_path / f"ft{i}")
        models[f"ft{i}"] = str(tmp_path / f"ft{i}")
    taskpool = {"type": "clip_zeroshot", "clip_model": str(tiny["clip"]), "batch_size": 7,
                "tasks": {"colors": {"dataset": str(tiny["data"]), "templates": TEMPLATES},
                          "noise": {"dataset": str(tiny["data"]), "split": "test_gaussian_noise"}}}
    rep = run_program({"method": {"name": "task_arithmetic", "scaling_factor": 0.5},
                       "modelpool": {"models": models, "model_class": "clip_vision"}, "taskpool": taskpool,
                       "device": "cpu", "merged_model_path": str(tmp_path / "merged"),
                       "report_path": str(tmp_path / "report.json"), "print_table": False}, log=lambda *a: None)
    merged = CLIPVisionModel.from_pretrained(tmp_path / "merged")
    again = make_pool(tiny, tasks=taskpool["tasks"]).evaluate(merged)
    assert set(rep["evaluation"]["tasks"]) == {"colors", "noise"}
    for t in ("colors", "noise"):
        assert rep["evaluation"]["tasks"][t]["accuracy"] == again["tasks"][t]["accuracy"]
        assert rep["evaluation"]["tasks"][t]["loss"] == pytest.approx(again["tasks"][t]["loss"], rel=1e-5)
    splits = rep["evaluation_splits"]
    assert splits["noise"]["split"] == "test_gaussian_noise" and splits["colors"]["samples"] == 18
    assert json.loads((tmp_path / "report.json").read_text())["evaluation"]["average"] == rep["evaluation"]["average"]

    # an output ensemble of the same pool: members' logits averaged by the task pool
    from fusion_bench.methods.base import list_methods
    from fusion_bench.models.ensemble import Ensemble

    if "simple_ensemble" in list_methods():
        ens = run_program({"method": {"name": "simple_ensemble"}, "modelpool": {"models": models,
                           "model_class": "clip_vision"}, "taskpool": taskpool, "device": "cpu",
                           "print_table": False}, log=lambda *a: None)
        members = Ensemble([CLIPVisionModel.from_pretrained(tmp_path / f"ft{i}") for i in (1, 2)], mode="mean")
        direct = make_pool(tiny, tasks=taskpool["tasks"]).evaluate(members)
        assert ens["result_kind"] == "ensemble"
        for t in ("colors", "noise"):
            assert ens["evaluation"]["tasks"][t]["accuracy"] == direct["tasks"][t]["accuracy"]
            assert ens["evaluation"]["tasks"][t]["loss"] == pytest.approx(direct["tasks"][t]["loss"], rel=1e-5)


def test_classlabel_names_underscores_and_non_classlabel(tiny, tmp_path):
    import datasets

    data = build_image_dataset(tmp_path / "underscored", names=["big_cat", "dog", "bird"])
    vision = perturbed_vision(tiny["clip"], seed=9, scale=0.3)
    auto = make_pool(tiny, tasks={"t": {"dataset": str(data), "templates": TEMPLATES}})
    assert auto.classnames("t") == ["big cat", "dog", "bird"]
    explicit = make_pool(tiny, tasks={"t": {"dataset": str(data), "templates": TEMPLATES,
                                            "classnames": ["big cat", "dog", "bird"]}})
    assert auto.evaluate(vision) == explicit.evaluate(vision)
    # integer labels without ClassLabel: class names must be given
    ds = datasets.load_from_disk(str(data))["test"].cast_column("label", datasets.Value("int64"))
    with pytest.raises(ConfigError, match=r"not a ClassLabel.*taskpool\.tasks\.t\.classnames"):
        make_pool(tiny, tasks={"t": {"dataset": ds}}).evaluate(vision)
    ok = make_pool(tiny, tasks={"t": {"dataset": ds, "classnames": ["big cat", "dog", "bird"], "templates": TEMPLATES}})
    assert ok.evaluate(vision)["tasks"]["t"] == explicit.evaluate(vision)["tasks"]["t"]
