"""nn.Modules that methods build: ensembles, classifiers, merged-weight wrappers, MoE layers.

Importing this package registers the SMILE causal-LM classes (``smile_llama``, ``smile_mistral``,
``smile_qwen2``) with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, so that folders written by
``smile_causal_lm_upscaling`` reload with ``AutoModelForCausalLM.from_pretrained`` (no remote code).
"""

from fusion_bench.models.smile_hf import register_smile_auto_classes as _register_smile

_register_smile()
