"""Flan-T5 GLUE (text-to-text) and GPT-2 GLUE (sequence classification) hub experiments, offline.

The shipped configs run unchanged through the CLI against a local Hugging Face cache of tiny random
models and tiny GLUE splits under the real ids and schemas (tests/hubcache_text.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fusion_bench.hub.glue import FLAN_T5_POOLS, GLUE_TASKS, GPT2_TASKS, generated_configs
from tests.conftest import run_cli
from tests.hubcache_text import build_text_hub_cache, use_text_hub_cache

CONFIG_DIR = Path(__file__).resolve().parents[1] / "fusion_bench" / "config"


@pytest.fixture(scope="session")
def text_hub(tmp_path_factory):
    return build_text_hub_cache(tmp_path_factory.mktemp("text_hub"))


@pytest.fixture
def hub(text_hub, monkeypatch, tmp_path):
    use_text_hub_cache(monkeypatch, text_hub)
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path / "fb_cache"))
    monkeypatch.chdir(tmp_path)
    return text_hub


def _run(capsys, tmp_path, *args):
    rep = tmp_path / f"report_{len(list(tmp_path.glob('report_*')))}.json"
    code, out, err = run_cli([*args, f"report_path={rep}", "print_table=false"], capsys)
    return code, out, err, (json.loads(rep.read_text()) if rep.exists() else None)


# -- one source of truth ----------------------------------------------------------------------
def test_shipped_configs_equal_the_generator():
    for rel, text in generated_configs().items():
        p = CONFIG_DIR / rel
        assert p.exists(), f"{rel} is not shipped; run python -m fusion_bench.hub.glue"
        assert p.read_text(encoding="utf-8") == text, f"{rel} differs from fusion_bench/hub/glue.py's output"
        assert text.startswith("# fusion_bench "), rel  # every shipped YAML begins with its command


# hand-written from FusionBench's glue_prompt_templates.py / gpt2 configs: (text fields, label words, eval split)
EXPECTED = {
    "cola": (1, ["unacceptable", "acceptable"], "validation", "Indicate if the following sentence"),
    "mnli": (2, ["entailment", "neutral", "contradiction"], "validation_matched", "Does the premise:"),
    "mrpc": (2, ["no", "yes"], "validation", "Are the following sentences"),
    "qnli": (2, ["yes", "no"], "validation", "Given the context:"),
    "qqp": (2, ["no", "yes"], "validation", "Do the questions"),
    "rte": (2, ["yes", "no"], "validation", "Does the text:"),
    "sst2": (1, ["negative", "positive"], "validation", "Given the sentence"),
    "stsb": (2, "{:.1f}", "validation", "Consider the sentences"),
}


def test_glue_table_matches_fusionbench():
    assert list(GLUE_TASKS) == list(EXPECTED)
    assert GPT2_TASKS == ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2"]
    for t, (n_fields, targets, split, start) in EXPECTED.items():
        g = GLUE_TASKS[t]
        assert len(g.text_fields) == n_fields and g.eval_split == split and g.prompt.startswith(start), t
        assert (list(g.targets) if not isinstance(g.targets, str) else g.targets) == targets, t
        assert all("{" + f + "}" in g.prompt for f in g.text_fields), t
    assert set(FLAN_T5_POOLS) == {"flan-t5-base_glue", "flan-t5-base_glue_lora16", "flan-t5-large_glue_lora16"}


def test_docs_table_counts():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "hub_text_experiments.md").read_text()
    for t in GLUE_TASKS:
        assert f"| {t} |" in doc, t
    for row in ("| Simple Average | 55.0 | 55.1 | 51.0 | 57.6 | 76.7 | 44.8 | 52.5 | 56.1 |",
                "| RegMean | 61.7 | 70.4 | 65.4 | 69.7 | 78.8 | 56.0 | 79.7 | 68.8 |",
                "| Ties-Merging (λ=0.3) | 70.3 | 65.0 | 78.9 | 90.2 | 83.5 | 81.6 | 91.7 | 78.3 | 79.9 |"):
        assert row in doc, row


# -- scoring ----------------------------------------------------------------------------------
class _Echo(torch.nn.Module):
    """A stand-in generator that answers the given strings (tokenized) in order."""

    def __init__(self, tok, answers):
        super().__init__()
        self.tok, self.answers, self.i = tok, list(answers), 0
        self.p = torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask=None, **kw):
        n = input_ids.shape[0]
        out = self.answers[self.i:self.i + n]
        self.i += n
        enc = self.tok(out, padding=True, return_tensors="pt")["input_ids"]
        return torch.cat([torch.zeros(n, 1, dtype=torch.long), enc], 1)


def test_text_to_text_scoring(hub):
    import yaml

    from fusion_bench.taskpool.text_to_text import TextToTextTaskPool, parse_float, spearman_rho

    cfg = yaml.safe_load((CONFIG_DIR / "taskpool" / "flan-t5_glue_text_generation.yaml").read_text())
    pool = TextToTextTaskPool(cfg)
    prompts, labels = pool.examples("cola")
    assert prompts[0].startswith("Indicate if the following sentence is grammatically correct or not: \"")
    words = [pool.target_text("cola", y) for y in labels]
    right = TextToTextTaskPool(cfg).evaluate(_Echo(pool.tokenizer, words), tasks=["cola"])
    assert right["tasks"]["cola"]["accuracy"] == 1.0
    wrong = [w if i % 4 else "maybe" for i, w in enumerate(words)]
    assert TextToTextTaskPool(cfg).evaluate(_Echo(pool.tokenizer, wrong), tasks=["cola"])["tasks"]["cola"]["accuracy"] == 0.75
    _, y = pool.examples("stsb")
    rep = TextToTextTaskPool(cfg).evaluate(_Echo(pool.tokenizer, [f"{float(v):.1f}" for v in y]), tasks=["stsb"])
    assert rep["tasks"]["stsb"]["spearman_rho"] > 0.95 and rep["tasks"]["stsb"]["score"] == rep["tasks"]["stsb"]["spearman_rho"]
    assert parse_float("3.8") == 3.8 and parse_float("yes") == 0.0
    assert spearman_rho([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_gpt2_head_and_backbone_layout(hub):
    """The task pool's classifier equals the fine-tuned GPT2ForSequenceClassification on the same texts."""
    import yaml
    from transformers import GPT2ForSequenceClassification

    from fusion_bench.modelpool import build_modelpool
    from fusion_bench.taskpool import build_taskpool

    mp = build_modelpool(yaml.safe_load((CONFIG_DIR / "modelpool" / "gpt2_glue.yaml").read_text()))
    tp = build_taskpool(yaml.safe_load((CONFIG_DIR / "taskpool" / "gpt2_glue.yaml").read_text()))
    backbone = mp.load_model("mrpc")
    assert type(backbone).__name__ == "GPT2Model"
    full = GPT2ForSequenceClassification.from_pretrained(hub["models"]["tanganke/gpt2_mrpc"]).eval()
    ours = tp.evaluate(backbone, tasks=["mrpc"])["tasks"]["mrpc"]
    ids, labels = tp.examples("mrpc")
    from fusion_bench.models.text_classification import pad_batch

    x, m = pad_batch(ids, tp.tokenizer("mrpc").pad_token_id)
    with torch.no_grad():
        z = full(input_ids=x, attention_mask=m).logits
    assert ours["accuracy"] == pytest.approx(float((z.argmax(-1) == labels).float().mean()))
    assert ours["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(z, labels)), rel=1e-4)


def test_lora_adapters_merged_into_full_weights(hub):
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    from fusion_bench.modelpool import build_modelpool

    mp = build_modelpool(yaml.safe_load((CONFIG_DIR / "modelpool" / "flan-t5-base_glue_lora16.yaml").read_text()))
    assert mp.is_adapter("cola") and not mp.is_adapter("_pretrained_")
    m = mp.load_model("cola")
    base = AutoModelForSeq2SeqLM.from_pretrained(hub["models"]["google/flan-t5-base"])
    ref = PeftModel.from_pretrained(base, str(hub["models"]["tanganke/flan-t5-base_glue-cola_lora-16"])).merge_and_unload()
    k = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.allclose(m.state_dict()[k], ref.state_dict()[k])
    fresh = AutoModelForSeq2SeqLM.from_pretrained(hub["models"]["google/flan-t5-base"])
    assert not torch.allclose(m.state_dict()[k], fresh.state_dict()[k])  # the adapter changed q
    assert mp.source("cola").get(k).shape == ref.state_dict()[k].shape


# -- shipped configs through the CLI ------------------------------------------------------------
FLAN_RUNS = [(pool, method) for pool in FLAN_T5_POOLS for method in ("task_arithmetic", "ties_merging", "simple_average")]


@pytest.mark.parametrize("pool,method", FLAN_RUNS)
def test_flan_t5_shipped_configs_run(hub, capsys, tmp_path, pool, method):
    code, out, err, rep = _run(capsys, tmp_path, f"method={method}", f"modelpool={pool}",
                               "taskpool=flan-t5_glue_text_generation")
    assert code == 0, err
    assert sorted(rep["evaluation"]["tasks"]) == sorted(GLUE_TASKS)
    assert "accuracy" in rep["evaluation"]["tasks"]["cola"] and "spearman_rho" in rep["evaluation"]["tasks"]["stsb"]
    assert "score" in rep["evaluation"]["average"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties_merging", "simple_average", "simple_ensemble",
                                    "fisher_merging", "regmean", "adamerging"])
def test_gpt2_shipped_configs_run(hub, capsys, tmp_path, method):
    extra = {"adamerging": ["method.steps=2"], "fisher_merging": ["method.num_fisher_examples=4"],
             "regmean": ["method.num_regmean_examples=4"]}.get(method, [])
    code, out, err, rep = _run(capsys, tmp_path, f"method={method}", "modelpool=gpt2_glue", "taskpool=gpt2_glue", *extra)
    assert code == 0, err
    assert sorted(rep["evaluation"]["tasks"]) == sorted(GPT2_TASKS)
    assert 0.0 <= rep["evaluation"]["average"]["accuracy"] <= 1.0 and "loss" in rep["evaluation"]["average"]


@pytest.mark.parametrize("method,why", [("simple_ensemble", "output ensembles of seq2seq models are not supported"),
                                        ("fisher_merging", "does not run on this model pool")])
def test_flan_t5_refusals_are_one_line(hub, capsys, tmp_path, method, why):
    code, out, err, rep = _run(capsys, tmp_path, f"method={method}", "modelpool=flan-t5-base_glue",
                               "taskpool=flan-t5_glue_text_generation")
    assert code != 0 and why in err and rep is None
    assert len([ln for ln in err.strip().splitlines() if ln.startswith("error")]) == 1


@pytest.mark.parametrize("pool,tp", [*[(p, "flan-t5_glue_text_generation") for p in FLAN_T5_POOLS],
                                     ("gpt2_glue", "gpt2_glue")])
def test_dry_run(hub, capsys, tmp_path, pool, tp):
    code, out, err, _ = _run(capsys, tmp_path, "method=ties_merging", f"modelpool={pool}", f"taskpool={tp}",
                             "dry_run=true")
    assert code == 0, err
    assert "dry run" in out

