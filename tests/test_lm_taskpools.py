"""Language-model task pools: causal_lm_perplexity, lm_eval (offline, a task on local data) and
causal_lm_generation, each against a reference computed directly from the model; and the CLI."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from fusion_bench.data.lm_text import load_texts, tokenize_joined
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.taskpool import build_taskpool
from fusion_bench.taskpool.causal_lm_perplexity import window_plan
from fusion_bench.testing.tiny_lm import byte_tokenizer, save_tiny_llama_pool, tiny_llama


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(seed=1).eval(), byte_tokenizer()


# ----------------------------------------------------------------------------------------------
# perplexity
# ----------------------------------------------------------------------------------------------
def guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The Hugging Face perplexity guide's loop: labels -100 on the context part, the model's own mean loss
    times the number of predicted tokens (labels shift inside the model)."""
    n = ids.numel()
    nll_sum, n_tok, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        x = ids[begin:end][None]
        y = x.clone()
        y[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=y).loss
        valid = int((y[:, 1:] != -100).sum())
        nll_sum += float(loss) * valid
        n_tok += valid
        prev_end = end
        if end == n:
            break
    return math.exp(nll_sum / n_tok), n_tok


@pytest.mark.parametrize("max_length,stride,batch", [(64, 32, 1), (64, 64, 1), (50, 17, 3), (200, 100, 2)])
def test_perplexity_matches_hf_guide(lm, max_length, stride, batch):
    model, tok = lm
    tp = build_taskpool({"type": "causal_lm_perplexity", "max_length": max_length, "stride": stride,
                         "batch_size": batch, "max_tokens": 700}, tokenizer=tok)
    rep = tp.evaluate(model)
    m = rep["tasks"]["builtin"]
    ids = tokenize_joined(tok, load_texts("builtin", split="test"), add_special_tokens=True)[:700]
    ref_ppl, ref_n = guide_perplexity(model, ids, max_length, stride)
    assert m["tokens"] == ref_n
    assert m["perplexity"] == pytest.approx(ref_ppl, rel=1e-4)
    assert m["nll"] == pytest.approx(math.log(ref_ppl), rel=1e-4)
    assert m["tokens_per_s"] > 0 and m["forward_tokens"] >= m["tokens"]
    assert tp.report_extras()["evaluation_splits"]["builtin"]["text_sha256"]


def test_single_window_is_the_model_loss(lm):
    model, tok = lm
    tp = build_taskpool({"type": "causal_lm_perplexity", "max_length": 200, "stride": 200, "max_tokens": 200},
                        tokenizer=tok)
    ids = tokenize_joined(tok, load_texts("builtin", split="test"), add_special_tokens=True)[:200]
    with torch.no_grad():
        loss = float(model(input_ids=ids[None], labels=ids[None]).loss)
    m = tp.evaluate(model)["tasks"]["builtin"]
    assert m["tokens"] == 199
    assert m["nll"] == pytest.approx(loss, rel=1e-5)


def test_window_clipped_to_the_model(lm):
    model, tok = lm  # max_position_embeddings 256: window 256, stride scaled to 128
    tp = build_taskpool({"type": "causal_lm_perplexity", "max_length": 1024, "stride": 512, "max_tokens": 600},
                        tokenizer=tok)
    m = tp.evaluate(model)["tasks"]["builtin"]
    ids = tokenize_joined(tok, load_texts("builtin", split="test"), add_special_tokens=True)[:600]
    ref, n = guide_perplexity(model, ids, 256, 128)
    assert m["tokens"] == n and m["perplexity"] == pytest.approx(ref, rel=1e-4)
    info = tp.report_extras()["evaluation_splits"]["builtin"]
    assert info["max_length"] == 256 and info["stride"] == 128


def test_window_plan_scores_each_token_once():
    for n, ml, st in [(100, 10, 3), (100, 10, 10), (7, 10, 5), (101, 16, 8), (64, 16, 16)]:
        scored = [t for _, e, f in window_plan(n, ml, st) for t in range(f, e)]
        # overlapping windows score every token but the first; disjoint windows skip each window's first token
        assert scored == [t for t in range(1, n) if st < ml or t % ml]
        for b, e, f in window_plan(n, ml, st):
            assert e - b <= ml and f > b


def test_perplexity_errors(lm, tmp_path):
    model, tok = lm
    with pytest.raises(ConfigError, match="stride"):
        build_taskpool({"type": "causal_lm_perplexity", "max_length": 8, "stride": 16})
    with pytest.raises(ConfigError, match="max_lenght"):
        build_taskpool({"type": "causal_lm_perplexity", "max_lenght": 8})
    small = tiny_llama(config=None)
    small.config.vocab_size = 100  # the byte tokenizer produces ids up to 257
    tp = build_taskpool({"type": "causal_lm_perplexity", "max_length": 32, "stride": 32, "max_tokens": 64},
                        tokenizer=tok)
    with pytest.raises(ModelMismatchError, match="vocabulary"):
        tp.evaluate(small)
    # no tokenizer given and none beside the model: one line naming the fix
    tp2 = build_taskpool({"type": "causal_lm_perplexity"})
    model.config._name_or_path = str(tmp_path)
    with pytest.raises(ConfigError, match="taskpool.tokenizer"):
        tp2.evaluate(model)


# ----------------------------------------------------------------------------------------------
# lm_eval on a task defined from local data
# ----------------------------------------------------------------------------------------------
QUESTIONS = [("The sky on a clear day is", ["blue", "green", "loud"], 0),
             ("Water is", ["dry", "wet"], 1), ("Fire is", ["hot", "cold", "soft", "square"], 0),
             ("Snow is", ["black", "white"], 1), ("A year has", ["twelve months", "nine months"], 0),
             ("Bread is made from", ["flour", "stone"], 0), ("The moon orbits", ["the earth", "a chair"], 0),
             ("Cats say", ["woof", "meow"], 1), ("Two plus two is", ["five", "four", "three"], 1),
             ("Ice is", ["cold", "hot"], 0), ("Glaciers move", ["slowly", "quickly"], 0),
             ("The sun rises in the", ["west", "east"], 1)]


def write_local_task(folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    (folder / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'tiny_mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")


def reference_mc(model, tok) -> tuple[float, float]:
    """acc and acc_norm from the model directly: log p(" " + choice | question) summed over the choice's
    tokens (the context tokenized with BOS, as lm-eval's HFLM does with this tokenizer); acc_norm divides by
    the choice's length in characters (without the space before it)."""
    acc = acc_norm = 0
    for q, choices, ans in QUESTIONS:
        lls, norms = [], []
        for c in choices:
            ctx = tok(q)["input_ids"]
            whole = tok(q + " " + c)["input_ids"]
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].float(), -1)
            ll = sum(float(logp[len(ctx) + i - 1, t]) for i, t in enumerate(cont))
            lls.append(ll)
            norms.append(ll / len(c))
        acc += int(max(range(len(lls)), key=lls.__getitem__) == ans)
        acc_norm += int(max(range(len(norms)), key=norms.__getitem__) == ans)
    return acc / len(QUESTIONS), acc_norm / len(QUESTIONS)


def test_lm_eval_local_task_matches_reference(tmp_path, monkeypatch):
    try:
        import lm_eval  # noqa: F401
    except ImportError:  # not skipped: the test extra installs lm-eval
        pytest.fail("lm-eval is not installed; pip install 'fusion_bench[test]' (it includes lm-eval)")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    write_local_task(tmp_path / "tasks")
    tok = byte_tokenizer()
    scores = []
    for seed in (2, 3):
        model = tiny_llama(seed=seed)
        tp = build_taskpool({"type": "lm_eval", "tasks": ["tiny_mc"], "include_path": str(tmp_path / "tasks"),
                             "include_defaults": False, "batch_size": 4, "device": "cpu"}, tokenizer=tok)
        rep = tp.evaluate(model)
        m = rep["tasks"]["tiny_mc"]
        acc, acc_norm = reference_mc(model, tok)
        assert m["acc"] == pytest.approx(acc) and m["acc_norm"] == pytest.approx(acc_norm)
        assert rep["average"]["acc"] == pytest.approx(acc)
        info = tp.report_extras()["taskpool_info"]
        assert info["n-samples"]["tiny_mc"]["effective"] == len(QUESTIONS) and info["lm_eval_version"]
        scores.append((m["acc"], m["acc_norm"]))
    with pytest.raises(ConfigError, match="knows no task 'tiny_mcc'.*tiny_mc"):
        build_taskpool({"type": "lm_eval", "tasks": ["tiny_mcc"], "include_path": str(tmp_path / "tasks"),
                        "include_defaults": False}, tokenizer=tok).evaluate(tiny_llama())


def test_lm_eval_missing_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    tp = build_taskpool({"type": "lm_eval", "tasks": ["arc_easy"]}, tokenizer=byte_tokenizer())
    with pytest.raises(ConfigError, match=r"pip install 'fusion_bench\[lm-eval\]'"):
        tp.evaluate(tiny_llama())


# ----------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------
def greedy_reference(model, tok, prompt: str, n: int) -> list[int]:
    ids = tok(prompt)["input_ids"]
    out = []
    for _ in range(n):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        out.append(nxt)
        if nxt == tok.eos_token_id:
            break
    return out


def test_generation_greedy_and_seeded_sampling(lm, tmp_path):
    model, tok = lm
    (tmp_path / "p.txt").write_text("Snow falls\n\n  \nThe mill wheel\n")
    tp = build_taskpool({"type": "causal_lm_generation", "prompts": ["The tide"], "prompts_file":
                         str(tmp_path / "p.txt"), "max_new_tokens": 6, "device": "cpu"}, tokenizer=tok)
    assert tp.prompts == ["The tide", "Snow falls", "The mill wheel"]
    rep = tp.evaluate(model)
    gens = tp.report_extras()["generations"]
    for g in gens:
        ref = greedy_reference(model, tok, g["prompt"], 6)
        assert g["new_tokens"] == len(ref)
        assert g["output"] == tok.decode(ref, skip_special_tokens=True)
    r = rep["tasks"]["generation"]
    assert r["prompts"] == 3 and r["new_tokens"] == sum(g["new_tokens"] for g in gens) and r["tokens_per_s"] > 0

    def sampled(seed):
        t = build_taskpool({"type": "causal_lm_generation", "max_new_tokens": 12, "do_sample": True, "seed": seed,
                            "device": "cpu"}, tokenizer=tok)
        t.evaluate(model)
        return [g["output"] for g in t.report_extras()["generations"]]

    assert sampled(5) == sampled(5)
    assert sampled(5) != sampled(6)
    with pytest.raises(ConfigError, match="no prompt"):
        build_taskpool({"type": "causal_lm_generation", "prompts": []})


# ----------------------------------------------------------------------------------------------
# the CLI: a merged causal LM evaluated by the perplexity pool, report.json
# ----------------------------------------------------------------------------------------------
def test_cli_merge_then_perplexity(tmp_path, capsys, monkeypatch):
    from tests.conftest import run_cli

    monkeypatch.chdir(tmp_path)
    paths = save_tiny_llama_pool(tmp_path / "zoo", n=2, seed=4)
    rep = tmp_path / "report.json"
    code, out, err = run_cli(["method=simple_average", "modelpool=causal_lm_merge",
                              f"modelpool.models._pretrained_={paths['base']}", f"modelpool.models.math={paths['ft1']}",
                              f"modelpool.models.code={paths['ft2']}", "modelpool.dtype=float32", "taskpool=causal_lm_perplexity",
                              "taskpool.max_length=128", "taskpool.stride=64", "taskpool.max_tokens=600",
                              f"report_path={rep}", f"merged_model_path={tmp_path / 'merged'}", "device=cpu"], capsys)
    assert code == 0, err
    report = json.loads(rep.read_text())
    m = report["evaluation"]["tasks"]["builtin"]
    # reference: the average of the two fine-tunes (the method ignores the base), evaluated directly
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    a = AutoModelForCausalLM.from_pretrained(paths["ft1"])
    b = AutoModelForCausalLM.from_pretrained(paths["ft2"])
    sa, sb = a.state_dict(), b.state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, (sa[k] + sb[k]) / 2)
    ids = tokenize_joined(byte_tokenizer(), load_texts("builtin", split="test"), add_special_tokens=True)[:600]
    ref, n = guide_perplexity(merged, ids, 128, 64)
    assert m["tokens"] == n and m["perplexity"] == pytest.approx(ref, rel=1e-4)
    assert report["evaluation_splits"]["builtin"]["source"] == "builtin"


def test_lm_eval_task_code_needs_consent(tmp_path):
    """A task YAML that would import Python from the user's folder (`!function`) is refused unless allowed."""
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "t.yaml").write_text("task: t\nprocess_docs: !function utils.process\n")
    with pytest.raises(ConfigError, match=r"t\.yaml runs Python code.*allow_task_code=true"):
        build_taskpool({"type": "lm_eval", "tasks": ["t"], "include_path": str(d), "include_defaults": False})
    tp = build_taskpool({"type": "lm_eval", "tasks": ["t"], "include_path": str(d), "include_defaults": False,
                         "allow_task_code": True})
    assert tp.config.allow_task_code
