"""Sequence-to-sequence language-model pool (T5 / Flan-T5), full checkpoints or PEFT (LoRA) adapters.

``modelpool.type=seq2seq_lm``. Models load with ``AutoModelForSeq2SeqLM``. An entry that is a PEFT
adapter (a folder or Hub repo with ``adapter_config.json``, e.g. ``tanganke/flan-t5-base_glue-cola_lora-16``)
is applied to ``_pretrained_`` and merged into full weights (``merge_and_unload``), as FusionBench's
``Seq2SeqLMPool`` / ``load_lora_model`` do; merging methods then see full weights.

Data methods (Fisher, RegMean, AdaMerging) are refused on this pool: its models generate text and have no
classifier per task (FusionBench runs those on its GPT-2 classification pool).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusion_bench.config_schema import option
from fusion_bench.modelpool._peft import PeftMergedMixin
from fusion_bench.modelpool.base import ModelPool, ModelPoolConfig
from fusion_bench.modelpool.registry import register_modelpool


@dataclass
class Seq2SeqLMPoolConfig(ModelPoolConfig):
    """Config of a seq2seq LM pool (``modelpool.type=seq2seq_lm``)."""

    model_class: str = option("seq2seq_lm", help="Class that loads the models (default AutoModelForSeq2SeqLM).")


@register_modelpool("seq2seq_lm")
class Seq2SeqLMPool(PeftMergedMixin, ModelPool):
    """Seq2seq LMs; PEFT adapters are merged into full weights on load.

    Args:
        models: name -> Hugging Face folder / hub id of a full model or of a PEFT adapter.
        config: :class:`Seq2SeqLMPoolConfig` or a mapping (keywords win).
    """

    config_class = Seq2SeqLMPoolConfig

    #: why data-dependent merges do not run here (read by fusion_bench.methods._task_data)
    data_method_refusal = ("the seq2seq_lm pool's models generate text and have no per-task classifier; "
                           "Fisher merging, RegMean and AdaMerging run on classification pools (e.g. modelpool=gpt2_glue)")

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d["type"] = "seq2seq_lm"
        return d


__all__ = ["Seq2SeqLMPool", "Seq2SeqLMPoolConfig"]
