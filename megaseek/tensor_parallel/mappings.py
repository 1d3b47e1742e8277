"""Tensor-parallel communication as autograd Functions. The process group is always an explicit argument.

Notation: p = tensor-parallel degree, X = activations, dX = their gradient.

| function                 | forward                          | backward                         |
|--------------------------|----------------------------------|----------------------------------|
| copy_to_region           | identity                         | all-reduce(dX)                   |
| reduce_from_region       | all-reduce(X)                    | identity                         |
| scatter_to_region        | keep my slice of the last dim    | all-gather(dX) on the last dim   |
| gather_from_region       | all-gather on the last dim       | keep my slice of dX              |
| scatter_to_sequence      | keep my slice of the sequence    | all-gather(dX) on the sequence   |
| gather_from_sequence     | all-gather on the sequence       | reduce-scatter(dX) on sequence   |
| reduce_scatter_to_sequence | reduce-scatter on the sequence | all-gather(dX) on the sequence   |

The sequence dimension is dim 1 of (batch, seq, hidden) tensors. With p == 1 (or group None) every
function is the identity, so the single-process model runs the same code.

A byte counter (`CommCounter`) records the payload of every collective issued here, so that benchmarks
can compare the bytes moved against the theoretical Megatron volume.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist


class CommCounter:
    """Counts collectives issued by this module: {op_name: [calls, bytes]}.

    Bytes are the logical size of each collective: the all-reduced tensor, the gathered (full) tensor,
    the tensor before reduce-scatter. This is the unit of Megatron's volume formulas."""

    active: "CommCounter | None" = None

    def __init__(self):
        self.ops: dict[str, list[int]] = {}

    def add(self, op: str, t: torch.Tensor, factor: int = 1):
        c = self.ops.setdefault(op, [0, 0])
        c[0] += 1
        c[1] += t.numel() * t.element_size() * factor

    @property
    def total_bytes(self) -> int:
        return sum(v[1] for v in self.ops.values())


@contextmanager
def count_comm():
    prev, CommCounter.active = CommCounter.active, CommCounter()
    try:
        yield CommCounter.active
    finally:
        CommCounter.active = prev


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    if _size(group) == 1:
        return x
    x = x.contiguous().clone()
    if CommCounter.active is not None:
        CommCounter.active.add("all_reduce", x)
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    p = _size(group)
    if p == 1:
        return x
    if x.shape[dim] % p != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not divide by tensor degree {p}")
    return x.chunk(p, dim=dim)[_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    p = _size(group)
    if p == 1:
        return x
    x = x.contiguous()
    if CommCounter.active is not None:
        CommCounter.active.add("all_gather", x, factor=p)  # the logical size: the gathered tensor
    parts = [torch.empty_like(x) for _ in range(p)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    p = _size(group)
    if p == 1:
        return x
    if x.shape[dim] % p != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} does not divide by tensor degree {p}")
    chunks = [c.contiguous() for c in x.chunk(p, dim=dim)]
    if CommCounter.active is not None:
        CommCounter.active.add("reduce_scatter", x)
    out = torch.empty_like(chunks[0])
    if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter: all-reduce, keep my chunk
        full = torch.cat(chunks, dim=dim)
        dist.all_reduce(full, group=group)
        return full.chunk(p, dim=dim)[_rank(group)].contiguous()
    dist.reduce_scatter(out, chunks, group=group)
    return out


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g, ctx.group), None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ScatterToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, -1, ctx.group), None


class _GatherFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, g):
        return _split(g, -1, ctx.group), None


class _ScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _reduce_scatter(g, 1, ctx.group), None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, 1, group)

    @staticmethod
    def backward(ctx, g):
        return _all_gather(g, 1, ctx.group), None


def copy_to_region(x, group):
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_region(x, group):
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


def scatter_to_region(x, group):
    return x if _size(group) == 1 else _ScatterToRegion.apply(x, group)


def gather_from_region(x, group):
    return x if _size(group) == 1 else _GatherFromRegion.apply(x, group)


def scatter_to_sequence(x, group):
    return x if _size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_from_sequence(x, group):
    return x if _size(group) == 1 else _GatherFromSequence.apply(x, group)


def reduce_scatter_to_sequence(x, group):
    return x if _size(group) == 1 else _ReduceScatterToSequence.apply(x, group)
