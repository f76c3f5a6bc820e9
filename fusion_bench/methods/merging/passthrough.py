"""Passthrough / layer stacking: a model built from ranges of layers of the pool's models.

The output's layer j is a copy of layer ``layers[0] + o`` of a slice's model (slices concatenated
in order, o the offset inside the slice); every tensor outside the numbered layers (embeddings,
final norm, output head) is copied from ``non_layer_source``. mergekit's ``passthrough`` with
``slices`` (e.g. depth up-scaling, "frankenmerges"). Nothing is averaged, so the method is exact
by construction and streams as pure copies.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError, did_you_mean
from fusion_bench.io.checkpoint import read_json_object
from fusion_bench.methods.base import FusionMethod, FusionResult, register_method

_EMBEDDING_RX = re.compile(r"(^|\.)(embed_tokens|embed_in|embeddings|word_embeddings|wte|wpe|embed_positions)\.")


def _before_layers(key: str) -> bool:
    """Whether a tensor outside the numbered layers comes before them (the embeddings)."""
    return bool(_EMBEDDING_RX.search(key))


@dataclass
class PassthroughConfig:
    slices: list[dict[str, Any]] = option(
        [], help="Layer ranges stacked in order: [{model: <name>, layers: [start, end]}, ...] (end exclusive). "
        "Empty: the pool's single model is copied.")
    non_layer_source: str | None = option(
        None, help="Model whose tensors outside the numbered layers (embeddings, norm, head) and config are used; "
        "default: the first slice's model.")
    post_layer_source: str | None = option(
        None, help="Model whose tensors after the numbered layers (final norm, output head) are used; default: "
        "non_layer_source (mergekit takes them from the last slice's model).")
    layer_regex: str = option(
        r"^(?P<prefix>.*?\.layers\.)(?P<index>\d+)(?P<rest>\..+)$",
        help="Regex naming a layer tensor's prefix, index and rest (default: '<...>.layers.<i>.<...>').")
    num_layers_key: str = option("num_hidden_layers", help="config.json key holding the number of layers.")


@register_method
class Passthrough(FusionMethod):
    """Stack ranges of layers of the pool's models into a new (usually deeper) model.

    Paper: no averaging; the layer-stacking used for depth up-scaling (Kim et al., "SOLAR 10.7B",
    2023) and mergekit's ``passthrough``. Variant: output layer j = layer (start + o) of the slice
    covering j, renumbered consecutively; non-layer tensors and config from ``non_layer_source``;
    config ``num_hidden_layers`` (and ``layer_types`` when present) rewritten.

    Args:
        config: :class:`PassthroughConfig`.
    """

    name = "passthrough"
    config_class: ClassVar = PassthroughConfig
    summary = "Layer stacking (mergekit passthrough): concatenate layer ranges of the models, copy the rest."
    variant = ("Output layer j = layer start+o of the covering slice (renumbered), non-layer tensors and config "
               "from non_layer_source; num_hidden_layers (and layer_types) updated. Pure copies.")
    identity_on_equal_inputs = False
    permutation_invariant = False

    #: optional (output key, slice index, offset in the slice or None, model) -> factor or None, set by the
    #: mergekit front end for passthrough ``scale``; tensors outside the layers get slice 0 (before) or the
    #: last slice (after) and offset None
    tensor_scale: Any = None

    # -- planning ----------------------------------------------------------------------------------
    def _slices(self, pool) -> list[tuple[str, int, int]]:
        valid = pool.names
        out = []
        if not self.config.slices:
            if len(pool.model_names) != 1:
                raise ConfigError(f"passthrough without method.slices copies one model, the pool has "
                                  f"{pool.model_names}; give method.slices=[{{model: ..., layers: [a, b]}}].")
            return []
        for i, s in enumerate(self.config.slices):
            extra = set(s) - {"model", "layers"}
            if extra:
                raise ConfigError(f"method.slices[{i}] has unknown key(s) {sorted(extra)}; use model and layers.")
            if "model" not in s or "layers" not in s:
                raise ConfigError(f"method.slices[{i}] needs 'model' and 'layers' ([start, end]).")
            m = str(s["model"])
            if m not in valid:
                raise ConfigError(f"method.slices[{i}].model='{m}' is not in the pool.{did_you_mean(m, valid)}")
            lr = list(s["layers"])
            if len(lr) != 2 or not all(isinstance(x, int) for x in lr) or not 0 <= lr[0] < lr[1]:
                raise ConfigError(f"method.slices[{i}].layers={lr} must be [start, end] with 0 <= start < end.")
            out.append((m, lr[0], lr[1]))
        return out

    def source_name(self, pool) -> str:
        if self.config.non_layer_source:
            n = self.config.non_layer_source
            if n not in pool.names:
                raise ConfigError(f"method.non_layer_source='{n}' is not in the pool.{did_you_mean(n, pool.names)}")
            return n
        sl = self._slices(pool)
        return sl[0][0] if sl else pool.model_names[0]

    config_source = source_name

    def post_source_name(self, pool) -> str:
        n = self.config.post_layer_source
        if n is None:
            return self.source_name(pool)
        if n not in pool.names:
            raise ConfigError(f"method.post_layer_source='{n}' is not in the pool.{did_you_mean(n, pool.names)}")
        return n

    def _scale(self, out_key: str, where: tuple[int, int | None], model: str) -> float | None:
        if self.tensor_scale is None:
            return None
        v = self.tensor_scale(out_key, where[0], where[1], model)
        return None if v is None else float(v)

    def _layer_map(self, keys: list[str]) -> dict[int, list[tuple[str, str, str]]]:
        rx = re.compile(self.config.layer_regex)
        out: dict[int, list[tuple[str, str, str]]] = {}
        for k in keys:
            m = rx.match(k)
            if m:
                out.setdefault(int(m.group("index")), []).append((k, m.group("prefix"), m.group("rest")))
        return out

    def mapping(self, pool, key_lists: dict[str, list[str]]) -> tuple[list[tuple[str, str, str]], dict[str, Any]]:
        """[(output key, source model, source key)] in output order, and config updates."""
        out, updates, _ = self._mapping(pool, key_lists)
        return out, updates

    def _mapping(self, pool, key_lists: dict[str, list[str]]):
        """As :meth:`mapping`, plus (slice index, offset in the slice or None) of every output tensor."""
        slices = self._slices(pool)
        src = self.source_name(pool)
        if not slices:
            return [(k, src, k) for k in key_lists[src]], {}, [(0, None)] * len(key_lists[src])
        post = self.post_source_name(pool)
        maps = {m: self._layer_map(key_lists[m]) for m in {s[0] for s in slices} | {src}}
        rx = re.compile(self.config.layer_regex)
        out: list[tuple[str, str, str]] = []
        where: list[tuple[int, int | None]] = []
        src_keys = key_lists[src]
        first_layer = next((i for i, k in enumerate(src_keys) if rx.match(k)), len(src_keys))
        pre_keys = [k for k in src_keys[:first_layer] if not rx.match(k)]
        tail = [k for k in src_keys[first_layer:] if not rx.match(k)]
        if post != src:  # the keys may be in name order: tensors after the layers are all but the embeddings
            tail = [k for k in pre_keys + tail if not _before_layers(k)]
            pre_keys = [k for k in pre_keys if _before_layers(k)]
        out += [(k, src, k) for k in pre_keys]
        where += [(0, None)] * len(pre_keys)
        j = 0
        for si, (m, a, b) in enumerate(slices):
            n_layers = max(maps[m]) + 1 if maps[m] else 0
            if b > n_layers:
                raise ModelMismatchError(f"method.slices asks layers [{a}, {b}) of model '{m}', which has {n_layers} "
                                         "layers; lower the end of that range.")
            for i in range(a, b):
                for k, prefix, rest in maps[m][i]:
                    out.append((f"{prefix}{j}{rest}", m, k))
                    where.append((si, i - a))
                j += 1
        if post != src:
            post_keys = set(key_lists[post])
            missing = [k for k in tail if k not in post_keys]
            if missing:
                raise ModelMismatchError(f"method.post_layer_source='{post}' has no tensor '{missing[0]}' "
                                         f"(model '{src}' has it); the models' architectures differ.")
        out += [(k, post, k) for k in tail]
        where += [(len(slices) - 1, None)] * len(tail)
        updates: dict[str, Any] = {self.config.num_layers_key: j}
        return out, updates, where

    def _config_updates(self, pool, updates: dict[str, Any]) -> dict[str, Any]:
        """Add ``layer_types`` (per-layer list in some configs) rebuilt from the slices."""
        from fusion_bench.engine.streaming import checkpoint_folder

        slices = self._slices(pool)
        if not slices:
            return updates
        cfgs = {}
        for m in {s[0] for s in slices}:
            p = checkpoint_folder(pool, m)
            f = p / "config.json" if p is not None and p.is_dir() else None
            cfgs[m] = read_json_object(f, m) if f is not None and f.exists() else {}
        if all("layer_types" in c for c in cfgs.values()) and cfgs:
            updates["layer_types"] = [t for m, a, b in slices for t in cfgs[m]["layer_types"][a:b]]
        return updates

    # -- streaming ---------------------------------------------------------------------------------
    def stream_plan(self, pool, readers: dict[str, Any], out_dtype: torch.dtype | None):
        from fusion_bench.engine.streaming import Job

        mapping, updates, where = self._mapping(pool, {n: readers[n].keys() for n in readers})
        jobs = []
        seen = set()
        for (out_key, m, k), w in zip(mapping, where):
            if out_key in seen:
                raise ModelMismatchError(f"passthrough would write tensor '{out_key}' twice; check method.layer_regex.")
            seen.add(out_key)
            meta = readers[m].meta(k)
            dt = out_dtype if (out_dtype is not None and meta.dtype.is_floating_point) else meta.dtype
            job = Job(out_key, meta.shape, dt, "copy", {m: k}, copy_from=m, in_dtype=meta.dtype)
            scale = self._scale(out_key, w, m) if meta.dtype.is_floating_point else None
            if scale is not None:
                job.scale = scale
            jobs.append(job)
        return jobs, self._config_updates(pool, updates)

    # -- in memory ---------------------------------------------------------------------------------
    def run(self, modelpool) -> FusionResult:
        t0 = time.perf_counter()
        pool = modelpool
        names = list(dict.fromkeys([*(s[0] for s in self._slices(pool)), self.source_name(pool),
                                    self.post_source_name(pool)]))
        sources = {n: pool.source(n) for n in names}
        mapping, updates, where = self._mapping(pool, {n: sources[n].keys() for n in names})
        updates = self._config_updates(pool, updates)
        sd = {}
        for (out_key, m, k), w in zip(mapping, where):
            t = sources[m].get(k)
            scale = self._scale(out_key, w, m) if t.is_floating_point() else None
            if scale is not None:
                t = (t.double() if t.dtype == torch.float64 else t.float()) * scale
            if pool.dtype is not None and t.is_floating_point():
                t = t.to(pool.dtype)
            sd[out_key] = t.clone()
        src = self.source_name(pool)
        model = None
        if pool.kind(src) == "hf":
            from transformers import AutoConfig

            from fusion_bench.modelpool.base import resolve_model_class

            cfg = AutoConfig.from_pretrained(pool.hf_folder(src))
            for k, v in updates.items():
                setattr(cfg, k, v)
            cls = resolve_model_class(pool.config.model_class)
            model = cls.from_config(cfg, dtype=pool.dtype) if pool.dtype is not None else cls.from_config(cfg)
            missing, unexpected = model.load_state_dict(sd, strict=False)
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
            if missing or unexpected:
                raise ModelMismatchError(f"passthrough result does not fit {cls.__name__}: missing {missing[:5]}, "
                                         f"unexpected {list(unexpected)[:5]}.")
            model.eval()
        else:
            from fusion_bench.modelpool.base import TensorBag

            model = TensorBag(sd)
        return FusionResult("merged", model=model, metadata=self._metadata(t0, extra_parameters=None,
                                                                           config_updates=updates,
                                                                           tensors=len(sd)))
