"""Rank-one MoE: each MLP weight matrix routed over a pool of rank-one SVD pieces of the task vectors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from fusion_bench.config_schema import option
from fusion_bench.kernels.mixing.rankone import rank_one_experts
from fusion_bench.methods.base import register_method
from fusion_bench.methods.mixing.wemoe import TV_DTYPES, RoutedMoEConfig, _in_features, _RoutedMoEMethod
from fusion_bench.models.moe import RankOneMoE, WeightEnsemblingRouter


@dataclass
class RankOneMoEConfig(RoutedMoEConfig):
    router_hidden_layers: int = option(1, choices=(0, 1, 2), ge=0, le=2, help="Router depth: 0 (input-independent), 1 (linear, "
                                       "FusionBench default), 2 (Linear(d, 2E) -> ReLU -> Linear(2E, E)).")
    rank_k: int = option(32, ge=1, le=1_000_000, help="Rank-one experts per task and weight matrix (the k largest "
                         "singular triplets of its task vector; capped at the matrix rank).")
    select_k: int = option(-1, ge=-1, le=10**9, help="Soft top-k selection of the pooled experts per input "
                           "(FusionBench's sigmoid(100 (w - t)) mask); -1: every expert.")


@register_method
class RankOneMoEMethod(_RoutedMoEMethod):
    """Rank-one MoE: per input, ``W = W_0 + sum_ij w_ij(x) s_ij u_ij v_ij^T`` over rank-one task-vector pieces.

    RankOne-MoE (Enneng Yang et al., 2024; github.com/EnnengYang/RankOne-MoE), as FusionBench's ``rankone_moe``
    (``clip_rankone_moe``): parameters outside the MLPs merged by task arithmetic (``merge_lambda``, default
    ``init_lambda`` 0.3); in each MLP, every weight matrix's task vectors are split by SVD into their ``rank_k``
    leading rank-one pieces (pooled over the tasks: ``T * rank_k`` experts, shared by the MLP's matrices), a
    router (1 linear layer by default, output bias ``init_lambda``) on the MLP input, averaged over tokens, gives
    one weight per expert, optionally soft top-k selected; the other MLP parameters (biases) get the fixed
    ``init_lambda * sum_i tau_i``. Routers trained as WEMoE's (Adam, lr 1e-4, 1000 steps, batch 16 per task,
    summed prediction entropy on unlabeled test inputs).

    Args:
        config: :class:`RankOneMoEConfig`.
    """

    name = "rankone_moe"
    config_class: ClassVar = RankOneMoEConfig
    summary = "Rank-one MoE: MLP weights routed per input over rank-one SVD pieces of the task vectors."
    variant = ("FusionBench rankone_moe: W_0 + sum_e w_e(x) u_e s_e v_e^T over the rank_k (32) leading SVD pieces of "
               "every task's MLP weight delta, router (1 linear layer, bias init 0.3) on the MLP input averaged over "
               "tokens, optional soft top-k; biases + init_lambda sum tau; entropy-trained routers as WEMoE.")

    def build_module(self, name, base, deltas, names, layer_idx, gen, shared):
        cfg = self.config
        tv_dtype = TV_DTYPES[cfg.task_vector_dtype]
        mats = {k: v for k, v in deltas.items() if v.ndim == 3}
        if not mats:
            from fusion_bench.errors import ModelMismatchError

            raise ModelMismatchError(f"MoE module '{name}' has no weight matrix to split into rank-one experts.")
        k = min(cfg.rank_k, *(min(v.shape[1:]) for v in mats.values()))
        experts = {}
        for pn, v in mats.items():
            us, svs = zip(*(rank_one_experts(t.float(), k) for t in v))
            experts[pn] = (torch.cat(us).to(tv_dtype), torch.cat(svs).to(tv_dtype))
        fixed = {pn: cfg.init_lambda * v.float().sum(0) for pn, v in deltas.items() if pn not in mats}
        E = len(names) * k
        width = _in_features(base, name)
        router = WeightEnsemblingRouter(width, E, cfg.init_lambda, cfg.router_hidden_layers, hidden=2 * E,
                                        generator=gen)
        expert_names = [f"{t}[{j}]" for t in names for j in range(k)]
        shared["rank_k"] = k
        return RankOneMoE(base, experts, fixed, router, select_k=cfg.select_k, batch_reduce=cfg.batch_reduce,
                          expert_names=expert_names, rank_k=k)

    def count_module(self, module):
        item = TV_DTYPES[self.config.task_vector_dtype].itemsize
        n = sum(getattr(module, f"expert_u_{j}").numel() + getattr(module, f"expert_svh_{j}").numel()
                for j in range(len(module._matrices)))
        n_fixed = sum(getattr(module, f"fixed_delta_{j}").numel() for j in range(len(module._fixed)))
        return n + n_fixed, n * item + 4 * n_fixed

    def expert_groups(self, module):
        """Routing is reported per task: the mean weight of its ``rank_k`` experts."""
        k = module.rank_k
        return [module.expert_names[i * k].rsplit("[", 1)[0] for i in range(module.num_weights // k)]

    def _group(self, weights, module):
        k = module.rank_k
        w = torch.tensor(weights).view(-1, k)
        return w.mean(1).tolist()
