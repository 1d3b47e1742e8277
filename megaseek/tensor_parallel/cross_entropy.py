"""Cross-entropy on vocab-sharded logits that never gathers them, with ignored targets (label < 0).

A target < 0 (e.g. -100) is ignored at every tensor degree alike: its loss is 0 and its logits get no
gradient. (Without this, tp = 1 `F.cross_entropy` gives 0 for -100 while the sharded path, where -100 is
"outside" every rank's range, would give the full log-sum-exp.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaseek.tensor_parallel import mappings as M
from megaseek.tensor_parallel.layers import TPContext


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_t = log(sum_v exp(z_tv)) - z_t,y_t with z split by vocab across ranks; never gathers z.

    Forward: global max (all-reduce MAX), target logit (all-reduce SUM, only its owner contributes),
    sum of exp (all-reduce SUM). Backward: dz = softmax(z) - onehot(y), on the local slice only.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start):
        z = logits.float()  # (b, s, v/p)
        zmax = z.max(dim=-1).values  # (b, s)
        if group is not None:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            if M.CommCounter.active is not None:
                M.CommCounter.active.add("all_reduce", zmax)
        z = z - zmax.unsqueeze(-1)
        n_local = z.shape[-1]
        outside = (target < vocab_start) | (target >= vocab_start + n_local)
        local_t = (target - vocab_start).masked_fill(outside, 0)
        z_t = z.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)  # (b, s)
        exp = z.exp()
        sum_exp = exp.sum(dim=-1)  # (b, s)
        if group is not None:
            both = torch.stack([z_t, sum_exp])  # one all-reduce for the two (b, s) tensors
            if M.CommCounter.active is not None:
                M.CommCounter.active.add("all_reduce", both)
            dist.all_reduce(both, group=group)
            z_t, sum_exp = both[0], both[1]
        loss = sum_exp.log() - z_t  # (b, s)
        softmax = exp / sum_exp.unsqueeze(-1)
        ignored = target < 0  # the same on every rank: no loss, no gradient
        if ignored.any():
            loss = loss.masked_fill(ignored, 0.0)
            softmax.masked_fill_(ignored.unsqueeze(-1), 0.0)
            outside = outside | ignored
        ctx.save_for_backward(softmax, local_t, outside)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        softmax, local_t, outside = ctx.saved_tensors
        grad = softmax  # (b, s, v/p), reused in place
        onehot = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -onehot.unsqueeze(-1))
        grad.mul_(g.unsqueeze(-1))
        return grad.to(ctx.in_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, target: torch.Tensor, ctx: TPContext,
                                 vocab_start: int) -> torch.Tensor:
    """Per-token loss (b, s) from vocab-sharded logits (b, s, V_pad/p); 0 where target < 0."""
    if ctx.size == 1:
        b, s, v = logits_local.shape
        ignored = target < 0
        safe = target.clamp(min=0) if ignored.any() else target
        loss = F.cross_entropy(logits_local.float().view(b * s, v), safe.reshape(b * s), reduction="none").view(b, s)
        return loss.masked_fill(ignored, 0.0) if ignored.any() else loss
    return _VocabParallelCrossEntropy.apply(logits_local, target, ctx.group, vocab_start)
