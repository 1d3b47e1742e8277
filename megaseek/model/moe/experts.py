"""Experts: SwiGLU feed-forwards whose output is left as a tensor-parallel PARTIAL sum.

    expert(x) = silu(x G^T) * (x U^T) D^T,   G, U (i, h) column-parallel (i/p rows per rank), D (h, i/p) row-parallel

The row-parallel reduction (`ctx.exit`) is not done per expert: the MoE layer sums the routed and the shared
experts' partial outputs first and reduces once. Every weight is drawn from its own seed (layer seed, expert
index), so expert e holds the same weights whatever the expert-parallel or tensor layout.

Expert-parallel ranks hold the routed experts [r E/ep, (r+1) E/ep) in a ModuleDict keyed by the GLOBAL expert
index, so parameter names (`experts.{e}.gate_proj.weight`) do not depend on the layout. Each expert parameter
records `expert_index`; with ep > 1 it is also tagged for DeepSpeed as an expert parameter (`allreduce=False`,
`group_name`): DeepSpeed then neither broadcasts it from data-parallel rank 0 nor reduces its gradient over the
whole data-parallel group, only over the expert-data-parallel group (megaseek/engine/build.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, TPContext


def expert_seed(seed: int, e: int) -> int:
    return seed + 10_000 + 10 * e


class Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, ctx: TPContext, *, std: float, out_std: float, seed: int):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter, ctx, std=std, seed=seed)
        self.up_proj = ColumnParallelLinear(hidden, inter, ctx, std=std, seed=seed + 1)
        self.down_proj = RowParallelLinear(inter, hidden, ctx, std=out_std, seed=seed + 2)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, h) replicated over tensor ranks -> (n, h) this rank's partial sum (no reduction)."""
        a = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (n, i/p)
        return F.linear(a, self.down_proj.weight)  # (n, h) partial


def ep_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


def owned_expert_names(name: str, e: int, n_experts: int, ep_size: int, ep_rank: int) -> list[str]:
    """The canonical name of expert parameter `name` (global expert `e`, held by expert-parallel rank
    `ep_rank`) as each rank r of the group names its counterpart: the same local slot j = e - ep_rank E/ep,
    global index r E/ep + j. Entry r is rank r's name (the all-gather order of megaseek/ckpt/state.py)."""
    n_local = n_experts // ep_size
    j = e - ep_rank * n_local
    tag = f".experts.{e}."
    if not 0 <= j < n_local or tag not in name:
        raise ValueError(f"{name}: expert {e} is not held by expert-parallel rank {ep_rank} of {ep_size}")
    return [name.replace(tag, f".experts.{r * n_local + j}.", 1) for r in range(ep_size)]


class LocalExperts(nn.ModuleDict):
    """The routed experts this expert-parallel rank holds, keyed by global index: [first, first + n_local)."""

    def __init__(self, cfg, ctx: TPContext, seed: int, out_std: float, ep_size: int, ep_rank: int):
        e = cfg.n_routed_experts
        if e % ep_size:
            raise ValueError(f"model.n_routed_experts={e} is not divisible by parallel.ep={ep_size}")
        n_local, first = e // ep_size, ep_rank * (e // ep_size)
        super().__init__({str(g): Expert(cfg.hidden_size, cfg.moe_intermediate_size, ctx, std=cfg.init_std,
                                         out_std=out_std, seed=expert_seed(seed, g))
                          for g in range(first, first + n_local)})
        self.n_local, self.first = n_local, first
        for g, mod in self.items():
            for p in mod.parameters():
                p.expert_index = int(g)
                if ep_size > 1:
                    p.allreduce = False
                    p.group_name = ep_group_name(ep_size)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (n, h) rows grouped by local expert (counts[j] rows for local expert j, zero allowed) ->
        (n, h) partial outputs in the same order. Every expert runs, also on no rows, so every expert
        parameter gets a gradient (zeros) on every step."""
        parts = torch.split(x, counts, dim=0)
        outs = [self[str(self.first + j)].partial(parts[j]) for j in range(self.n_local)]
        return torch.cat(outs, dim=0)
