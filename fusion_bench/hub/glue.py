"""GLUE hub experiments of FusionBench: Flan-T5 (text-to-text) and GPT-2 (sequence classification).

One table (:data:`GLUE_TASKS`) holds every fact the shipped configs need; the configs
(``modelpool/flan-t5-*_glue*.yaml``, ``modelpool/gpt2_glue.yaml``,
``taskpool/flan-t5_glue_text_generation.yaml``, ``taskpool/gpt2_glue.yaml``) are generated from it by
:func:`generated_configs` / :func:`write_configs` (``python -m fusion_bench.hub.glue``), and a test
checks that the shipped files equal what the generator writes.

Facts from FusionBench (github tanganke/fusion_bench, ``fusion_bench/tasks/flan_t5_text_generation``,
``config/modelpool/Seq2SeqLMPool``, ``config/modelpool/gpt-2_glue.yaml``, ``config/taskpool``):

- Data: the GLUE benchmark (FusionBench loads ``"glue"``, which the Hub redirects to ``nyu-mll/glue``),
  one config per task; evaluation on ``validation`` (MNLI: ``validation_matched``); data methods read
  ``train``.
- Flan-T5: prompt template and label words per task (the templates are kept verbatim, typos included:
  the fine-tuned models were trained on them); greedy generation with ``max_length=10`` (decoder
  tokens, start token included); exact match of the decoded output with the decoded label word;
  STSB: target ``"{:.1f}".format(score)``, Spearman's rho between parsed predictions (unparsable: 0.0)
  and labels.
- GPT-2: ``tanganke/gpt2_<task>`` GPT2ForSequenceClassification on seven tasks (no STSB); the backbone
  (``transformer.*``) is merged, each task keeps its own ``score`` head; tokenizer ``gpt2`` with pad =
  unk and ``model_max_length=512``; accuracy and cross-entropy per task.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the dataset id the shipped configs load (FusionBench's ``"glue"`` is a redirect to it on the Hub)
GLUE_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: data facts, FusionBench's Flan-T5 prompt and GPT-2 checkpoint."""

    name: str
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None  # None: a regression target (STSB)
    eval_split: str
    prompt: str  # Flan-T5 input template, fields in braces
    targets: tuple[str, ...] | str  # Flan-T5 label words by label index, or a format for regression
    gpt2: bool = True  # FusionBench fine-tuned GPT-2 on it
    train_split: str = "train"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def metric(self) -> str:
        return "spearman_rho" if self.label_names is None else "accuracy"


GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in [
    GlueTask("cola", ("sentence",), ("unacceptable", "acceptable"), "validation",
             "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere "
             "'acceptable' or 'unacceptable'.",
             ("unacceptable", "acceptable")),
    GlueTask("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), "validation_matched",
             "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: "
             "'{hypothesis}'? Answere with 'entailment', 'contradiction', or 'neutral'.",
             ("entailment", "neutral", "contradiction")),
    GlueTask("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "validation",
             "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere "
             "with 'yes' or 'no'.",
             ("no", "yes")),
    GlueTask("qnli", ("question", "sentence"), ("entailment", "not_entailment"), "validation",
             "Given the context: '{sentence}', does the question '{question}' have an answer based on the "
             "information provided? Answer with 'yes' or 'no'.",
             ("yes", "no")),
    GlueTask("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "validation",
             "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
             ("no", "yes")),
    GlueTask("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), "validation",
             "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
             ("yes", "no")),
    GlueTask("sst2", ("sentence",), ("negative", "positive"), "validation",
             "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
             ("negative", "positive")),
    GlueTask("stsb", ("sentence1", "sentence2"), None, "validation",
             "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to "
             "5 (completely similar), rate the similarity.",
             "{:.1f}", gpt2=False),
]}

FLAN_T5_TASKS = list(GLUE_TASKS)  # FusionBench order: cola mnli mrpc qnli qqp rte sst2 stsb
GPT2_TASKS = [t for t, v in GLUE_TASKS.items() if v.gpt2]

#: Flan-T5 generation as FusionBench evaluates it
FLAN_T5_GENERATION = {"max_length": 10, "num_beams": 1, "do_sample": False}
FLAN_T5_INPUT_MAX_LENGTH = 512  # T5 tokenizer model_max_length; FusionBench pads/truncates to it
GPT2_MAX_LENGTH = 512

#: Flan-T5 pools: our name -> (base model, model id template with {task}, LoRA adapters?)
FLAN_T5_POOLS = {
    "flan-t5-base_glue": ("google/flan-t5-base", "tanganke/flan-t5-base_glue-{task}", False),
    "flan-t5-base_glue_lora16": ("google/flan-t5-base", "tanganke/flan-t5-base_glue-{task}_lora-16", True),
    "flan-t5-large_glue_lora16": ("google/flan-t5-large", "tanganke/flan-t5-large_glue-{task}_lora-16", True),
}
GPT2_BASE = "gpt2"
GPT2_TEMPLATE = "tanganke/gpt2_{task}"


def dataset_ref(task: str, split: str | None = None) -> dict[str, Any]:
    """The dataset reference of ``task`` in our config format ({path, name[, split]})."""
    ref: dict[str, Any] = {"path": GLUE_DATASET, "name": task}
    if split is not None:
        ref["split"] = split
    return ref


# -------------------------------------------------------------------------------------------------
# config generation
# -------------------------------------------------------------------------------------------------
def _flan_modelpool(name: str) -> tuple[str, dict[str, Any]]:
    base, template, lora = FLAN_T5_POOLS[name]
    head = (f"# fusion_bench method=task_arithmetic modelpool={name} taskpool=flan-t5_glue_text_generation  "
            "(needs the Hugging Face Hub)\n"
            f"# FusionBench's Seq2SeqLMPool/{name}: {base} and "
            + ("its LoRA (r=16) adapters" if lora else "its full fine-tunes")
            + " on eight GLUE tasks" + (" (PEFT adapters merged into full weights on load)" if lora else "")
            + ".\n# Generated from fusion_bench/hub/glue.py (python -m fusion_bench.hub.glue); do not edit.\n")
    cfg = {"type": "seq2seq_lm", "models": {"_pretrained_": base}, "tasks": list(FLAN_T5_TASKS),
           "model_template": template, "model_class": "seq2seq_lm", "tokenizer": base, "name": name}
    return head, cfg


def _gpt2_modelpool() -> tuple[str, dict[str, Any]]:
    head = ("# fusion_bench method=task_arithmetic modelpool=gpt2_glue taskpool=gpt2_glue  (needs the Hugging Face Hub)\n"
            "# FusionBench's gpt-2_glue: GPT-2 backbones (transformer.*) of tanganke/gpt2_<task> on seven GLUE tasks;\n"
            "# each task's classification head stays with the task pool (taskpool.tasks.<task>.head). Train splits\n"
            "# feed Fisher merging and RegMean; AdaMerging adapts to the unlabeled inputs of 'test' (= the evaluated split).\n"
            "# Generated from fusion_bench/hub/glue.py (python -m fusion_bench.hub.glue); do not edit.\n")
    cfg = {"type": "sequence_classification", "models": {"_pretrained_": GPT2_BASE}, "tasks": list(GPT2_TASKS),
           "model_template": GPT2_TEMPLATE, "model_class": "transformers.GPT2Model", "tokenizer": GPT2_BASE,
           "heads": {t: GPT2_TEMPLATE.format(task=t) for t in GPT2_TASKS},
           "text_fields": {t: list(GLUE_TASKS[t].text_fields) for t in GPT2_TASKS},
           # test = the evaluated split (GLUE's test labels are hidden): AdaMerging adapts to its unlabeled inputs
           "datasets": {t: {"train": dataset_ref(t, GLUE_TASKS[t].train_split),
                            "validation": dataset_ref(t, GLUE_TASKS[t].eval_split),
                            "test": dataset_ref(t, GLUE_TASKS[t].eval_split)} for t in GPT2_TASKS},
           "max_length": GPT2_MAX_LENGTH, "name": "gpt2_glue"}
    return head, cfg


def _flan_taskpool() -> tuple[str, dict[str, Any]]:
    head = ("# fusion_bench method=task_arithmetic modelpool=flan-t5-base_glue taskpool=flan-t5_glue_text_generation  "
            "(needs the Hugging Face Hub)\n"
            "# FusionBench's flan-t5_glue_text_generation: eight GLUE tasks as text-to-text, FusionBench's prompt and\n"
            "# label words per task, greedy generation (max_length 10), exact-match accuracy; STSB: Spearman's rho.\n"
            "# Generated from fusion_bench/hub/glue.py (python -m fusion_bench.hub.glue); do not edit.\n")
    tasks = {}
    for t in FLAN_T5_TASKS:
        g = GLUE_TASKS[t]
        spec: dict[str, Any] = {"dataset": dataset_ref(t), "split": g.eval_split, "template": g.prompt}
        if isinstance(g.targets, str):
            spec.update(target_format=g.targets, metric="spearman_rho")
        else:
            spec.update(targets=list(g.targets), metric="accuracy")
        tasks[t] = spec
    cfg = {"type": "text_to_text", "tokenizer": "google/flan-t5-base", "tasks": tasks,
           "max_input_length": FLAN_T5_INPUT_MAX_LENGTH, "generation": dict(FLAN_T5_GENERATION),
           "batch_size": 32, "device": "auto", "max_samples": None, "name": "flan-t5_glue_text_generation"}
    return head, cfg


def _gpt2_taskpool() -> tuple[str, dict[str, Any]]:
    head = ("# fusion_bench method=task_arithmetic modelpool=gpt2_glue taskpool=gpt2_glue  (needs the Hugging Face Hub)\n"
            "# FusionBench's gpt-2_glue task pool: the evaluated GPT-2 backbone with each task's own head\n"
            "# (GPT2ForSequenceClassification of tanganke/gpt2_<task>), accuracy and loss on GLUE validation.\n"
            "# Generated from fusion_bench/hub/glue.py (python -m fusion_bench.hub.glue); do not edit.\n")
    tasks = {t: {"dataset": dataset_ref(t), "split": GLUE_TASKS[t].eval_split,
                 "text_fields": list(GLUE_TASKS[t].text_fields), "head": GPT2_TEMPLATE.format(task=t)}
             for t in GPT2_TASKS}
    cfg = {"type": "text_classification", "tokenizer": GPT2_BASE, "tasks": tasks, "max_length": GPT2_MAX_LENGTH,
           "batch_size": 32, "device": "auto", "max_samples": None, "name": "gpt2_glue"}
    return head, cfg


def generated_configs() -> dict[str, str]:
    """Relative path under ``fusion_bench/config`` -> YAML text of every GLUE config."""
    import yaml

    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in FLAN_T5_POOLS:
        out[f"modelpool/{name}.yaml"] = _flan_modelpool(name)
    out["modelpool/gpt2_glue.yaml"] = _gpt2_modelpool()
    out["taskpool/flan-t5_glue_text_generation.yaml"] = _flan_taskpool()
    out["taskpool/gpt2_glue.yaml"] = _gpt2_taskpool()
    return {p: head + yaml.safe_dump(cfg, sort_keys=False, width=120, allow_unicode=True)
            for p, (head, cfg) in out.items()}


def write_configs(config_dir: str | Path | None = None) -> list[Path]:
    """Write the generated configs into ``config_dir`` (default: the package's config folder)."""
    root = Path(config_dir) if config_dir else Path(__file__).resolve().parents[1] / "config"
    written = []
    for rel, text in generated_configs().items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written


if __name__ == "__main__":  # pragma: no cover
    for p in write_configs():
        print(p)
