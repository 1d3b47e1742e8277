"""Megatron-style tensor-parallel layers. Each takes a `TPContext` (its group), never the run config.

Initialization is layout-free: every layer builds the *full* master weight from its own seed on the CPU
and keeps its shard, so a model built at tensor degree k holds exactly the weights of degree 1.

Sharded parameters carry `tensor_model_parallel = True` and `partition_dim`, which DeepSpeed reads to
sum their gradient norms across the model-parallel group once; replicated parameters are counted once.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaseek.tensor_parallel import mappings as M
from megaseek.tensor_parallel.gemm import linear


@dataclass
class TPContext:
    """What a layer needs to know about tensor parallelism."""

    group: Any = None
    size: int = 1
    rank: int = 0
    sequence_parallel: bool = False

    @classmethod
    def from_axis(cls, axis, sequence_parallel: bool = False) -> "TPContext":
        if axis is None or axis.size == 1:
            return cls(sequence_parallel=False)
        return cls(group=axis.group, size=axis.size, rank=axis.rank, sequence_parallel=sequence_parallel)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """Replicated (or sequence-sharded) activations -> input of a column-parallel region.
        Without SP: identity forward, all-reduce dX backward. With SP: all-gather the sequence
        (b, s/p, h) -> (b, s, h) forward, reduce-scatter dX backward."""
        if self.sequence_parallel:
            return M.gather_from_sequence(x, self.group)
        return M.copy_to_region(x, self.group)

    def exit(self, y_partial: torch.Tensor) -> torch.Tensor:
        """Partial sums of a row-parallel region -> replicated (or sequence-sharded) activations.
        Without SP: all-reduce. With SP: reduce-scatter along the sequence (b, s, h) -> (b, s/p, h)."""
        if self.sequence_parallel:
            return M.reduce_scatter_to_sequence(y_partial, self.group)
        return M.reduce_from_region(y_partial, self.group)

    @contextlib.contextmanager
    def no_sequence_parallel(self):
        """Run without sequence parallelism (decoding one token at a time cannot split the sequence); the
        weights are the same, only the communication pattern changes."""
        was, self.sequence_parallel = self.sequence_parallel, False
        try:
            yield
        finally:
            self.sequence_parallel = was

    def replicated_weight(self, w: torch.Tensor) -> torch.Tensor:
        """A weight replicated across tensor ranks whose per-rank gradient is partial (sequence-parallel
        norms, kv heads shared by several tensor ranks): identity forward, all-reduce dW backward, so
        every rank holds the full, identical gradient."""
        return M.copy_to_region(w, self.group) if self.size > 1 else w


def mark_norm_ownership(model: nn.Module, tp_rank: int, pipeline_copies=()) -> None:
    """Tell DeepSpeed which rank counts which parameter in the global gradient norm.

    DeepSpeed counts p on a rank when `p.tensor_model_parallel` or `p.model_parallel` is set, or the rank is
    model-parallel rank 0, and sums over the model-parallel group (tensor x pipeline). We want: sharded
    parameters on every rank; replicated ones on tensor rank 0 of *each* pipeline stage; the last stage's
    copy of a tied embedding nowhere (stage 0 counts it). `ds_pipe_replicated` is DeepSpeed's own flag for
    such copies (its bf16 optimizer reads it)."""
    copies = {id(p) for p in pipeline_copies}
    for p in model.parameters():
        if id(p) in copies:
            p.tensor_model_parallel = False
            p.model_parallel = False
            p.ds_pipe_replicated = True
        elif not getattr(p, "tensor_model_parallel", False) and tp_rank == 0:
            p.model_parallel = True


def counts_in_norm(p: torch.Tensor, mp_rank: int) -> bool:
    """The same rule DeepSpeed applies (see mark_norm_ownership)."""
    if getattr(p, "ds_pipe_replicated", False):
        return False
    return bool(getattr(p, "tensor_model_parallel", False) or getattr(p, "model_parallel", False) or mp_rank == 0)


def master_normal(shape, std: float, seed: int) -> torch.Tensor:
    """The full (unsharded) fp32 weight, drawn from N(0, std^2) by a generator of its own seed."""
    g = torch.Generator().manual_seed(int(seed) % (2**63))
    return torch.empty(*shape).normal_(0.0, std, generator=g)


def mark_sharded(p: nn.Parameter, dim: int, ctx: TPContext):
    """Record the axis a parameter is split on across tensor ranks (DeepSpeed and our checkpoints read it)."""
    if ctx.size > 1:
        p.tensor_model_parallel = True
        p.partition_dim = dim
        p.partition_stride = 1


class ColumnParallelLinear(nn.Module):
    """Y = X A with A (in, out) split by columns, A = [A_1 .. A_p]; rank i computes Y_i = X A_i.

    Weight stored as (out/p, in) (torch's layout). The caller brings X into the region with
    `ctx.enter` once (several column-parallel layers may share one entry); `forward` only multiplies.
    Optional `gather_output` all-gathers Y along the last dim (backward: keep my slice).
    """

    def __init__(self, in_features: int, out_features: int, ctx: TPContext, *, std: float, seed: int,
                 bias: bool = False, gather_output: bool = False, valid_out: Optional[int] = None):
        super().__init__()
        if out_features % ctx.size != 0:
            raise ValueError(f"output size {out_features} does not divide by tensor degree {ctx.size}")
        self.ctx, self.gather_output = ctx, gather_output
        self.in_features, self.out_features = in_features, out_features
        valid = out_features if valid_out is None else valid_out  # rows past `valid` are padding (zeros)
        full = torch.zeros(out_features, in_features)
        full[:valid] = master_normal((valid, in_features), std, seed)  # (out, in)
        self.weight = nn.Parameter(full.chunk(ctx.size, dim=0)[ctx.rank].clone())  # (out/p, in)
        mark_sharded(self.weight, 0, ctx)
        if valid_out is not None:
            self.weight.vocab_rows = valid_out  # rows past this are padding: not in checkpoints
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features // ctx.size))  # (out/p,)
            mark_sharded(self.bias, 0, ctx)

    def forward(self, x_parallel: torch.Tensor) -> torch.Tensor:
        y = linear(x_parallel, self.weight, self.bias)  # (..., out/p)
        if self.gather_output:
            y = M.gather_from_region(y, self.ctx.group)  # (..., out)
        return y


class FusedColumnParallelLinear(nn.Module):
    """m column-parallel projections of one input in ONE GEMM (Megatron's fused QKV / gate-up), in a grouped
    layout whose full tensor does not depend on the tensor degree p.

    The parts A^1 .. A^m (out_j, in) are cut into G row groups each (out_j / G rows per group); the full fused
    weight W (sum_j out_j, in) lists the groups in order, each group holding its rows of every part:

        W = [A^1_(0); A^2_(0); ..; A^m_(0); A^1_(1); ..; A^m_(G-1)]     (A^j_(g): rows g out_j/G .. of A^j)

    Rank i holds the contiguous rows of groups [i G/p, (i+1) G/p): W_i = W.chunk(p)[i], so the all-gather of
    the shards along dim 0 is W itself at every p (checkpoint tools, DeepSpeed's norms and cross-layout
    comparisons see one tensor). Y_i = X W_i^T holds, for each of its groups, that group's outputs of every
    part: with QKV grouped by kv head (G = nkv: q heads g r .. g r + r - 1 with r = nh / nkv, then k_g, v_g)
    rank i gets exactly its own nh/p query heads and their nkv/p kv heads; with gate/up grouped by column
    (G = i) it gets its own i/p gate and up columns. Forward and backward need no communication beyond the
    shared `ctx.enter` (dX = dY W_i is one GEMM, all-reduced once).

    state_dict() and checkpoints hold the unfused parts under their own names (`expose_unfused_state`,
    `split_full` / `fuse_full`), so HF export, old checkpoints and fused / unfused runs interoperate. Each
    part's full master weight is drawn from its own seed, as the unfused layers do: same seed, same weights.
    """

    def __init__(self, in_features: int, parts: list[tuple[str, int, int]], groups: int, ctx: TPContext, *,
                 std: float):
        super().__init__()
        if groups % ctx.size:
            raise ValueError(f"{groups} fused groups do not divide by tensor degree {ctx.size}")
        for name, out, _ in parts:
            if out % groups:
                raise ValueError(f"{name}: output size {out} does not divide into {groups} groups")
        self.ctx, self.in_features, self.groups = ctx, in_features, groups
        self.local_groups = groups // ctx.size
        self.per_group = [out // groups for _, out, _ in parts]  # rows of each part in one group
        full = fuse_full([master_normal((out, in_features), std, seed) for _, out, seed in parts], groups)
        self.weight = nn.Parameter(full.chunk(ctx.size, dim=0)[ctx.rank].clone())  # (G/p sum_j out_j/G, in)
        mark_sharded(self.weight, 0, ctx)
        self.weight.fused_parts = tuple((name, n) for (name, _, _), n in zip(parts, self.per_group))
        self.weight.fused_groups = groups

    def forward(self, x_parallel: torch.Tensor, layout: str = "parts"):
        """layout "parts": one view (..., G/p, out_j/G) per part; "flat": the GEMM's output (..., G/p * R) as
        one tensor, R = sum_j out_j/G; "part_major": the weight's rows reordered part by part first (a row copy
        of the weight), so each part's output is one contiguous column block (..., G/p * out_j/G) -- for a
        compiler, whose kernels on interleaved columns run scalar. The same values in every layout. Always
        called as the module (hooks such as ZeRO-3's parameter gathering run)."""
        if layout == "part_major":
            w = torch.cat(split_full(self.weight, self.local_groups, self.per_group))  # (sum_j G/p out_j/G, in)
            return linear(x_parallel, w).split([self.local_groups * n for n in self.per_group], dim=-1)
        y = linear(x_parallel, self.weight)  # (..., G/p * R)
        if layout == "flat":
            return y
        y = y.view(*y.shape[:-1], self.local_groups, sum(self.per_group))  # (..., G/p, R)
        return y.split(self.per_group, dim=-1)  # views (..., G/p, out_j/G), one per part


def fused_part_names(name: str, p) -> list[str]:
    """The (unfused) names a parameter holds: `a.qkv_proj.weight` with parts q, k, v -> a.q_proj.weight, ...;
    any other parameter: [name]."""
    parts = getattr(p, "fused_parts", None)
    if parts is None:
        return [name]
    head, _, last = name.rpartition(".")  # a.qkv_proj, weight
    parent = head.rpartition(".")[0]
    return [f"{parent}.{n}.{last}" if parent else f"{n}.{last}" for n, _ in parts]


def split_full(w: torch.Tensor, groups: int, per_group: list[int]) -> list[torch.Tensor]:
    """Grouped fused rows (groups * sum(per_group), ...) -> the parts (groups * per_group[j], ...); works on the
    full tensor and on a rank's shard alike (a shard is whole groups)."""
    g = w.reshape(groups, sum(per_group), *w.shape[1:])  # (G, R, in)
    return [t.reshape(groups * n, *w.shape[1:]) for t, n in zip(g.split(per_group, dim=1), per_group)]


def fuse_full(parts: list[torch.Tensor], groups: int) -> torch.Tensor:
    """The parts (out_j, ...) -> grouped fused rows (sum_j out_j, ...): group g = [A^1_(g); ..; A^m_(g)]."""
    g = [t.reshape(groups, t.shape[0] // groups, *t.shape[1:]) for t in parts]  # (G, out_j/G, in)
    return torch.cat(g, dim=1).reshape(sum(t.shape[0] for t in parts), *parts[0].shape[1:])


def fused_split(w: torch.Tensor, p) -> list[torch.Tensor]:
    """A fused parameter's full (gathered) tensor -> its full parts."""
    return split_full(w, p.fused_groups, [n for _, n in p.fused_parts])


def expose_unfused_state(module: nn.Module, attr: str) -> None:
    """`module.state_dict()` / `load_state_dict()` use the unfused names of the fused child `attr` (its parts'
    local shards: e.g. attn.q_proj.weight, attn.k_proj.weight, ...), so every state-dict consumer sees the
    same keys and shapes whether the layer is fused or not."""

    def save_hook(mod, sd, prefix, _meta):
        key = f"{prefix}{attr}.weight"
        if key not in sd:
            return sd
        w, child = sd.pop(key), getattr(mod, attr)
        if w.shape[0] != child.local_groups * sum(child.per_group):  # a partitioned placeholder (ZeRO-3)
            sd[key] = w
            return sd
        for (name, _), t in zip(child.weight.fused_parts, split_full(w, child.local_groups, child.per_group)):
            sd[f"{prefix}{name}.weight"] = t  # this rank's shard of the part
        return sd

    def load_hook(sd, prefix, *_):
        child = getattr(module, attr)
        keys = [f"{prefix}{name}.weight" for name, _ in child.weight.fused_parts]
        if all(k in sd for k in keys):
            sd[f"{prefix}{attr}.weight"] = fuse_full([sd.pop(k) for k in keys], child.local_groups)

    module._register_state_dict_hook(save_hook)
    module._register_load_state_dict_pre_hook(load_hook)


class RowParallelLinear(nn.Module):
    """Y = X A with A (in, out) split by rows, A = [A_1; ..; A_p], X = [X_1 .. X_p] already split by
    columns (the output of a column-parallel layer). Rank i computes X_i A_i; Y = sum_i X_i A_i by
    all-reduce (or reduce-scatter along the sequence with SP). Backward: dX_i = dY A_i^T, no comm.

    Weight stored as (out, in/p); the bias (replicated) is added after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, ctx: TPContext, *, std: float, seed: int,
                 bias: bool = False):
        super().__init__()
        if in_features % ctx.size != 0:
            raise ValueError(f"input size {in_features} does not divide by tensor degree {ctx.size}")
        self.ctx = ctx
        self.in_features, self.out_features = in_features, out_features
        full = master_normal((out_features, in_features), std, seed)  # (out, in)
        self.weight = nn.Parameter(full.chunk(ctx.size, dim=1)[ctx.rank].clone())  # (out, in/p)
        mark_sharded(self.weight, 1, ctx)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x_parallel: torch.Tensor) -> torch.Tensor:
        y = self.ctx.exit(linear(x_parallel, self.weight))  # (b, s, out) or (b, s/p, out) with SP
        if self.bias is not None:
            b = self.ctx.replicated_weight(self.bias) if self.ctx.sequence_parallel else self.bias
            y = y + b
        return y


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 1) -> int:
    """Pad the vocabulary to a multiple of tp * multiple so every rank holds an equal slice."""
    m = tp * max(1, multiple)
    return ((vocab_size + m - 1) // m) * m


class VocabParallelEmbedding(nn.Module):
    """E (V_pad, h) split by rows: rank i holds rows [i V_pad/p, (i+1) V_pad/p).

    Forward: each rank looks up the tokens in its range (others give 0), then the partial embeddings are
    summed by all-reduce (or reduce-scatter along the sequence with SP). Padded rows are zero and never
    looked up (token ids < vocab_size).
    """

    def __init__(self, vocab_size: int, padded_size: int, hidden: int, ctx: TPContext, *, std: float, seed: int):
        super().__init__()
        self.ctx, self.vocab_size, self.padded_size = ctx, vocab_size, padded_size
        self.per_rank = padded_size // ctx.size
        self.start = ctx.rank * self.per_rank
        full = torch.zeros(padded_size, hidden)
        full[:vocab_size] = master_normal((vocab_size, hidden), std, seed)  # padded rows stay 0
        self.weight = nn.Parameter(full[self.start:self.start + self.per_rank].clone())  # (V_pad/p, h)
        mark_sharded(self.weight, 0, ctx)
        self.weight.vocab_rows = vocab_size  # rows past this are padding: not in checkpoints

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.size == 1:
            return F.embedding(ids, self.weight)  # (b, s, h)
        outside = (ids < self.start) | (ids >= self.start + self.per_rank)
        local = (ids - self.start).masked_fill(outside, 0)
        e = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # (b, s, h) partial
        return self.ctx.exit(e)  # (b, s, h), or (b, s/p, h) with SP


def mask_padded_logits(logits: torch.Tensor, vocab_size: int, vocab_start: int) -> torch.Tensor:
    """Set logits of padded vocabulary entries (ids >= vocab_size) to the dtype's minimum, so they never
    win a softmax, carry no probability into the loss and receive no gradient."""
    n_local = logits.shape[-1]
    n_real = max(0, min(n_local, vocab_size - vocab_start))
    if n_real == n_local:
        return logits
    col = torch.arange(n_local, device=logits.device)
    return logits.masked_fill(col >= n_real, torch.finfo(logits.dtype).min)


def gather_full(t: torch.Tensor, ctx: TPContext, dim: Optional[int]) -> torch.Tensor:
    """Concatenate a shard (a parameter or its gradient) along `dim` to the full tensor.
    dim None: the tensor is replicated and passes through."""
    if ctx.size == 1 or dim is None:
        return t.detach().clone()
    parts = [torch.empty_like(t) for _ in range(ctx.size)]
    dist.all_gather(parts, t.detach().contiguous(), group=ctx.group)
    return torch.cat(parts, dim=dim)
