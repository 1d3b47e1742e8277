"""Expert-parallel dispatch and combine with all-to-all (uneven and zero splits allowed).

An expert-parallel group of `ep` ranks (carved out of the data-parallel ranks, see
megaseek/distributed/topology.py) shares E routed experts, E/ep per rank. Each rank routes its own tokens:

    dispatch:  assignments sorted by expert (n_send, h); expert e lives on rank e // (E/ep), so the send split to
               rank r = sum of my counts for r's experts. Counts per expert are exchanged first (all-to-all of E
               integers), then the rows: received (n_recv, h) ordered [source rank][local expert].
    compute:   rows regrouped by local expert (a stable sort), each local expert runs on its rows.
    combine:   the inverse all-to-all (the splits swapped) brings every output back to the rank and position of
               its assignment.

Autograd: the backward of an all-to-all with splits (send, recv) is the all-to-all of the gradients with splits
(recv, send). At ep = 1 every step is the identity and no collective runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class EPContext:
    """What an MoE layer knows of expert parallelism: its group (None at ep = 1), size and rank."""
    group: Any = None
    size: int = 1
    rank: int = 0

    @classmethod
    def from_axis(cls, axis) -> "EPContext":
        if axis is None or axis.size == 1:
            return cls()
        return cls(group=axis.group, size=axis.size, rank=axis.rank)


class _AllToAll(torch.autograd.Function):
    """out = all_to_all_single(x) with input splits `send` and output splits `recv` (rows)."""

    @staticmethod
    def forward(ctx, x, send: list, recv: list, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out = g.new_empty((sum(ctx.send),) + tuple(g.shape[1:]))
        dist.all_to_all_single(out, g.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def all_to_all(x: torch.Tensor, send: list, recv: list, group) -> torch.Tensor:
    return _AllToAll.apply(x, send, recv, group)


def exchange_counts(counts: torch.Tensor, ep: EPContext) -> torch.Tensor:
    """counts (E,) rows I send to each expert -> (ep, E/ep): rows each source rank sends to my local experts."""
    n_local = counts.numel() // ep.size
    if ep.size == 1:
        return counts.view(1, n_local)
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=ep.group)  # equal splits of E/ep
    return recv.view(ep.size, n_local)


def run_experts(x_sorted: torch.Tensor, counts: torch.Tensor, experts, ep: EPContext) -> torch.Tensor:
    """x_sorted (n, h): this rank's assignments sorted by global expert, counts (E,) per expert ->
    (n, h) the experts' (tensor-partial) outputs in the same order."""
    n_local = experts.n_local
    recv_counts = exchange_counts(counts, ep)  # (ep, E/ep)
    if ep.size == 1:
        return experts(x_sorted, recv_counts[0].tolist())
    send = counts.view(ep.size, n_local).sum(1).tolist()
    recv = recv_counts.sum(1).tolist()
    x_recv = all_to_all(x_sorted, send, recv, ep.group)  # (n_recv, h): [source][local expert]
    local_id = torch.arange(n_local, device=x_sorted.device).repeat(ep.size)  # (ep E/ep,)
    row_expert = local_id.repeat_interleave(recv_counts.reshape(-1))  # (n_recv,)
    perm = torch.argsort(row_expert, stable=True)  # rows grouped by local expert
    y_grouped = experts(x_recv[perm], recv_counts.sum(0).tolist())  # (n_recv, h)
    y_recv = y_grouped[torch.argsort(perm)]  # back to [source][local expert]
    return all_to_all(y_recv, recv, send, ep.group)  # (n, h) in my sorted order
