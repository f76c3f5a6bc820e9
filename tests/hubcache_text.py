"""An offline Hugging Face cache for the GLUE hub experiments (Flan-T5 and GPT-2), built in seconds.

``build_text_hub_cache(root) -> info`` writes, under the REAL ids and schemas, tiny random models and
tiny GLUE splits:

- hub layout ``<root>/hub/models--<org>--<name>/snapshots/<rev>/...`` with ``refs/main``:
  ``google/flan-t5-base``, ``google/flan-t5-large`` (tiny T5ForConditionalGeneration + a Unigram
  tokenizer.json), ``tanganke/flan-t5-base_glue-<task>`` (full fine-tunes), ``tanganke/flan-t5-{base,large}_glue-<task>_lora-16``
  (PEFT LoRA r=16 adapters on q, v), ``gpt2`` (GPT2Model + byte-level BPE tokenizer, keys without prefix, as the
  real repo) and ``tanganke/gpt2_<task>`` (GPT2ForSequenceClassification: ``transformer.*`` + ``score``);
- datasets ``nyu-mll/glue`` and ``glue`` (FusionBench's id), one config per task with the real columns,
  ClassLabel names and splits (train, validation / validation_matched + validation_mismatched, test with
  label -1), as prepared Arrow caches under ``<root>/datasets`` that ``datasets.load_dataset(id, name,
  split=...)`` reads with ``HF_DATASETS_OFFLINE=1``.

``use_text_hub_cache(monkeypatch, info)`` points HF_HOME / HF_HUB_CACHE / HF_DATASETS_CACHE there and turns
the Hub off (environment and the already-imported libraries' constants).

``info``: ``{"root", "hub_cache", "datasets_cache", "home", "models": {repo_id: snapshot folder},
"datasets": {"nyu-mll/glue": {task: {split: rows}}}, "tasks": {task: label names or None}}``.
"""

from __future__ import annotations

import glob
import shutil
from pathlib import Path
from typing import Any

import torch

from fusion_bench.hub.glue import FLAN_T5_POOLS, GLUE_TASKS, GPT2_BASE, GPT2_TASKS, GPT2_TEMPLATE

REVISION = "0123456789abcdef0123456789abcdef01234567"
ROWS = 8

_WORDS = ("the cat sat on a mat dog ran fast slow good bad movie film was is it great terrible who what why how "
          "does can you will rain today tomorrow man woman said says john mary").split()


def _snapshot(hub: Path, repo_id: str, kind: str = "models") -> Path:
    folder = hub / f"{kind}--{repo_id.replace('/', '--')}"
    snap = folder / "snapshots" / REVISION
    snap.mkdir(parents=True, exist_ok=True)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    return snap


def _t5_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    words = sorted({w.strip(".,'\"?:()") for t in GLUE_TASKS.values() for w in t.prompt.split()} | set(_WORDS)
                   | {w for t in GLUE_TASKS.values() if not isinstance(t.targets, str) for w in t.targets})
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'\"?:()-!_{}"))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words if w] \
        + [("\u2581", -2.0)] + [(c, -5.0) for c in chars]
    tk = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Replace(" {2,}", " ")
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tk, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
                           model_max_length=512)


def _gpt2_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2TokenizerFast
    chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return GPT2TokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>", model_max_length=1024)


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.02) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _rows(task: str, split: str, seed: int) -> dict[str, list[Any]]:
    g = torch.Generator().manual_seed(seed)
    spec = GLUE_TASKS[task]

    def text(i: int) -> str:
        idx = torch.randint(len(_WORDS), (3 + (i % 4),), generator=g).tolist()
        return " ".join(_WORDS[j] for j in idx) + "."

    cols: dict[str, list[Any]] = {c: [text(i) for i in range(ROWS)] for c in spec.text_fields}
    if split.startswith("test"):
        cols["label"] = [-1.0 if spec.label_names is None else -1] * ROWS
    elif spec.label_names is None:
        cols["label"] = [round(float(x), 3) for x in (torch.rand(ROWS, generator=g) * 5).tolist()]
    else:
        cols["label"] = [i % len(spec.label_names) for i in range(ROWS)]
    cols["idx"] = list(range(ROWS))
    return cols


def _splits(task: str) -> list[str]:
    if task == "mnli":
        return ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"]
    return ["train", "validation", "test"]


def _write_glue(root: Path) -> dict[str, dict[str, int]]:
    import datasets
    from datasets import ClassLabel, Features, Value
    from datasets.packaged_modules.parquet.parquet import Parquet

    out: dict[str, dict[str, int]] = {}
    tmp = root / "_glue_build"
    for ti, (task, spec) in enumerate(GLUE_TASKS.items()):
        feats = {c: Value("string") for c in spec.text_fields}
        feats["label"] = Value("float32") if spec.label_names is None else ClassLabel(names=list(spec.label_names))
        feats["idx"] = Value("int32")
        features = Features(feats)
        files = {}
        for si, split in enumerate(_splits(task)):
            p = tmp / "src" / task / f"{split}.parquet"
            p.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_dict(_rows(task, split, 1000 * ti + si), features=features).to_parquet(str(p))
            files[split] = [str(p)]
        b = Parquet(cache_dir=str(tmp / "build"), dataset_name="glue", config_name=task, data_files=files,
                    features=features, hash="0" * 16)
        b.download_and_prepare()
        built = [d for d in glob.glob(str(tmp / "build" / "glue" / f"{task}-*" / "*" / ("0" * 16))) if Path(d).is_dir()]
        for ns in ("nyu-mll___glue", "glue"):
            shutil.copytree(built[0], root / "datasets" / ns / task / "0.0.0" / ("0" * 16))
        out[task] = {s: ROWS for s in _splits(task)}
    shutil.rmtree(tmp)
    return out


def build_text_hub_cache(root: Path) -> dict[str, Any]:
    """Write the cache under ``root`` (see the module docstring) and return its ``info``."""
    import datasets
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        GPT2Model,
        T5Config,
        T5ForConditionalGeneration,
    )

    root = Path(root)
    hub = root / "hub"
    models: dict[str, Path] = {}
    datasets.disable_progress_bars()
    torch.manual_seed(0)

    # Flan-T5: base and large share the tiny architecture (the pools only need real ids and layouts)
    tok = _t5_tokenizer()
    for bi, base_id in enumerate(sorted({b for b, _, _ in FLAN_T5_POOLS.values()})):
        cfg = T5Config(vocab_size=len(tok), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                       num_heads=2, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                       eos_token_id=1, decoder_start_token_id=0)
        torch.manual_seed(bi)
        base = T5ForConditionalGeneration(cfg).eval()
        snap = _snapshot(hub, base_id)
        base.save_pretrained(snap)
        tok.save_pretrained(snap)
        models[base_id] = snap
        for _pool, (b, template, lora) in FLAN_T5_POOLS.items():
            if b != base_id:
                continue
            for ti, task in enumerate(GLUE_TASKS):
                rid = template.format(task=task)
                snap = _snapshot(hub, rid)
                if lora:
                    import copy

                    from peft import LoraConfig, get_peft_model

                    torch.manual_seed(100 + ti)
                    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, lora_alpha=32, target_modules=["q", "v"],
                                                                        task_type="SEQ_2_SEQ_LM", init_lora_weights=False))
                    pm.peft_config["default"].base_model_name_or_path = base_id
                    pm.save_pretrained(snap)
                else:
                    import copy

                    ft = copy.deepcopy(base)
                    _perturb(ft, 10 + ti)
                    ft.save_pretrained(snap)
                    tok.save_pretrained(snap)
                models[rid] = snap

    # GPT-2: the base backbone (no prefix) and per-task classifiers (transformer.* + score)
    gtok = _gpt2_tokenizer()
    eos = gtok.eos_token_id
    gcfg = GPT2Config(vocab_size=len(gtok), n_positions=512, n_embd=16, n_layer=2, n_head=2, bos_token_id=eos,
                      eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(7)
    gbase = GPT2Model(gcfg).eval()
    snap = _snapshot(hub, GPT2_BASE)
    gbase.save_pretrained(snap)
    gtok.save_pretrained(snap)
    models[GPT2_BASE] = snap
    for ti, task in enumerate(GPT2_TASKS):
        n = len(GLUE_TASKS[task].label_names)
        ccfg = GPT2Config(**{**gcfg.to_dict(), "num_labels": n})
        ccfg.architectures = ["GPT2ForSequenceClassification"]
        torch.manual_seed(200 + ti)
        clf = GPT2ForSequenceClassification(ccfg).eval()
        clf.transformer.load_state_dict(gbase.state_dict())
        _perturb(clf.transformer, 300 + ti)
        rid = GPT2_TEMPLATE.format(task=task)
        snap = _snapshot(hub, rid)
        clf.save_pretrained(snap)
        gtok.save_pretrained(snap)
        models[rid] = snap

    data = _write_glue(root)
    (root / "home").mkdir(exist_ok=True)
    return {"root": root, "hub_cache": hub, "datasets_cache": root / "datasets", "home": root / "home",
            "models": models, "datasets": {"nyu-mll/glue": data, "glue": data},
            "tasks": {t: (list(s.label_names) if s.label_names else None) for t, s in GLUE_TASKS.items()}}


def use_text_hub_cache(monkeypatch, info: dict[str, Any]) -> None:
    """Point the Hugging Face libraries at ``info``'s cache, offline (environment and imported constants)."""
    env = {"HF_HOME": str(info["home"]), "HF_HUB_CACHE": str(info["hub_cache"]),
           "HUGGINGFACE_HUB_CACHE": str(info["hub_cache"]), "HF_DATASETS_CACHE": str(info["datasets_cache"]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import datasets.config
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(info["hub_cache"]), raising=False)
    monkeypatch.setattr(hc, "HUGGINGFACE_HUB_CACHE", str(info["hub_cache"]), raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(info["datasets_cache"]), raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    try:
        import transformers.utils.hub as th

        for name in ("TRANSFORMERS_CACHE", "HF_HUB_CACHE", "PYTORCH_PRETRAINED_BERT_CACHE", "PYTORCH_TRANSFORMERS_CACHE"):
            if hasattr(th, name):
                monkeypatch.setattr(th, name, str(info["hub_cache"]))
    except ImportError:  # pragma: no cover
        pass
