"""SMILE-upscaled causal LMs as registered transformers classes: ``smile_llama``, ``smile_mistral``, ``smile_qwen2``.

``import fusion_bench.models`` registers, for each family, a config class
(``SmileLlamaConfig``: the base config plus ``num_local_experts``, ``num_experts_per_tok``, ``rank_of_router``,
``rank_of_expert``; ``model_type = "smile_llama"``) with ``AutoConfig`` and a model class
(``SmileLlamaForCausalLM``: the transformers ``LlamaForCausalLM`` whose seven projections per decoder layer are
:class:`~fusion_bench.models.smile.SmileLinear`) with ``AutoModelForCausalLM``. A folder written by
``smile_causal_lm_upscaling`` (or by ``save_pretrained`` of such a model) then reloads with::

    import fusion_bench.models                       # registers the classes; no remote code is involved
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/smile")

The folder holds no Python code and ``trust_remote_code`` is never needed. The config keys are FusionBench's
(``rank_of_expert <= 0``: full-rank experts); the weight names are this package's (``...q_proj.shared.weight``,
``...q_proj.gate.weight``, ``...q_proj.experts.<i>.u`` / ``.svh`` / ``.weight`` / ``.bias``), so FusionBench's
SMILE checkpoints do not load here, nor ours there.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import nn

from fusion_bench.kernels.mixing import smile as K
from fusion_bench.models.smile import SmileLinear

#: the projections of a decoder layer that SMILE upscales (FusionBench's causal-LM SMILE: attention and MLP)
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
#: checkpoint names of the upscaled weights: ``<prefix>.weight`` with ``<prefix>`` = ``...layers.<i>.<projection>``
TARGET_WEIGHT = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.\d+\.(?:" + "|".join(re.escape(p) for p in PROJECTIONS)
                           + r"))\.weight$")
SMILE_FIELDS = {"num_local_experts": 1, "num_experts_per_tok": 1, "rank_of_router": 1, "rank_of_expert": 0}
FAMILIES = ("llama", "mistral", "qwen2")

_CLASSES: dict[str, tuple[type, type]] = {}  # family -> (config class, model class)


def _base_classes(family: str) -> tuple[type, type]:
    import transformers

    names = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
             "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[family]
    return getattr(transformers, names[0]), getattr(transformers, names[1])


def _make_config_class(family: str, base_cfg: type) -> type:
    name = f"Smile{base_cfg.__name__}"
    ns: dict[str, Any] = {"model_type": f"smile_{family}", "__module__": __name__,
                          "__doc__": f"{base_cfg.__name__} plus SMILE's expert counts and ranks (model_type "
                                     f"'smile_{family}')."}
    if dataclasses.is_dataclass(base_cfg):  # transformers >= 5: configs are (strict) dataclasses
        ns["__annotations__"] = {k: int for k in SMILE_FIELDS}
        ns.update(SMILE_FIELDS)
        return type(name, (base_cfg,), ns)

    def __init__(self, num_local_experts: int = 1, num_experts_per_tok: int = 1, rank_of_router: int = 1,
                 rank_of_expert: int = 0, **kwargs):  # transformers 4: keyword configs
        self.num_local_experts, self.num_experts_per_tok = num_local_experts, num_experts_per_tok
        self.rank_of_router, self.rank_of_expert = rank_of_router, rank_of_expert
        base_cfg.__init__(self, **kwargs)

    ns["__init__"] = __init__
    return type(name, (base_cfg,), ns)


def replace_projections(model: nn.Module, config: Any) -> None:
    """Swap the seven projections of every decoder layer of ``model.model.layers`` for empty SmileLinear
    layers shaped by ``config`` (they are filled by ``from_pretrained`` or by the upscaling)."""
    for layer in model.model.layers:
        for proj in PROJECTIONS:
            parent_name, _, leaf = proj.rpartition(".")
            parent = layer.get_submodule(parent_name)
            lin: nn.Linear = getattr(parent, leaf)
            shape = (lin.out_features, lin.in_features)
            setattr(parent, leaf, SmileLinear(
                lin.in_features, lin.out_features, config.num_local_experts, config.num_experts_per_tok,
                K.effective_gate_k(config.rank_of_router, shape), K.effective_rank(config.rank_of_expert, shape),
                lin.bias is not None, device=lin.weight.device, dtype=lin.weight.dtype))


def _make_model_class(family: str, base_model: type, cfg_cls: type) -> type:
    def __init__(self, config):
        base_model.__init__(self, config)
        replace_projections(self, config)

    return type(f"Smile{base_model.__name__}", (base_model,), {
        "config_class": cfg_cls, "__init__": __init__, "__module__": __name__,
        "_no_split_modules": list(getattr(base_model, "_no_split_modules", None) or []),
        "__doc__": f"{base_model.__name__} whose attention and MLP projections are SMILE mixtures of low-rank "
                   f"experts (model_type 'smile_{family}')."})


def smile_classes(family: str) -> tuple[type, type]:
    """(config class, model class) of a family (``llama``, ``mistral``, ``qwen2``), registered with the Auto
    classes on first use."""
    if family not in _CLASSES:
        from transformers import AutoConfig, AutoModelForCausalLM

        base_cfg, base_model = _base_classes(family)
        cfg_cls = _make_config_class(family, base_cfg)
        model_cls = _make_model_class(family, base_model, cfg_cls)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        AutoModelForCausalLM.register(cfg_cls, model_cls, exist_ok=True)
        _CLASSES[family] = (cfg_cls, model_cls)
    return _CLASSES[family]


def register_smile_auto_classes() -> None:
    """Register every family's SMILE classes with ``AutoConfig`` / ``AutoModelForCausalLM`` (idempotent)."""
    for f in FAMILIES:
        smile_classes(f)


def _lazy_config_class(family: str) -> type:
    """What ``import fusion_bench.models`` registers under ``smile_<family>`` in transformers' config mapping: a
    stand-in whose every use (``from_dict``, as ``AutoConfig.from_pretrained`` calls it, ``from_pretrained``, or a
    call, as ``AutoConfig.for_model``) builds the real config and model classes, registers them with the Auto
    classes (replacing the stand-in) and hands over to the real config class. Importing the Llama / Mistral /
    Qwen2 model code eagerly would add seconds to every ``fusion_bench`` command."""

    def real() -> type:
        return smile_classes(family)[0]

    def __new__(cls, *args, **kwargs):
        return real()(*args, **kwargs)

    return type(f"LazySmile{family.capitalize()}Config", (), {
        "model_type": f"smile_{family}", "__module__": __name__, "__new__": __new__,
        "from_dict": classmethod(lambda cls, *a, **kw: real().from_dict(*a, **kw)),
        "from_pretrained": classmethod(lambda cls, *a, **kw: real().from_pretrained(*a, **kw)),
        "__doc__": f"Stand-in for the SMILE {family} config class until it is first used."})


def install_lazy_registration() -> None:
    """Make transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` know ``smile_llama``, ``smile_mistral`` and
    ``smile_qwen2`` (cheap: only transformers' config mapping is imported; the real classes are built and registered
    on first use). Called by ``import fusion_bench.models``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for f in FAMILIES:
        if f not in _CLASSES:
            CONFIG_MAPPING.register(f"smile_{f}", _lazy_config_class(f), exist_ok=True)


def smile_family(model: Any) -> str | None:
    """The family (``llama``, ``mistral``, ``qwen2``) of a plain transformers causal LM, else None."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt in FAMILIES and hasattr(getattr(model, "model", None), "layers") and hasattr(model, "lm_head"):
        return mt
    return None


def smile_config(base_config: Any, family: str, *, num_experts: int, top_k: int, gate_k: int, k: int):
    """The SMILE config of an upscaled ``family`` model: ``base_config`` (a config or its dict) plus the counts."""
    cfg_cls, _ = smile_classes(family)
    d = base_config if isinstance(base_config, dict) else base_config.to_dict()
    d = {key: v for key, v in d.items() if key not in ("model_type", "architectures", "auto_map",
                                                       "transformers_version", *SMILE_FIELDS)}
    cfg = cfg_cls(**d, num_local_experts=num_experts, num_experts_per_tok=top_k, rank_of_router=gate_k,
                  rank_of_expert=k if k > 0 else 0)
    cfg.architectures = [f"Smile{_base_classes(family)[1].__name__}"]
    return cfg
