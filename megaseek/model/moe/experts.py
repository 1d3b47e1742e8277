"""Experts: SwiGLU feed-forwards whose output is left as a tensor-parallel PARTIAL sum.

    expert(x) = silu(x G^T) * (x U^T) D^T,   G, U (i, h) column-parallel (i/p rows per rank), D (h, i/p) row-parallel

The row-parallel reduction (`ctx.exit`) is not done per expert: the MoE layer sums the routed and the shared
experts' partial outputs first and reduces once. Every weight is drawn from its own seed (layer seed, expert
index), so expert e holds the same weights whatever the expert-parallel or tensor layout.

Routed experts are GROUPED (LocalExperts): one parameter per projection for all E_l = E/ep experts this
expert-parallel rank r holds, global experts [r E_l, (r+1) E_l), tensor rank t of p:

    gate_up_proj (E_l, 2 i/p, h):  [j] = [G_e rows t i/p .. (t+1) i/p ; U_e same rows]     e = r E_l + j
    down_proj    (E_l, h, i/p):    [j] = D_e columns t i/p .. (t+1) i/p

i.e. expert dim sharded by ep, intermediate dim by tp, exactly the slices the per-expert Column/RowParallel
layers held, so tensor parallelism needs no new communication (the layer's one `ctx.exit`). The forward runs the
rows grouped by expert through one autograd Function (`grouped_swiglu`): per non-empty expert 2 GEMMs forward
and 4 backward on slices of the grouped weights and of one activation buffer; silu and the products run once
over all rows. DeepSpeed's fused AdamW walks 2 tensors per layer instead of 3 E_l.

Checkpoints, state_dict() and HF export stay per expert: `experts.{e}.{gate,up,down}_proj.weight` with the
GLOBAL expert index (`expert_part_names`, `split_local` / `join_local`; state_dict hooks), so names and tensors
do not depend on the layout and old per-expert checkpoints load. The grouped parameters record `expert_parts`
(part name, its tensor-parallel dim inside one expert's matrix) and `expert_first`; with ep > 1 they are tagged
for DeepSpeed as expert parameters (`allreduce=False`, `group_name`): DeepSpeed then neither broadcasts them from
data-parallel rank 0 nor reduces their gradient over the whole data-parallel group, only over the
expert-data-parallel group (megaseek/engine/build.py).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.tensor_parallel.gemm import linear
from megaseek.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, TPContext, mark_sharded, \
    master_normal


def expert_seed(seed: int, e: int) -> int:
    return seed + 10_000 + 10 * e


class Expert(nn.Module):
    """One SwiGLU expert as three tensor-parallel layers (the shared experts)."""

    def __init__(self, hidden: int, inter: int, ctx: TPContext, *, std: float, out_std: float, seed: int):
        super().__init__()
        self.gate_proj = ColumnParallelLinear(hidden, inter, ctx, std=std, seed=seed)
        self.up_proj = ColumnParallelLinear(hidden, inter, ctx, std=std, seed=seed + 1)
        self.down_proj = RowParallelLinear(inter, hidden, ctx, std=out_std, seed=seed + 2)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, h) replicated over tensor ranks -> (n, h) this rank's partial sum (no reduction)."""
        a = F.silu(self.gate_proj(x)) * self.up_proj(x)  # (n, i/p)
        return linear(a, self.down_proj.weight)  # (n, h) partial


def ep_group_name(ep: int) -> str:
    return f"ep_size_{ep}"


# --- the grouped layout <-> per-expert tensors ---
GATE_UP_PARTS = (("gate_proj", 0), ("up_proj", 0))  # rows of gate_up_proj[j]; tp splits each part's rows
DOWN_PARTS = (("down_proj", 1),)                     # down_proj[j] whole; tp splits its columns
PARTS = {"gate_up_proj": GATE_UP_PARTS, "down_proj": DOWN_PARTS}  # LocalExperts' grouped parameters


def expert_part_names(name: str, parts, experts) -> list[list[str]]:
    """Canonical per-expert names of grouped parameter `name` (`...experts.gate_up_proj`, its `parts`, e.g.
    GATE_UP_PARTS): for each global expert e in `experts`, [`...experts.{e}.{part}.weight` for each part].
    (The helpers here take the parts explicitly, not from parameter attributes, which copy.deepcopy drops.)"""
    prefix = name.rpartition(".")[0]  # ...mlp.experts
    prefix = f"{prefix}." if prefix else ""
    return [[f"{prefix}{e}.{part}.weight" for part, _ in parts] for e in experts]


def per_expert_local(name: str, parts, first: int, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor shaped like a grouped parameter (its value, a moment, a gradient: this rank's shard, global
    experts from `first`) -> {per-expert canonical name: that expert's part (views)}."""
    pieces = split_local(t, parts)
    rows = expert_part_names(name, parts, range(first, first + t.shape[0]))
    return {n: pieces[k][j] for j, row in enumerate(rows) for k, n in enumerate(row)}


def split_local(t: torch.Tensor, parts) -> list[torch.Tensor]:
    """A grouped tensor (E_l, R, c) -> its parts, each (E_l, R / n_parts, c) (views)."""
    return list(t.chunk(len(parts), dim=1))


def join_local(parts: list[torch.Tensor]) -> torch.Tensor:
    """split_local's inverse: parts (E_l, a, c) -> (E_l, n_parts a, c)."""
    return torch.cat(parts, dim=1)


def gather_tp_parts(shards: list[torch.Tensor], parts) -> list[torch.Tensor]:
    """Every tensor rank's local grouped tensor (in rank order) -> the full parts (E_l, rows, cols) at tp = 1:
    part k of rank t is the t-th slice of that part along its tensor dim (1 + dim in the grouped tensor)."""
    per_rank = [split_local(s, parts) for s in shards]
    return [torch.cat([r[k] for r in per_rank], dim=1 + dim) for k, (_, dim) in enumerate(parts)]


def shard_tp_parts(full_parts: list[torch.Tensor], parts, tp_size: int, tp_rank: int) -> torch.Tensor:
    """Full parts (E_l, rows, cols) -> this tensor rank's local grouped tensor (gather_tp_parts' inverse)."""
    return join_local([t.chunk(tp_size, dim=1 + dim)[tp_rank] for t, (_, dim) in zip(full_parts, parts)])


class _GroupedSwiGLU(torch.autograd.Function):
    """y = [silu(x_j W_gu[j]_g^T) * (x_j W_gu[j]_u^T)] W_d[j]^T for each expert j on its rows x_j.

    x (n, h) rows grouped by expert (counts[j] rows for j), W_gu (E_l, 2c, h), W_d (E_l, h, c) -> y (n, h).
    Backward, with gu = x_j W_gu[j]^T = [g | u], silu(g) and a = silu(g) u saved from the forward:
        dW_d[j] = dy_j^T a_j     da = dy_j W_d[j]     dg = silu'(g) u da    du = silu(g) da
        dW_gu[j] = [dg | du]_j^T x_j                  dx_j = [dg | du]_j W_gu[j]
    Experts with no rows get zero weight gradients (every expert parameter has a gradient every step)."""

    @staticmethod
    def forward(ctx, x, w_gu, w_d, counts: list):
        n, h = x.shape
        c = w_d.shape[2]
        bounds, s = [], 0
        for j, m in enumerate(counts):
            if m:
                bounds.append((j, s, s + m))
            s += m
        gu = x.new_empty(n, 2 * c)  # (n, 2c)
        for j, a, b in bounds:
            torch.mm(x[a:b], w_gu[j].t(), out=gu[a:b])
        silu = F.silu(gu[:, :c])  # (n, c)
        act = silu * gu[:, c:]  # (n, c)
        y = x.new_empty(n, h)
        for j, a, b in bounds:
            torch.mm(act[a:b], w_d[j].t(), out=y[a:b])
        ctx.save_for_backward(x, w_gu, w_d, gu, silu, act)
        ctx.bounds = bounds
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_gu, w_d, gu, silu, act = ctx.saved_tensors
        bounds, c = ctx.bounds, w_d.shape[2]
        need_x, need_gu, need_d = ctx.needs_input_grad[:3]
        dy = dy.contiguous()
        g, u = gu[:, :c], gu[:, c:]
        da = dy.new_empty(dy.shape[0], c)
        dw_d = torch.zeros_like(w_d) if need_d else None
        for j, a, b in bounds:
            torch.mm(dy[a:b], w_d[j], out=da[a:b])
            if need_d:
                torch.mm(dy[a:b].t(), act[a:b], out=dw_d[j])
        dgu = torch.cat([torch.ops.aten.silu_backward(da * u, g), da * silu], dim=1)  # (n, 2c)
        dx = dy.new_empty(x.shape) if need_x else None
        dw_gu = torch.zeros_like(w_gu) if need_gu else None
        for j, a, b in bounds:
            if need_x:
                torch.mm(dgu[a:b], w_gu[j], out=dx[a:b])
            if need_gu:
                torch.mm(dgu[a:b].t(), x[a:b], out=dw_gu[j])
        return dx, dw_gu, dw_d, None


def grouped_swiglu(x: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor, counts: list) -> torch.Tensor:
    if sum(counts) != x.shape[0] or len(counts) != w_gu.shape[0]:
        raise ValueError(f"counts {counts} do not match {x.shape[0]} rows and {w_gu.shape[0]} experts")
    return _GroupedSwiGLU.apply(x, w_gu, w_d, counts)


class LocalExperts(nn.Module):
    """The routed experts this expert-parallel rank holds, global indices [first, first + n_local), grouped."""

    def __init__(self, cfg, ctx: TPContext, seed: int, out_std: float, ep_size: int, ep_rank: int):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if e % ep_size:
            raise ValueError(f"model.n_routed_experts={e} is not divisible by parallel.ep={ep_size}")
        if i % ctx.size:
            raise ValueError(f"model.moe_intermediate_size={i} does not divide by parallel.tp={ctx.size}")
        n_local, first = e // ep_size, ep_rank * (e // ep_size)
        self.n_local, self.first, self.inter = n_local, first, i // ctx.size
        gu, d = [], []
        for g in range(first, first + n_local):  # the per-expert seeds and shards of Column/RowParallelLinear
            s = expert_seed(seed, g)
            gate, up = master_normal((i, h), cfg.init_std, s), master_normal((i, h), cfg.init_std, s + 1)
            gu.append(torch.cat([gate.chunk(ctx.size, 0)[ctx.rank], up.chunk(ctx.size, 0)[ctx.rank]]))
            d.append(master_normal((h, i), out_std, s + 2).chunk(ctx.size, 1)[ctx.rank])
        self.gate_up_proj = nn.Parameter(torch.stack(gu))  # (E_l, 2 i/p, h)
        self.down_proj = nn.Parameter(torch.stack(d))  # (E_l, h, i/p)
        mark_sharded(self.gate_up_proj, 1, ctx)  # (gate and up each split by rows: gather_tp_parts)
        mark_sharded(self.down_proj, 2, ctx)
        self.gate_up_proj.expert_parts, self.down_proj.expert_parts = GATE_UP_PARTS, DOWN_PARTS
        for p in (self.gate_up_proj, self.down_proj):
            p.expert_first = first
            if ep_size > 1:
                p.allreduce = False
                p.group_name = ep_group_name(ep_size)
        self._register_state_dict_hook(_save_per_expert)
        self._register_load_state_dict_pre_hook(self._load_per_expert)

    def expert_weights(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global expert e's local shards (gate (i/p, h), up (i/p, h), down (h, i/p)): views."""
        j = e - self.first
        if not 0 <= j < self.n_local:
            raise KeyError(f"expert {e} is not held here (experts {self.first}..{self.first + self.n_local - 1})")
        gate, up = self.gate_up_proj[j].chunk(2, dim=0)
        return gate, up, self.down_proj[j]

    def expert_partial(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (n, h) -> (n, h) partial (a reference path: tests, tools)."""
        gate, up, down = self.expert_weights(e)
        return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x (n, h) rows grouped by local expert (counts[j] rows for local expert j, zero allowed) ->
        (n, h) partial outputs in the same order."""
        return grouped_swiglu(x, self.gate_up_proj, self.down_proj, list(counts))

    def _load_per_expert(self, sd, prefix, *_):
        for attr, parts in PARTS.items():
            names = expert_part_names(f"{prefix}{attr}", parts, range(self.first, self.first + self.n_local))
            if all(n in sd for row in names for n in row):
                sd[f"{prefix}{attr}"] = join_local([torch.stack([sd.pop(row[k]) for row in names])
                                                    for k in range(len(parts))])


def _save_per_expert(mod: LocalExperts, sd, prefix, _meta):
    """state_dict(): each grouped parameter as this rank's per-expert shards under the global expert names."""
    for attr, parts in PARTS.items():
        key, p = f"{prefix}{attr}", getattr(mod, attr)
        if key not in sd or tuple(sd[key].shape) != tuple(p.shape) or p.dim() != 3:  # ZeRO-3 placeholder
            continue
        sd.update(per_expert_local(key, parts, mod.first, sd.pop(key)))
    return sd
