"""The offline CLIP zoo at tiny scale: build, kill + resume, damage detection, loading like a hub CLIP,
the clip_zoo pools, the clip_finetune method against the formulas, and a small leaderboard."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fusion_bench.benchmark.zoo import ENTRY_FILE, Zoo, check_entry

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory) -> tuple[Zoo, dict]:
    """A tiny zoo built by a `fusion_bench zoo build` process that is killed (SIGKILL) once the first
    entries exist, then resumed in-process. Returns the zoo and the resumed build's report."""
    root = tmp_path_factory.mktemp("zoo") / "tiny"
    env = {**os.environ, "FUSION_BENCH_CACHE": str(root.parent / "cache"), "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-m", "fusion_bench.cli", "zoo", "build", "--scale", "tiny", "--root",
                             str(root), "--threads", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    first = root / "data" / "letters" / ENTRY_FILE
    try:
        while proc.poll() is None and not first.exists():
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert first.exists(), "the killed build had not written its first entry"
    zoo = Zoo("tiny", root)
    status = zoo.status()
    assert status["data/letters"] is None  # complete entries survive the kill
    assert any(v is not None for v in status.values())  # ... and the build was really cut short
    report = zoo.build(progress=False, log=lambda s: None)
    return zoo, report


def test_killed_build_resumes(tiny_zoo):
    zoo, report = tiny_zoo
    assert report["entries"]["data/letters"]["status"] == "cached"  # not rebuilt
    assert report["entries"]["pretrained"]["status"] in ("built", "cached")
    assert zoo.is_built()
    assert not list(zoo.root.rglob(".*.fusion_bench-tmp-*"))  # no half-written entry left behind
    again = zoo.build(progress=False, log=lambda s: None)
    assert {v["status"] for v in again["entries"].values()} == {"cached"}
    manifest = json.loads((zoo.root / "manifest.json").read_text())
    assert set(manifest["entries"]) == {name for name, _ in zoo.entries()}


def test_damaged_entry_is_detected_and_rebuilt(tiny_zoo):
    zoo, _ = tiny_zoo
    task = zoo.tasks[-1]
    path = zoo.finetuned_path(task)
    weights = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip one byte of a tensor
    weights.write_bytes(bytes(data))
    why = check_entry(path, zoo.entry_key(f"finetuned/{task}"))
    assert why is not None and "damaged" in why and weights.name in why
    logs: list[str] = []
    report = zoo.build(progress=False, log=logs.append)
    assert report["entries"][f"finetuned/{task}"]["status"] == "built"
    assert [k for k, v in report["entries"].items() if v["status"] == "built"] == [f"finetuned/{task}"]
    assert any("damaged" in line for line in logs)
    assert zoo.is_built()


def test_pretrained_folder_loads_like_a_hub_clip(tiny_zoo):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer, CLIPVisionModel

    zoo, _ = tiny_zoo
    model = CLIPModel.from_pretrained(zoo.pretrained_path)
    processor = CLIPProcessor.from_pretrained(zoo.pretrained_path)
    assert isinstance(processor.tokenizer, CLIPTokenizer)
    text = ["a photo of the letter q.", "a satellite photo of forest."]
    batch = processor(text=text, images=[Image.new("RGB", (32, 32), (200, 10, 10))] * 2, return_tensors="pt",
                      padding=True)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    ids = batch["input_ids"][0].tolist()
    assert ids[0] == processor.tokenizer.bos_token_id and processor.tokenizer.eos_token_id in ids
    assert processor.tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == text[0].replace(" ", "")
    with torch.no_grad():
        out = model(**batch)
    assert out.logits_per_image.shape == (2, 2)
    vision = CLIPVisionModel.from_pretrained(zoo.finetuned_path(zoo.tasks[0]))
    assert vision.config.image_size == 32


def test_zoo_pools_and_default_style_run(tiny_zoo):
    from fusion_bench.modelpool.base import build_modelpool
    from fusion_bench.programs.fusion import run_program
    from fusion_bench.taskpool.base import build_taskpool

    zoo, _ = tiny_zoo
    pool = build_modelpool({"type": "clip_zoo", "scale": "tiny", "root": str(zoo.root), "build": False})
    assert pool.model_names == zoo.tasks and pool.has_pretrained
    info = pool.task_info("aerial")
    assert "forest" in info["classnames"] and all("{}" in t for t in info["templates"])
    assert len(pool.dataset("aerial", "train")) > 0
    tp = build_taskpool({"type": "clip_zoo", "scale": "tiny", "root": str(zoo.root), "build": False})
    assert tp.tasks == zoo.tasks
    rep = run_program({"method": {"name": "task_arithmetic"}, "print_table": False}, modelpool=pool, taskpool=tp,
                      log=lambda s: None)
    accs = [m["accuracy"] for m in rep["evaluation"]["tasks"].values()]
    assert len(accs) == 8 and all(0.0 <= a <= 1.0 for a in accs)
    # robustness split
    noisy = build_taskpool({"type": "clip_zoo", "scale": "tiny", "root": str(zoo.root), "build": False,
                            "corruption": zoo.corruptions()[0], "select": ["digits"]})
    assert noisy.tasks == ["digits"] and len(zoo.corruptions()) >= 5
    assert 0.0 <= noisy.evaluate(pool.load_model("digits"))["tasks"]["digits"]["accuracy"] <= 1.0


def test_incomplete_zoo_without_build_raises(tmp_path):
    from fusion_bench.errors import CheckpointError
    from fusion_bench.modelpool.base import build_modelpool

    with pytest.raises(CheckpointError, match="zoo build --scale tiny"):
        build_modelpool({"type": "clip_zoo", "scale": "tiny", "root": str(tmp_path / "none"), "build": False})


def test_tiny_leaderboard(tiny_zoo, tmp_path):
    from fusion_bench.benchmark.leaderboard import run_leaderboard

    zoo, _ = tiny_zoo
    doc = run_leaderboard("tiny", str(zoo.root), tmp_path / "lb",
                          methods=["simple_average", "task_arithmetic", "linear_interpolation", "clip_finetune"],
                          log=lambda s: None)
    rows = {r["method"]: r for r in doc["rows"]}
    assert {"pretrained", "fine-tuned (individual)", "simple_average", "task_arithmetic"} <= set(rows)
    assert set(doc["skipped"]) == {"linear_interpolation", "clip_finetune"}
    assert "two models" in doc["skipped"]["linear_interpolation"]
    ft = rows["fine-tuned (individual)"]
    assert ft["normalized"] == pytest.approx(1.0)
    ta = rows["task_arithmetic"]
    ref = [t for t in doc["tasks"] if ft["accuracy"][t] > 0]
    expected = sum(ta["accuracy"][t] / ft["accuracy"][t] for t in ref) / len(ref)
    assert ta["normalized"] == pytest.approx(expected)
    assert ta["average"] == pytest.approx(sum(ta["accuracy"].values()) / 8)
    assert ta["merge_time_s"] is not None and ta["data"] == "none"
    out = tmp_path / "lb"
    md = (out / "leaderboard.md").read_text()
    assert "| task_arithmetic |" in md and "linear_interpolation" in md
    with open(out / "leaderboard.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table][:2] == ["pretrained", "fine-tuned (individual)"]
    assert (out / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "leaderboard.json").read_text())["tasks"] == zoo.tasks


# ------------------------------------------------------------------------------------------------
# formulas: contrastive loss, fine-tuning step, LoRA rank
# ------------------------------------------------------------------------------------------------
def test_contrastive_loss_matches_naive_formula():
    from fusion_bench.benchmark.clip_pretrain import contrastive_loss

    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    txt = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    caps = torch.tensor([0, 1, 0, 2, 3, 1])
    scale = 7.0
    total = 0.0
    for i in range(6):  # image -> text and text -> image, positives spread over equal captions
        pos = [j for j in range(6) if caps[j] == caps[i]]
        li = [scale * float(img[i] @ txt[j]) for j in range(6)]
        lt = [scale * float(txt[i] @ img[j]) for j in range(6)]
        lse_i = torch.logsumexp(torch.tensor(li), 0).item()
        lse_t = torch.logsumexp(torch.tensor(lt), 0).item()
        total += sum(-(li[j] - lse_i) for j in pos) / len(pos) / 2
        total += sum(-(lt[j] - lse_t) for j in pos) / len(pos) / 2
    assert float(contrastive_loss(img, txt, scale, caps)) == pytest.approx(total / 6, rel=1e-5)
    # distinct captions: the standard CLIP loss with an identity target
    eye = 0.5 * (F.cross_entropy(scale * img @ txt.T, torch.arange(6)) + F.cross_entropy(scale * txt @ img.T, torch.arange(6)))
    assert float(contrastive_loss(img, txt, scale)) == pytest.approx(float(eye), rel=1e-6)


def test_batch_loss_runs_each_distinct_caption_once_with_the_same_loss_and_gradients():
    """batch_loss (the text tower on the batch's distinct captions only) against the plain computation: every
    pair through both towers at the full padded length, then the contrastive loss; loss and every gradient agree."""
    from fusion_bench.benchmark.clip_pretrain import batch_loss, contrastive_loss

    model = _tiny_clip().train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (4, 8), generator=g)
    lengths = torch.tensor([3, 8, 5, 2])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    tok = {"input_ids": ids * mask, "attention_mask": mask}
    caps = torch.tensor([2, 0, 2, 3, 0, 2])  # caption 1 is not in the batch; 2 and 0 repeat
    pixels = torch.randn(6, 3, 16, 16, generator=g)

    loss = batch_loss(model, pixels, tok, caps)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)

    from fusion_bench.models.clip import _as_tensor

    img = F.normalize(_as_tensor(model.get_image_features(pixel_values=pixels)), dim=-1)
    txt = F.normalize(_as_tensor(model.get_text_features(input_ids=tok["input_ids"][caps],
                                                         attention_mask=tok["attention_mask"][caps])), dim=-1)
    want = contrastive_loss(img, txt, model.logit_scale.exp().clamp(max=100.0), caps)
    want_grads = torch.autograd.grad(want, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    checked = 0
    for a, b in zip(grads, want_grads):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
            continue
        checked += 1
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert checked > 10


def test_preprocess_images_fast_path_matches_the_processor_and_falls_back():
    """The vectorized rescale + normalize of already-sized RGB images gives the PIL processor's pixel values bit for
    bit (chunked or not); a grayscale or other-sized image goes through the processor and gives its output exactly."""
    import numpy as np
    from PIL import Image

    from fusion_bench.benchmark.clip_pretrain import build_image_processor, preprocess_images

    rng = np.random.default_rng(0)
    proc = build_image_processor(16)
    rgb = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(5)]
    want = proc(images=rgb, return_tensors="pt")["pixel_values"].float()
    got = preprocess_images(rgb, proc)
    assert got.shape == want.shape == (5, 3, 16, 16)
    if type(proc).__name__.endswith("Pil"):  # transformers' NumPy arithmetic (no torchvision): the same bits
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    from fusion_bench.benchmark.clip_pretrain import _fast_pixels

    assert torch.equal(_fast_pixels(rgb, proc, chunk=2), got)
    # transformers' PIL arithmetic written out (NumPy): float32(float64(x) * 1/255), then (x - mean) / std in float32
    arr = np.stack([np.asarray(im) for im in rgb]).transpose(0, 3, 1, 2)
    scaled = (arr.astype(np.float64) * proc.rescale_factor).astype(np.float32)
    pil_ref = (scaled - np.array(proc.image_mean, np.float32)[None, :, None, None]) / np.array(
        proc.image_std, np.float32)[None, :, None, None]
    assert torch.equal(got, torch.from_numpy(np.ascontiguousarray(pil_ref)))
    # by hand from CLIP's definition: (x / 255 - mean) / std per channel
    x = torch.from_numpy(np.asarray(rgb[2])).permute(2, 0, 1).float() / 255
    by_hand = (x - torch.tensor(proc.image_mean)[:, None, None]) / torch.tensor(proc.image_std)[:, None, None]
    torch.testing.assert_close(got[2], by_hand, rtol=0, atol=1e-5)
    mixed = [*rgb[:2], Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)),  # grayscale
             Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))]  # needs resize and crop
    assert torch.equal(preprocess_images(mixed, proc), proc(images=mixed, return_tensors="pt")["pixel_values"].float())


def _tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=8, projection_dim=8),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        image_size=16, patch_size=8, projection_dim=8), projection_dim=8)
    torch.manual_seed(0)
    return CLIPModel(cfg).eval()


def _tiny_task(seed: int, n: int = 8):
    """The tiny CLIP, a random unit-norm 3-class head, n random images and labels 0, 1, 2, 0, ..."""
    g = torch.Generator().manual_seed(seed)
    head = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    return _tiny_clip(), head, torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 3


def test_finetune_step_matches_manual_adamw_on_the_zero_shot_loss():
    """One full fine-tuning step = AdamW's first step on CE(s * normalize(P f(x)) @ head^T, y)."""
    from fusion_bench.methods.training.clip_finetune import (
        CLIPFinetuneConfig,
        finetune_vision,
        vision_from_clip,
    )

    clip = _tiny_clip()
    g = torch.Generator().manual_seed(1)
    head = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    y = torch.tensor([0, 1, 2, 1])
    lr, wd = 1e-3, 0.1
    cfg = CLIPFinetuneConfig(steps=1, batch_size=4, lr=lr, weight_decay=wd, warmup_steps=0)
    tuned, _ = finetune_vision(clip, head, x, y, cfg, "t", torch.device("cpu"))

    ref = vision_from_clip(clip)  # naive: the formula written out, autograd for the gradient
    w0 = {k: v.detach().clone() for k, v in ref.named_parameters()}
    pooled = ref(pixel_values=x).pooler_output
    emb = pooled @ clip.visual_projection.weight.T
    emb = emb / emb.norm(dim=-1, keepdim=True)
    logits = clip.logit_scale.exp().item() * emb @ head.T
    loss = -torch.log_softmax(logits, -1)[torch.arange(4), y].mean()
    loss.backward()
    grads = {k: p.grad.detach() for k, p in ref.named_parameters()}
    gnorm = torch.sqrt(sum((v ** 2).sum() for v in grads.values()))
    clip_coef = min(1.0, 1.0 / (float(gnorm) + 1e-6))
    checked = 0
    for k, p in tuned.named_parameters():
        gk = grads[k] * clip_coef
        decay = wd if w0[k].ndim >= 2 else 0.0
        expected = w0[k] * (1 - lr * decay) - lr * gk / (gk.abs() + 1e-8)  # Adam's first step: m/sqrt(v) = g/|g|
        mask = gk.abs() > 1e-5  # where eps does not matter
        torch.testing.assert_close(p[mask], expected[mask], rtol=1e-4, atol=1e-6)
        checked += int(mask.sum())
    assert checked > 1000


def test_lora_finetune_changes_only_targets_by_rank_r():
    from fusion_bench.methods.training.clip_finetune import (
        CLIPFinetuneConfig,
        finetune_vision,
        vision_from_clip,
    )

    clip, head, x, y = _tiny_task(2)
    cfg = CLIPFinetuneConfig(mode="lora", steps=4, batch_size=8, lr=1e-2, lora_r=2, lora_alpha=4.0, warmup_steps=0)
    tuned, stats = finetune_vision(clip, head, x, y, cfg, "t", torch.device("cpu"))
    before = vision_from_clip(clip).state_dict()
    after = tuned.state_dict()
    assert set(before) == set(after)  # merged back into a plain CLIPVisionModel
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    for k in changed:
        assert torch.linalg.matrix_rank(after[k] - before[k], atol=1e-6) <= 2  # W + (alpha/r) B A
    assert stats["trainable_parameters"] == 2 * (2 * 16 + 16 * 2)  # one layer: q and v, each A (r x 16) + B (16 x r)


def test_finetune_decay_to_pretrained_is_l2sp_written_out():
    """decay_to=pretrained: step t moves every matrix by -lr_t * wd * (w - w0) besides Adam's update. Two steps:
    the first decays nothing (w = w0), so the runs with and without decay share w1 and the gradient at it; their
    second steps differ exactly by the decay term."""
    from fusion_bench.benchmark.clip_pretrain import warmup_cosine
    from fusion_bench.methods.training.clip_finetune import (
        CLIPFinetuneConfig,
        finetune_vision,
        vision_from_clip,
    )

    clip, head, x, y = _tiny_task(3, 4)
    lr, wd = 1e-2, 0.5
    w0 = dict(vision_from_clip(clip).named_parameters())
    runs = {}
    for name, kw in {"l2sp": dict(weight_decay=wd, decay_to="pretrained"), "none": dict(weight_decay=0.0),
                     "w1": dict(weight_decay=0.0, steps=1)}.items():
        cfg = CLIPFinetuneConfig(**{"steps": 2, "batch_size": 4, "lr": lr, "warmup_steps": 0, **kw})
        runs[name] = dict(finetune_vision(clip, head, x, y, cfg, "t", torch.device("cpu"))[0].named_parameters())
    rate = lr * warmup_cosine(1, 2, 0) * wd
    moved = 0
    for k, w in runs["l2sp"].items():
        w1 = runs["w1"][k]
        expected = runs["none"][k] - (rate * (w1 - w0[k]) if w.ndim >= 2 else 0.0)
        torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-7)
        moved += int(w.ndim >= 2 and not torch.equal(w, runs["none"][k]))
    assert moved > 0  # the decay term was not zero for the matrices


def test_finetune_trainable_patterns_freeze_the_rest():
    from fusion_bench.errors import ConfigError
    from fusion_bench.methods.training.clip_finetune import (
        CLIPFinetuneConfig,
        finetune_vision,
        vision_from_clip,
    )

    clip, head, x, y = _tiny_task(4)
    cfg = CLIPFinetuneConfig(steps=2, batch_size=8, lr=1e-2, warmup_steps=0, trainable=["*self_attn*"])
    tuned, stats = finetune_vision(clip, head, x, y, cfg, "t", torch.device("cpu"))
    before = dict(vision_from_clip(clip).named_parameters())
    after = dict(tuned.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    attn = {k for k in before if "self_attn" in k}
    assert changed == attn  # every attention weight moved, nothing else did
    assert stats["trainable_parameters"] == sum(before[k].numel() for k in attn)
    with pytest.raises(ConfigError, match=r"method.trainable=\['\*nothing\*'\] matches no parameter"):
        finetune_vision(clip, head, x, y, CLIPFinetuneConfig(steps=1, trainable=["*nothing*"]), "t",
                        torch.device("cpu"))
    with pytest.raises(ConfigError, match="method.trainable"):
        CLIPFinetuneConfig(mode="lora", trainable=["*q_proj*"])


def test_finetune_config_errors_name_the_key():
    from fusion_bench.errors import ConfigError
    from fusion_bench.methods import build_method

    with pytest.raises(ConfigError, match="method.steps"):
        build_method({"name": "clip_finetune", "steps": 0})
    with pytest.raises(ConfigError, match="mode"):
        build_method({"name": "clip_finetune", "mode": "qlora"})


def test_cli_run_on_the_tiny_zoo_prints_the_table(tiny_zoo, tmp_path, monkeypatch, capsys):
    from fusion_bench.cli import main

    zoo, _ = tiny_zoo
    monkeypatch.chdir(tmp_path)
    try:
        main(["modelpool=clip_zoo_tiny", "taskpool=clip_zoo_tiny", f"modelpool.root={zoo.root}",
              f"taskpool.root={zoo.root}", "modelpool.build=false", "taskpool.build=false"])
    except SystemExit as e:  # hydra may exit explicitly; only success is accepted
        assert e.code in (0, None)
    out = capsys.readouterr().out
    assert "| **average** |" in out and all(f"| {t} |" in out for t in zoo.tasks)
    report = json.loads(next(tmp_path.glob("outputs/task_arithmetic/*/report.json")).read_text())
    assert report["method"]["name"] == "task_arithmetic" and report["modelpool"]["type"] == "clip_zoo"


def test_random_shift_matches_naive_translation_with_repeated_edges():
    from fusion_bench.methods.training.clip_finetune import random_shift

    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    out = random_shift(x, 2, torch.Generator().manual_seed(3))
    offsets = torch.randint(0, 5, (2, 2), generator=torch.Generator().manual_seed(3)).tolist()
    for i, (a, b) in enumerate(offsets):
        for c in range(3):
            for yy in range(5):
                for xx in range(6):
                    src_y, src_x = min(max(yy + a - 2, 0), 4), min(max(xx + b - 2, 0), 5)
                    assert out[i, c, yy, xx] == x[i, c, src_y, src_x]


def test_zoo_corruptions_by_name_or_count(monkeypatch):
    from dataclasses import replace

    from fusion_bench.benchmark import zoo as Z
    from fusion_bench.benchmark.corruptions import CORRUPTIONS
    from fusion_bench.errors import ConfigError

    full = Z.Zoo("full", root="unused")
    assert len(full.corruptions()) >= 5 and set(full.corruptions()) <= set(CORRUPTIONS)
    assert Z.Zoo("tiny", root="unused").corruptions() == list(CORRUPTIONS)[:5]
    monkeypatch.setitem(Z.SCALES, "tiny", replace(Z.SCALES["tiny"], corruptions=["contrast", "pixelat"]))
    with pytest.raises(ConfigError, match="pixelat.*pixelate"):
        Z.Zoo("tiny", root="unused").corruptions()


def test_build_gives_the_same_bytes_whatever_the_thread_setting_and_worker_count(tiny_zoo, tmp_path):
    """The trained entries depend on torch's thread count, so the build fixes it (BUILD_THREADS for the
    pretraining, FINETUNE_THREADS for each fine-tuning): a build started under another torch.set_num_threads,
    with its fine-tunings one after another in this process (workers=1), gives the same content hashes as
    the fixture's build (fine-tunings in two worker processes)."""
    import shutil

    from fusion_bench.benchmark.zoo import BUILD_THREADS

    zoo, _ = tiny_zoo
    other = Zoo("tiny", tmp_path / "tiny")
    shutil.copytree(zoo.root / "data", other.root / "data")  # the data entries are cached: only training reruns
    before = torch.get_num_threads()
    torch.set_num_threads(1 if BUILD_THREADS != 1 else 2)
    try:
        other.build(progress=False, log=lambda s: None, workers=1)
        assert torch.get_num_threads() == (1 if BUILD_THREADS != 1 else 2)  # the caller's setting is restored
    finally:
        torch.set_num_threads(before)
    mine = json.loads((zoo.root / "manifest.json").read_text())["entries"]
    theirs = json.loads((other.root / "manifest.json").read_text())["entries"]
    trained = [n for n in mine if not n.startswith("data/")]
    assert trained and {n: theirs[n]["content_hash"] for n in trained} == {n: mine[n]["content_hash"] for n in trained}


def test_default_lambda_recorded_and_verify_against_reference(tiny_zoo, monkeypatch, tmp_path):
    """The build records task arithmetic's scaling factor chosen on the validation split (the grid's best
    average validation accuracy, recomputed here); `zoo verify` compares every entry with the reference build's
    content hashes and names the ones that differ."""
    from fusion_bench.benchmark import zoo as Z
    from fusion_bench.benchmark.leaderboard import select_scaling_factor
    from fusion_bench.methods import get_method_class
    from fusion_bench.modelpool import build_modelpool
    from fusion_bench.taskpool.base import build_taskpool

    zoo, _ = tiny_zoo
    zoo.build(progress=False, log=lambda s: None)
    run = zoo.default_run()
    assert run is not None and run["split"] == "validation" and run["grid"] == list(Z.DEFAULT_LAMBDA_GRID)
    cfg = {"type": "clip_zoo", "scale": "tiny", "root": str(zoo.root), "build": False}
    sel = select_scaling_factor(get_method_class("task_arithmetic"), build_modelpool(cfg),
                                build_taskpool({**cfg, "split": "validation"}), Z.DEFAULT_LAMBDA_GRID)
    assert run["scaling_factor"] == sel["scaling_factor"]
    assert json.loads((zoo.root / "manifest.json").read_text())["default_run"]["scaling_factor"] == sel["scaling_factor"]

    manifest = json.loads((zoo.root / "manifest.json").read_text())["entries"]
    ref = {name: m["content_hash"] for name, m in manifest.items()}
    ref["finetuned/" + zoo.tasks[0]] = "0" * 64
    ref_file = tmp_path / "zoo_reference.json"
    ref_file.write_text(json.dumps({"tiny": {"entries": ref}}))
    monkeypatch.setattr(Z, "REFERENCE_FILE", ref_file)
    lines: list[str] = []
    assert Z.verify(zoo, lines.append) == 0
    differ = [ln for ln in lines if "DIFFERS" in ln]
    assert len(differ) == 1 and differ[0].startswith("finetuned/" + zoo.tasks[0])
    assert any("1 entries differ" in ln for ln in lines)
    assert sum("same as the reference build" in ln for ln in lines) == len(ref) - 1
