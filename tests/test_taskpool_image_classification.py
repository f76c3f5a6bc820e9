"""The image classification task pool against by-hand accuracy / cross-entropy on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion_bench.errors import ConfigError, ModelMismatchError
from tests.test_taskpool_clip import build_image_dataset


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPImageProcessor, ViTConfig, ViTForImageClassification

    root = tmp_path_factory.mktemp("imgcls")
    data = build_image_dataset(root / "data", n_per_class=5)
    proc_dir = root / "proc"
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(proc_dir)
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                    patch_size=8, num_labels=3)
    return {"root": root, "data": data, "proc": proc_dir, "vit": ViTForImageClassification(cfg).eval(),
            "vit2": ViTForImageClassification(cfg).eval()}


def reference(setup, logits_fn, split="test"):
    import datasets
    from transformers import CLIPImageProcessor

    ds = datasets.load_from_disk(str(setup["data"]))[split]
    proc = CLIPImageProcessor.from_pretrained(setup["proc"])
    correct, loss = 0, 0.0
    with torch.no_grad():
        px = proc(images=[im.convert("RGB") for im in ds["image"]], return_tensors="pt")["pixel_values"]
        logits = logits_fn(px).double()
        for z, y in zip(logits, ds["label"]):
            correct += int(int(z.argmax()) == y)
            loss += float(torch.logsumexp(z, 0) - z[y])
    return correct / len(ds), loss / len(ds)


def make_pool(setup, **kw):
    from fusion_bench.taskpool.image_classification import ImageClassificationTaskPool

    tasks = kw.pop("tasks", None) or {"colors": str(setup["data"]),
                                      "noisy": {"dataset": str(setup["data"]), "split": "test_gaussian_noise"}}
    return ImageClassificationTaskPool({"tasks": tasks, "processor": str(setup["proc"]), "batch_size": 4,
                                        "device": "cpu", **kw})


def test_hf_classifier_matches_reference(setup):
    rep = make_pool(setup).evaluate(setup["vit"])
    for task, split in (("colors", "test"), ("noisy", "test_gaussian_noise")):
        acc, loss = reference(setup, lambda px: setup["vit"](pixel_values=px).logits, split)
        assert rep["tasks"][task]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert rep["tasks"][task]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert set(rep["average"]) == {"accuracy", "loss"}


def test_feature_extractor_with_head_file_and_plain_module(setup, tmp_path):
    from safetensors.torch import save_file

    vit = setup["vit"].vit  # ViTModel: pooler_output is None without a pooler -> use a plain wrapper

    class Features(nn.Module):  # forward(x) without pixel_values: called positionally
        def __init__(self):
            super().__init__()
            self.body = vit

        def forward(self, x):
            return self.body(pixel_values=x).last_hidden_state[:, 0]

    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(3, 32, generator=g), torch.randn(3, generator=g)
    save_file({"classifier.weight": w, "classifier.bias": b}, str(tmp_path / "head.safetensors"))
    model = Features().eval()
    pool = make_pool(setup, tasks={"colors": {"dataset": str(setup["data"]), "head": str(tmp_path / "head.safetensors")}})
    rep = pool.evaluate(model)
    acc, loss = reference(setup, lambda px: model(px) @ w.T + b)
    assert rep["tasks"]["colors"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rep["tasks"]["colors"]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)


def test_ensemble_and_transform_processor(setup):
    import datasets
    from transformers import CLIPImageProcessor

    from fusion_bench.models.ensemble import Ensemble

    proc = CLIPImageProcessor.from_pretrained(setup["proc"])

    def transform(im):  # a per-image callable instead of a processor folder
        return proc(images=[im], return_tensors="pt")["pixel_values"][0]

    a, b = setup["vit"], setup["vit2"]
    rep = make_pool(setup, processor=transform).evaluate(Ensemble([a, b], mode="mean"), tasks=["colors"])
    acc, loss = reference(setup, lambda px: (a(pixel_values=px).logits + b(pixel_values=px).logits) / 2)
    assert rep["tasks"]["colors"]["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert rep["tasks"]["colors"]["loss"] == pytest.approx(loss, rel=1e-4, abs=1e-5)
    assert len(datasets.load_from_disk(str(setup["data"]))["test"]) == 15


def test_errors(setup, tmp_path):
    from fusion_bench.taskpool.image_classification import ImageClassificationTaskPool

    with pytest.raises(ConfigError, match="taskpool.processor is required"):
        ImageClassificationTaskPool({"tasks": {"t": str(setup["data"])}})
    with pytest.raises(ConfigError, match=r"taskpool\.tasks\.t\.haed.*head"):
        make_pool(setup, tasks={"t": {"dataset": str(setup["data"]), "haed": None}})
    from transformers import ViTConfig, ViTForImageClassification

    five = ViTForImageClassification(ViTConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                               num_attention_heads=4, image_size=32, patch_size=8, num_labels=5))
    with pytest.raises(ModelMismatchError, match="'colors' has 3 classes but the model gives 5 logits"):
        make_pool(setup).evaluate(five, tasks=["colors"])
    torch.save({"w.weight": torch.zeros(3, 8), "v.weight": torch.zeros(3, 8)}, tmp_path / "two.pt")
    from fusion_bench.errors import CheckpointError

    with pytest.raises(CheckpointError, match="exactly one 2-D weight"):
        make_pool(setup, tasks={"t": {"dataset": str(setup["data"]), "head": str(tmp_path / "two.pt")}}).evaluate(
            setup["vit"])
