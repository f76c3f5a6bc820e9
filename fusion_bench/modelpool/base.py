"""The model pool: named checkpoints (``_pretrained_`` is the base), lazy handles, validation.

A model entry is a local folder or hub id of a Hugging Face model, a state-dict file
(.safetensors/.bin/.pt), a live ``nn.Module`` or an in-memory state dict (Python API). Nothing
is loaded until asked: :meth:`ModelPool.source` gives a lazy tensor view, :meth:`ModelPool.load_model`
a module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_bench.config_schema import build_config, option, to_plain
from fusion_bench.errors import (
    CheckpointError,
    ConfigError,
    FusionBenchError,
    ModelMismatchError,
    did_you_mean,
)
from fusion_bench.io.atomic import os_error_message
from fusion_bench.io.checkpoint import (
    ModuleSource,
    StateDictSource,
    TensorSource,
    open_checkpoint,
    read_json_object,
)
from fusion_bench.io.outputs import os_error_from, output_dir, output_path, safetensors_metadata
from fusion_bench.models.registry import check_plain_data, is_allowed_ref, resolve_class_ref
from fusion_bench.utils import parse_dtype

PRETRAINED = "_pretrained_"

#: shortcut names for transformers classes (``model_class`` key)
MODEL_CLASSES = {
    "auto": "transformers.AutoModel",
    "clip": "transformers.CLIPModel",
    "clip_vision": "transformers.CLIPVisionModel",
    "causal_lm": "transformers.AutoModelForCausalLM",
    "seq2seq_lm": "transformers.AutoModelForSeq2SeqLM",
    "sequence_classification": "transformers.AutoModelForSequenceClassification",
    "image_classification": "transformers.AutoModelForImageClassification",
}

_STATE_DICT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class ModelPoolConfig:
    """Config of a model pool (the ``modelpool`` group)."""

    models: dict[str, Any] = option(
        {}, help="Model name -> checkpoint: a local folder or hub id (Hugging Face), or a .safetensors/"
        ".bin/.pt state-dict file. '_pretrained_' names the base model.")
    model_class: str = option(
        "auto", help="Which class loads Hugging Face checkpoints: one of " + ", ".join(MODEL_CLASSES)
        + ", a transformers class such as 'transformers.CLIPVisionModel', or a class registered with "
        "fusion_bench.models.registry.register_model_class. Ignored for state-dict files.")
    architecture: dict[str, Any] | None = option(
        None, help="For state-dict pools: {'class': <name>, 'kwargs': {...}} builds the module that the tensors "
        "are loaded into; <name> is a class registered with register_model_class (from Python) or a "
        "transformers / torch.nn nn.Module class, and kwargs are plain data. Without it, merged state dicts "
        "are returned as a TensorBag.")
    dtype: str | None = option(None, help="Load models in this dtype (float32, bf16, fp16); null keeps the checkpoint dtype.")
    tokenizer: str | None = option(None, help="Tokenizer folder or hub id saved beside merged language models.")
    processor: str | None = option(None, help="Image processor folder or hub id saved beside merged vision models.")
    select: list[str] | None = option(None, help="Use only these model names (plus '_pretrained_').")
    tasks: list[str] = option([], help="Task names: with model_template, generates one model entry per task "
                              "(one source of truth instead of a hand-written list).")
    model_template: str | None = option(None, help="Checkpoint of each task's model, with '{task}' in it, e.g. "
                                        "'tanganke/clip-vit-base-patch32_{task}'. Needs `tasks`.")
    datasets: dict[str, Any] = option(
        {}, help="Optional per-task datasets: {task: {train: ..., val: ..., test: ...}} (paths or hub ids).")
    trust_remote_code: bool = option(False, help="Passed to from_pretrained for hub models with custom code.")
    name: str = option("modelpool", help="A label for reports.")


class TensorBag(nn.Module):
    """A module that only holds named tensors (a merged plain state dict without an architecture)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self._names = list(tensors)
        for i, v in enumerate(tensors.values()):
            self.register_buffer(f"t{i}", v.detach().clone())

    def state_dict(self, *args, **kwargs):  # original names
        return {k: getattr(self, f"t{i}") for i, k in enumerate(self._names)}

    def load_state_dict(self, sd, strict: bool = True, assign: bool = False):
        for i, k in enumerate(self._names):
            if k in sd:
                getattr(self, f"t{i}").copy_(sd[k])
            elif strict:
                raise ModelMismatchError(f"TensorBag.load_state_dict: missing tensor '{k}'.")
        return None

    def forward(self, *args, **kwargs):  # pragma: no cover - not callable by design
        raise TypeError("A TensorBag holds merged tensors only; give the model pool an `architecture` to run it.")


def resolve_model_class(model_class: str):
    """The class that loads Hugging Face checkpoints, resolved only through the allow-list
    (:mod:`fusion_bench.models.registry`): a shortcut, a registered class, or a transformers class."""
    return resolve_class_ref(model_class, "modelpool.model_class", MODEL_CLASSES, loader=True)


def check_architecture(arch: Any) -> None:
    """Check ``modelpool.architecture`` without importing or calling anything (configs are data)."""
    if arch is None:
        return
    if not isinstance(arch, Mapping):
        raise ConfigError(f"modelpool.architecture must be a mapping {{class: ..., kwargs: {{...}}}}, got {arch!r}.")
    if "class" not in arch:
        raise ConfigError("modelpool.architecture needs a 'class' key (a registered model class or a transformers / "
                          "torch.nn class).")
    extra = set(arch) - {"class", "kwargs"}
    if extra:
        raise ConfigError(f"Unknown key(s) {sorted(extra)} in modelpool.architecture; use 'class' and 'kwargs'.")
    is_allowed_ref(arch["class"], "modelpool.architecture.class")
    kwargs = arch.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ConfigError(f"modelpool.architecture.kwargs must be a mapping, got {type(kwargs).__name__}.")
    check_plain_data(kwargs, "modelpool.architecture.kwargs")


def resolve_hf_path(ref: str, name: str) -> Path:
    """A local folder, or a hub id downloaded (or found in the local hub cache)."""
    p = Path(os.path.expanduser(str(ref)))
    if p.exists():
        return p
    if str(ref).startswith((".", "/", "~")) or str(ref).count("/") > 1:
        raise CheckpointError(f"Model '{name}': path {ref} does not exist.")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            repo_id=str(ref),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*.tiktoken", "*.py"],
        ))
    except Exception as e:
        raise CheckpointError(
            f"Model '{name}': '{ref}' is not a local path and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}: {e}). Check the id, your network, or download it and give the folder."
        ) from e


class ModelPool:
    """Named checkpoints with lazy loading.

    Args:
        models: name -> checkpoint (path, hub id, nn.Module or state dict). ``_pretrained_`` is the base.
        config: a :class:`ModelPoolConfig` or mapping for the remaining options (keywords win).
    """

    #: the config dataclass (subclasses registered with ``register_modelpool`` extend it)
    config_class: type = ModelPoolConfig

    def __init__(self, models: Mapping[str, Any] | None = None, config: ModelPoolConfig | Mapping | None = None,
                 **kwargs: Any):
        live = {}
        if models is not None:
            plain = {}
            for k, v in dict(models).items():
                if isinstance(v, (nn.Module, Mapping)) and not _is_plain_mapping(v):
                    live[k] = v
                else:
                    plain[k] = v
            kwargs["models"] = plain
        self.config: ModelPoolConfig = build_config(type(self).config_class, config, prefix="modelpool",
                                                    ignore=("type",), **kwargs)
        generated = {}
        if self.config.model_template is not None:
            if "{task}" not in self.config.model_template:
                raise ConfigError("modelpool.model_template must contain '{task}', e.g. 'org/model_{task}'.")
            if not self.config.tasks:
                raise ConfigError("modelpool.model_template needs modelpool.tasks (the task names).")
            generated = {t: self.config.model_template.replace("{task}", t) for t in self.config.tasks}
        elif self.config.tasks:
            raise ConfigError("modelpool.tasks is set without modelpool.model_template; set both or neither.")
        entries: dict[str, Any] = {**to_plain(self.config.models), **generated, **live}
        # keep the user's order with live modules where they were given
        if models is not None and not generated:
            entries = {k: entries[k] for k in models}
        if self.config.select is not None:
            unknown = [s for s in self.config.select if s not in entries]
            if unknown:
                raise ConfigError(f"modelpool.select names unknown model(s) {unknown}.{did_you_mean(unknown[0], entries)}")
            entries = {k: v for k, v in entries.items() if k == PRETRAINED or k in self.config.select}
        if not entries:
            raise ConfigError("The model pool is empty: set modelpool.models (name -> checkpoint path).")
        self._entries = entries
        # configs are data: class names are checked against the allow-list now, before anything is imported
        check_architecture(self.config.architecture)
        is_allowed_ref(self.config.model_class, "modelpool.model_class", MODEL_CLASSES)
        self._sources: dict[str, TensorSource] = {}
        self.dtype = parse_dtype(self.config.dtype, "modelpool.dtype")

    # -- names -----------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._entries)

    @property
    def model_names(self) -> list[str]:
        """Names of the models to fuse (everything except ``_pretrained_``)."""
        return [n for n in self._entries if n != PRETRAINED]

    @property
    def has_pretrained(self) -> bool:
        return PRETRAINED in self._entries

    def __len__(self) -> int:
        return len(self.model_names)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _check_name(self, name: str) -> None:
        if name not in self._entries:
            raise ConfigError(f"Model pool has no model '{name}'.{did_you_mean(name, self._entries)}")

    def entry(self, name: str) -> Any:
        self._check_name(name)
        return self._entries[name]

    def kind(self, name: str) -> str:
        """'module', 'state_dict' (in memory), 'file' (state-dict file) or 'hf'."""
        e = self.entry(name)
        if isinstance(e, nn.Module):
            return "module"
        if isinstance(e, Mapping):
            return "state_dict"
        s = str(e)
        if s.endswith(_STATE_DICT_SUFFIXES) and Path(s).is_file():
            return "file"
        p = Path(os.path.expanduser(s))
        if p.is_dir() and not (p / "config.json").exists():
            return "file"  # a folder of shards without a HF config
        return "hf"

    # -- loading ---------------------------------------------------------------------------------
    def source(self, name: str) -> TensorSource:
        """A lazy tensor view of the checkpoint ``name`` (cached)."""
        if name in self._sources:
            return self._sources[name]
        kind = self.kind(name)
        e = self._entries[name]
        if kind == "module":
            src: TensorSource = ModuleSource(e, name)
        elif kind == "state_dict":
            src = StateDictSource(e, name)
        elif kind == "file":
            src = open_checkpoint(os.path.expanduser(str(e)), name)
        else:
            src = open_checkpoint(resolve_hf_path(str(e), name), name)
        self._sources[name] = src
        return src

    def base_name(self) -> str:
        """``_pretrained_`` when present, else the first model."""
        return PRETRAINED if self.has_pretrained else self.model_names[0]

    def load_model(self, name: str) -> nn.Module:
        """Load model ``name`` as an ``nn.Module`` (a fresh copy for paths; the object itself for live modules)."""
        kind = self.kind(name)
        e = self._entries[name]
        if kind == "module":
            return e
        if kind == "hf":
            path = resolve_hf_path(str(e), name)
            cls = resolve_model_class(self.config.model_class)
            kw: dict[str, Any] = {}
            if self.dtype is not None:
                kw["dtype"] = self.dtype
            if self.config.trust_remote_code:
                kw["trust_remote_code"] = True
            try:
                model = _quiet_from_pretrained(cls, path, **kw)
            except Exception as ex:
                raise CheckpointError(f"Model '{name}': {cls.__name__}.from_pretrained({path}) failed: {ex}") from ex
            return model.eval()
        sd = self.source(name).to_state_dict()
        if self.dtype is not None:
            sd = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in sd.items()}
        arch = self.config.architecture
        if arch is None:
            return TensorBag(sd)
        module = self.build_architecture()
        missing, unexpected = module.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise ModelMismatchError(
                f"Model '{name}' does not fit modelpool.architecture {arch.get('class')}: "
                f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}.")
        return module.eval()

    def build_architecture(self) -> nn.Module:
        arch = self.config.architecture or {}
        check_architecture(arch if arch else {})
        cls = resolve_class_ref(arch["class"], "modelpool.architecture.class")  # an allowed nn.Module class
        kwargs = dict(arch.get("kwargs") or {})
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"modelpool.architecture: {cls.__name__}(**kwargs) failed ({e}); check "
                              "modelpool.architecture.kwargs.") from e

    def load_pretrained_model(self) -> nn.Module:
        if not self.has_pretrained:
            raise ConfigError("This method needs the base model: add '_pretrained_' to modelpool.models.")
        return self.load_model(PRETRAINED)

    def load_pretrained_or_first_model(self) -> nn.Module:
        return self.load_model(self.base_name())

    def models(self) -> dict[str, nn.Module]:
        """Load every model to fuse (not ``_pretrained_``): use only where the method needs whole models."""
        return {n: self.load_model(n) for n in self.model_names}

    # -- data ------------------------------------------------------------------------------------
    def dataset(self, task: str, split: str = "train"):
        """The ``split`` dataset of ``task`` as configured in ``modelpool.datasets``: either
        ``{task: {split: <dataset reference>}}`` or ``{task: <dataset reference>}`` (a folder, Hub id or
        ``{path, name, ...}`` mapping, whose ``split`` is then selected)."""
        ds = self.config.datasets
        if task not in ds:
            raise ConfigError(f"modelpool.datasets has no task '{task}'.{did_you_mean(task, ds)}")
        spec = ds[task]
        if isinstance(spec, Mapping) and "path" not in spec:
            if split not in spec:
                raise ConfigError(f"modelpool.datasets.{task} has no split '{split}'.{did_you_mean(split, spec)}")
            spec = spec[split]
        from fusion_bench.data import load_dataset_ref

        return load_dataset_ref(spec, split=split)

    # -- metadata --------------------------------------------------------------------------------
    def hf_folder(self, name: str) -> Path | None:
        if self.kind(name) != "hf":
            return None
        return resolve_hf_path(str(self._entries[name]), name)

    def input_paths(self) -> dict[str, Path]:
        """The pool's checkpoints (and tokenizer/processor) that are on local disk, name -> path; hub ids
        not downloaded yet are left out. Outputs never replace these or a folder holding them."""
        out: dict[str, Path] = {}
        refs = [(n, e) for n, e in self._entries.items() if not isinstance(e, (nn.Module, Mapping))]
        refs += [("tokenizer", self.config.tokenizer), ("processor", self.config.processor)]
        for n, e in refs:
            if e is None:
                continue
            p = Path(os.path.expanduser(str(e)))
            if os.path.lexists(p):
                out[n] = p
        return out

    def content_hashes(self) -> dict[str, str]:
        return {n: self.source(n).content_hash() for n in self.names}

    def describe(self) -> dict[str, Any]:
        out = {}
        for n, e in self._entries.items():
            out[n] = f"<{type(e).__name__}>" if isinstance(e, (nn.Module, Mapping)) else str(e)
        return {"name": self.config.name, "model_class": self.config.model_class, "models": out}

    # -- validation ------------------------------------------------------------------------------
    def validate(self, names: list[str] | None = None, keys: list[str] | None = None) -> list[str]:
        """Check names, shapes and dtypes agree across models before any work; return the merge keys.

        The reference is the base model (``_pretrained_`` or the first). Every model must hold every
        reference tensor with the same shape; a fine-tuned model may not hold tensors the reference
        lacks. Errors name the model and the tensor. (Finiteness is checked tensor by tensor when
        each tensor is read, before it is merged; outputs are atomic, so nothing is left behind.)
        """
        names = names if names is not None else self.names
        ref_name = self.base_name()
        self._check_hf_configs(names)
        if keys is None:
            # the tensors of the module that is merged (e.g. only the vision tower of a full CLIP base),
            # with checkpoints whose names differ by a prefix viewed under the base's names
            from fusion_bench.engine.validate import aligned_sources, validate_sources

            module_keys = self.module_state_keys(ref_name)
            if module_keys is not None:
                aligned = aligned_sources(ref_name, {n: self.source(n) for n in dict.fromkeys([ref_name, *names])},
                                          module_keys)
                if aligned is not None:
                    srcs, key_map = aligned
                    return validate_sources(ref_name, srcs, keys=[key_map[k] for k in module_keys])
        from fusion_bench.engine.validate import validate_sources

        return validate_sources(ref_name, {n: self.source(n) for n in dict.fromkeys([ref_name, *names])}, keys=keys)

    def module_state_keys(self, name: str) -> list[str] | None:
        """State-dict keys (tied aliases removed) of the module :meth:`load_model` gives for ``name``, found
        without reading weights (Hugging Face models are built on the meta device). None when unknown
        (plain state dicts without ``architecture``, or a model that cannot be built from its config)."""
        from fusion_bench.engine.validate import untied_keys

        kind = self.kind(name)
        try:
            if kind == "module":
                module = self._entries[name]
            elif kind == "hf":
                path = resolve_hf_path(str(self._entries[name]), name)
                cls = resolve_model_class(self.config.model_class)
                trust = {"trust_remote_code": True} if self.config.trust_remote_code else {}
                if hasattr(cls, "_from_config"):  # a concrete class, e.g. CLIPVisionModel
                    cfg = cls.config_class.from_pretrained(path, **trust)
                    with torch.device("meta"):
                        module = cls._from_config(cfg)
                else:  # an Auto class
                    from transformers import AutoConfig

                    cfg = AutoConfig.from_pretrained(path, **trust)
                    with torch.device("meta"):
                        module = cls.from_config(cfg, **trust)
            elif self.config.architecture is not None:
                with torch.device("meta"):
                    module = self.build_architecture()
            else:
                return None
        except ConfigError:
            raise  # a class name off the allow-list is the user's to fix, not a reason to guess
        except Exception:
            return None
        return untied_keys(module.state_dict(keep_vars=True), self.source(name).keys())

    def check_architectures(self, names: list[str] | None = None) -> None:
        """Raise ModelMismatchError when Hugging Face models of the pool have different ``model_type``s."""
        self._check_hf_configs(names if names is not None else self.names)

    def _check_hf_configs(self, names: list[str]) -> None:
        types = {}
        for n in names:
            if self.kind(n) != "hf":
                continue
            cfg = resolve_hf_path(str(self._entries[n]), n) / "config.json"
            if cfg.exists():
                mt = read_json_object(cfg, n).get("model_type")
                types[n] = mt
        # a tower saved alone (CLIPVisionModel: 'clip_vision_model') belongs to its full model ('clip')
        family = {n: str(t).removesuffix("_vision_model").removesuffix("_text_model") for n, t in types.items()}
        if len(set(family.values())) > 1:
            raise ModelMismatchError(
                f"Models have different architectures (config.json model_type): {types}. Merge models of one architecture.")

    # -- saving ----------------------------------------------------------------------------------
    def save_model(self, model: nn.Module, path: str | os.PathLike, name_for_extras: str | None = None, *,
                   overwrite: bool = False, overwrite_hint: str = "overwrite=True") -> Path:
        """Save a merged model atomically: ``save_pretrained`` for HF models (plus tokenizer/processor),
        a safetensors state dict otherwise. Returns the written path.

        An existing destination is refused unless ``overwrite``, and even then replaced only when
        fusion_bench wrote it and it holds none of this pool's checkpoints (see
        :mod:`fusion_bench.io.outputs`). Disk errors become one-line CheckpointErrors."""
        path = save_path_for(model, path)
        guard = {"overwrite": overwrite, "inputs": self.input_paths(), "what": "merged model", "hint": overwrite_hint}
        if hasattr(model, "save_pretrained"):
            with output_dir(path, **guard) as tmp:
                _write_or_explain(lambda: model.save_pretrained(tmp), path)
                self._save_extras(tmp, name_for_extras)
            return path
        from safetensors.torch import save_file

        sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        with output_path(path, **guard) as tmp:
            _write_or_explain(lambda: save_file(sd, str(tmp), metadata=safetensors_metadata("merged model")), path)
        return path

    def save_models(self, models: Mapping[str, nn.Module], path: str | os.PathLike, *, overwrite: bool = False,
                    overwrite_hint: str = "overwrite=True") -> dict[str, Path]:
        """Save a one-model-per-task result atomically as one folder: ``path/<task>/`` (``save_pretrained``, with
        the task model's tokenizer/processor) for Hugging Face models, ``path/<task>.safetensors`` otherwise.
        The same guards as :meth:`save_model` apply to ``path``. Returns task -> written path."""
        from safetensors.torch import save_file

        path = Path(os.path.expanduser(str(path)))
        guard = {"overwrite": overwrite, "inputs": self.input_paths(), "what": "per-task models", "hint": overwrite_hint}
        out: dict[str, Path] = {}
        with output_dir(path, **guard) as tmp:
            for task, model in models.items():
                if hasattr(model, "save_pretrained"):
                    _write_or_explain(lambda m=model, t=task: m.save_pretrained(tmp / t), path)
                    self._save_extras(tmp / task, task if task in self._entries else None)
                    out[task] = path / task
                else:
                    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
                    _write_or_explain(lambda sd=sd, t=task: save_file(
                        sd, str(tmp / f"{t}.safetensors"), metadata=safetensors_metadata("per-task model")), path)
                    out[task] = path / f"{task}.safetensors"
        return out

    def _save_extras(self, folder: Path, name: str | None) -> None:
        src_name = name or self.base_name()
        tok = self.config.tokenizer
        proc = self.config.processor
        base = self.hf_folder(src_name) if src_name in self._entries else None
        try:
            if tok:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(resolve_hf_path(tok, "tokenizer")).save_pretrained(folder)
            if proc:
                from transformers import AutoProcessor

                AutoProcessor.from_pretrained(resolve_hf_path(proc, "processor")).save_pretrained(folder)
        except Exception as e:
            raise CheckpointError(f"Could not save tokenizer/processor beside the merged model: {e}") from e
        if base is not None and not tok and not proc:
            # copy small side files (tokenizer, processor, generation config) from the base folder
            import shutil

            for f in base.iterdir():
                if f.is_file() and f.suffix in (".json", ".txt", ".model", ".tiktoken") and not (folder / f.name).exists() \
                        and not f.name.endswith(".index.json"):
                    shutil.copy2(f, folder / f.name)


def save_path_for(model: Any, path: str | os.PathLike) -> Path:
    """Where :meth:`ModelPool.save_model` writes ``model``: the folder ``path`` for Hugging Face models,
    else ``path`` with a ``.safetensors`` suffix (``model=None``: a model without ``save_pretrained``)."""
    path = Path(os.path.expanduser(str(path)))
    if model is not None and hasattr(model, "save_pretrained"):
        return path
    if path.is_dir():
        from fusion_bench.io.outputs import OutputExistsError

        raise OutputExistsError(f"merged_model_path={path} is an existing folder, but this pool's merged model is one "
                                f".safetensors file (the pool has no Hugging Face models); give a file path such as "
                                f"{path / 'merged.safetensors'} or a new name.")
    if path.suffix != ".safetensors":
        path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
    return path


def _write_or_explain(write, dest: Path) -> None:
    """Run a library writer; its I/O errors (disk full, read-only, ...) become one-line CheckpointErrors."""
    try:
        write()
    except FusionBenchError:
        raise
    except Exception as e:
        ose = os_error_from(e)
        if ose is None:
            raise
        raise CheckpointError(os_error_message(ose, dest, "merged model")) from e


def _quiet_from_pretrained(cls, path, **kw):
    """from_pretrained without the load report (a vision tower loaded from a full CLIP checkpoint
    lists every text-tower tensor as unexpected, which is expected)."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(path, **kw)
    finally:
        hf_logging.set_verbosity(old)


def _is_plain_mapping(v: Any) -> bool:
    """True for config mappings (YAML dicts), False for state dicts (mapping of tensors)."""
    if isinstance(v, Mapping):
        return not any(isinstance(x, torch.Tensor) for x in v.values())
    return False


def build_modelpool(config: Mapping[str, Any] | ModelPool | None) -> ModelPool:
    """Build a model pool from a config mapping (the ``modelpool`` group), or pass one through."""
    if isinstance(config, ModelPool):
        return config
    cfg = dict(to_plain(config or {}))
    kind = cfg.get("type", "default")
    if kind not in ("default", None):
        from fusion_bench.modelpool.registry import get_modelpool_class

        return get_modelpool_class(kind)(config=cfg)
    return ModelPool(config=cfg)
