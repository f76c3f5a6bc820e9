"""SMILE upscaling of any model: its linear layers become sparse mixtures of low-rank experts (no data, no training).

Paper: Tang et al., "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained
Foundation Models", arXiv 2408.10174. FusionBench: ``method=smile_upscaling``. The tensor math is in
:mod:`fusion_bench.kernels.mixing.smile`, the layer in :mod:`fusion_bench.models.smile`.

Causal LMs (Llama, Mistral, Qwen2) given to ``smile_upscaling`` are upscaled by the causal-LM path of
:mod:`fusion_bench.methods.mixing.smile_causal_lm` (the seven projections of every decoder layer; the result is a
registered ``Smile*ForCausalLM`` that ``save_pretrained`` writes and ``AutoModelForCausalLM`` reloads).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.errors import ConfigError, ModelMismatchError
from fusion_bench.methods.base import FusionMethod, FusionResult, MethodConfig, register_method
from fusion_bench.methods.mixing._moe_report import (
    measure_inference_cost,
    mixed_model_summary,
    write_routing_plot,
)
from fusion_bench.utils import float_numel, resolve_device

VARIANT = ("Tang et al. 2024 (SMILE), FusionBench smile_upscaling: per nn.Linear, dW_i = W_i - W_0 = U_i S_i V_i^T "
           "(thin SVD, float32); expert i = U_i[:, :k] S_i[:k] V_i[:, :k]^T + (b_i - b_0) (k <= 0: the whole delta); "
           "router r_i = ||V_i[:, :gate_k]^T x||_2, p = softmax(r) over all experts, top_k kept and renormalised; "
           "y = W_0 x + b_0 + sum_topk p_i / sum_topk p_j * expert_i(x); layers no model changed are kept; "
           "other parameters pretrained (average_experts: mean of the fine-tuned models)")


@dataclass
class SmileUpscalingConfig(MethodConfig):
    gate_k: int = option(1, ge=1, le=2**20, help="Router rank: the routing logit of task i is the norm of the "
                         "projection of the input on the top gate_k right singular vectors of its delta "
                         "(FusionBench default 1; its CLIP examples use 16). Capped at min(m, n) per layer.")
    k: int = option(128, ge=-1, le=2**20, help="Expert rank: each expert keeps the top k singular triplets of its "
                    "delta; k <= 0 keeps the whole delta (full-rank experts). Capped at min(m, n) per layer.")
    top_k: int = option(1, ge=1, le=4096, help="Experts used per input token (at most the number of models).")
    average_experts: bool = option(False, help="Parameters outside the upscaled layers (norms, embeddings, "
                                   "non-matching linears) become the mean of the fine-tuned models' instead of "
                                   "the pretrained ones (FusionBench's average_experts).")
    routing_use_diff: bool = option(True, help="Routers from the SVD of the deltas W_i - W_0 (the paper); false: "
                                    "from the SVD of the fine-tuned weights W_i (FusionBench's routing_use_diff).")
    linear_patterns: list[str] = option(["*"], help="Glob patterns of the module names of the nn.Linear layers to "
                                        "upscale (default: every linear layer, as FusionBench; e.g. ['*mlp*'] for the "
                                        "MLPs only). Causal LMs: the seven projections of each decoder layer.")
    exclude: list[str] = option([], help="Glob patterns of linear module names left as pretrained.")
    device: str = option("cpu", help="Where the SVDs run: cpu, cuda, cuda:1, auto (FusionBench's "
                         "upscaling_accelerator); the model stays where it was loaded.")
    report_samples: int = option(64, ge=0, le=10**6, help="Inputs of each task's report_split (labels not read) on "
                                 "which the report gives every expert's mean routing weight per layer, when the "
                                 "pool names each model's task data (CLIP zoo, modelpool.datasets); 0: no routing "
                                 "report. Reporting only: the upscaled model does not depend on it.")
    report_split: str = option("test", help="Split of the routing report's inputs.")
    cost_repeats: int = option(3, ge=0, le=1000, help="Forward passes timed for the inference-cost ratio (upscaled vs "
                               "one model, same batch of task inputs); 0: not measured.")
    cost_batch_size: int = option(32, ge=1, le=2**16, help="Batch of the inference-cost measurement.")


def _check_top_k(top_k: int, n_models: int, method: str) -> None:
    if top_k > n_models:
        raise ConfigError(f"method.top_k={top_k} but the pool has {n_models} fine-tuned models ('{method}'); set "
                          f"method.top_k to at most {n_models}.")


@register_method
class SmileUpscaling(FusionMethod):
    """SMILE: every selected linear layer becomes a sparse mixture of the tasks' low-rank deltas with a
    parameter-free router.

    Paper: Tang et al. 2024 (arXiv 2408.10174). Variant: see :data:`VARIANT`.

    Args:
        config: :class:`SmileUpscalingConfig` (gate_k, k, top_k, average_experts, routing_use_diff,
            linear_patterns, exclude, device).
    """

    name = "smile_upscaling"
    config_class: ClassVar = SmileUpscalingConfig
    family = "mixing"
    summary = "SMILE: linear layers upscaled to sparse mixtures of low-rank experts, parameter-free router (Tang 2024)."
    variant = VARIANT
    requires_pretrained = True
    # N copies of the base give the base back (no layer changed); the experts' order is the pool's order, so the
    # state dict depends on it (outputs do not: tested in tests/test_mixing_smile.py)
    identity_on_equal_inputs = True
    permutation_invariant = False

    def run(self, modelpool) -> FusionResult:
        c = self.config
        t0 = time.perf_counter()
        if not modelpool.has_pretrained:
            raise ModelMismatchError(f"Method '{self.name}' needs the base model: add '_pretrained_' to the model "
                                     "pool's models.")
        names = modelpool.model_names
        if not names:
            raise ModelMismatchError(f"Method '{self.name}' needs at least one fine-tuned model besides '_pretrained_'.")
        _check_top_k(c.top_k, len(names), self.name)
        base = modelpool.load_pretrained_model()
        from fusion_bench.models.smile_hf import smile_family

        if smile_family(base) is not None:
            from fusion_bench.methods.mixing.smile_causal_lm import upscale_causal_lm_in_memory

            model, info = upscale_causal_lm_in_memory(base, [modelpool.load_model(n) for n in names], names,
                                                      gate_k=c.gate_k, k=c.k, top_k=c.top_k,
                                                      routing_use_diff=c.routing_use_diff, device=c.device)
            return FusionResult("merged", model=model, metadata=self._metadata(t0, **info))
        base_params = float_numel(base)
        model = copy.deepcopy(base)  # live modules of the pool are never modified
        finetuned = [modelpool.load_model(n) for n in names]
        from fusion_bench.models.smile import smile_parameter_counts, upscale_linears

        with torch.no_grad():
            done = upscale_linears(model, finetuned, gate_k=c.gate_k, k=c.k, top_k=c.top_k, patterns=c.linear_patterns,
                                   exclude=c.exclude, average_experts=c.average_experts,
                                   routing_use_diff=c.routing_use_diff, device=resolve_device(c.device))
        counts = smile_parameter_counts(model, base_params)
        wall = time.perf_counter() - t0
        routing, inference, notes = self._report(modelpool, model, base, names)
        summary = mixed_model_summary(total=counts["total_parameters"], active=counts["active_parameters_per_token"],
                                      applied=base_params + counts["router_parameters"], one_model=base_params,
                                      router=counts["router_parameters"], inference=inference)
        meta = self._metadata(t0, **counts, mixed_model=summary, experts=list(names),
                              upscaled_layer_names=done["upscaled"][:200], unchanged_layers=done["unchanged"][:50],
                              averaged_parameters=len(done["averaged"]))
        meta["method_wall_time_s"] = round(wall, 4)  # the upscaling; the report's measurements come after it
        if routing is not None:
            meta["routing"] = routing
        if not done["upscaled"]:
            notes.append("no nn.Linear layer matched method.linear_patterns and differed from the base")
        if notes:
            meta["notes"] = notes
        _refuse_hf_save(model, self.name)
        return FusionResult("merged", model=model, metadata=meta)

    def write_artifacts(self, report: dict, report_path, overwrite: bool = False) -> dict[str, str]:
        """Called by the program once the report is written: the routing plot beside it."""
        return write_routing_plot(report, report_path, overwrite)

    @torch.no_grad()
    def _report(self, modelpool, model, base, names: list[str]) -> tuple[dict | None, dict | None, list[str]]:
        """Routing weights per task's inputs and the inference-cost ratio, when the pool has the tasks' data."""
        c = self.config
        if c.report_samples <= 0 and c.cost_repeats <= 0:
            return None, None, []
        from fusion_bench.errors import FusionBenchError
        from fusion_bench.methods._task_data import check_tasks, make_adapter
        from fusion_bench.models.smile import smile_layers

        try:
            check_tasks(modelpool, self.name)
            adapter = make_adapter(modelpool, "auto")
            n = max(c.report_samples, c.cost_batch_size if c.cost_repeats > 0 else 0)
            data = {t: adapter.examples(t, c.report_split, n, with_labels=False) for t in names}
        except FusionBenchError as e:
            return None, None, [f"no routing report or inference cost (no task inputs): {e}"]
        except Exception as e:  # a report must not lose the upscaled model
            return None, None, [f"no routing report or inference cost: {type(e).__name__}: {e}"]
        layers = smile_layers(model)
        routing = None
        if c.report_samples > 0 and layers:
            per_task: dict = {}
            for t in names:
                clf = adapter.classifier(model, t).eval()
                for _, lay in layers:
                    lay.routing_log = []
                d = data[t]
                for s in range(0, min(len(d), c.report_samples), 64):
                    clf(d.take(slice(s, min(s + 64, c.report_samples, len(d)))))
                per_layer = {}
                for name, lay in layers:
                    tot = sum(v for v, _ in lay.routing_log)
                    cnt = sum(k for _, k in lay.routing_log)
                    per_layer[name] = [round(float(x), 6) for x in tot / max(1, cnt)]
                    lay.routing_log = None
                mean = torch.tensor(list(per_layer.values())).mean(0)
                per_task[t] = {"mean": [round(float(x), 6) for x in mean], "layers": per_layer}
            routing = {"experts": list(names), "split": c.report_split, "weights": "applied (top-k, renormalised)",
                       "samples_per_task": {t: min(len(data[t]), c.report_samples) for t in names},
                       "per_task": per_task,
                       "own_expert_weight": {t: per_task[t]["mean"][i] for i, t in enumerate(names)}}
        inference = None
        if c.cost_repeats > 0:
            x = data[names[0]].take(slice(0, c.cost_batch_size))
            pixels = _takes_pixels(model)
            inference = measure_inference_cost(model, base, x, repeats=c.cost_repeats,
                                               call=lambda m, xb: m(pixel_values=xb) if pixels else m(xb))
        return routing, inference, []


def _takes_pixels(model) -> bool:
    import inspect

    try:
        return "pixel_values" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _refuse_hf_save(model, method: str) -> None:
    """A Hugging Face model with SmileLinear layers inside keeps its class but not its architecture:
    ``save_pretrained`` would write a folder that does not reload. Refuse it with the reason (causal LMs get a
    registered Smile*ForCausalLM class instead, which saves and reloads)."""
    if not hasattr(model, "save_pretrained"):
        return

    def refuse(*args, **kwargs) -> None:
        from fusion_bench.errors import FusionBenchError

        raise FusionBenchError(f"{method}: the upscaled {type(model).__name__} (SMILE layers inside) has no Hugging Face "
                               "class to save as; run without merged_model_path, or save model.state_dict() from "
                               "Python (causal LMs: method=smile_causal_lm_upscaling saves and reloads).")

    model.save_pretrained = refuse
