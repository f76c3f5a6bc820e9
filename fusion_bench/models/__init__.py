"""nn.Modules that methods build: ensembles, classifiers, merged-weight wrappers, MoE layers.

Importing this package registers the SMILE causal-LM classes (``smile_llama``, ``smile_mistral``,
``smile_qwen2``) with transformers' ``AutoConfig`` / ``AutoModelForCausalLM``, so that folders written by
``smile_causal_lm_upscaling`` reload with ``AutoModelForCausalLM.from_pretrained`` (no remote code). Only
transformers' config mapping is imported here; the model classes are built on first use.
"""

from fusion_bench.models.smile_hf import install_lazy_registration as _install_smile

_install_smile()
