"""Cross-entropy on vocab-sharded logits that never gathers them, with ignored targets (label < 0).

A target < 0 (e.g. -100) is ignored at every tensor degree alike: its loss is 0 and its logits get no
gradient. (Without this, tp = 1 `F.cross_entropy` gives 0 for -100 while the sharded path, where -100 is
"outside" every rank's range, would give the full log-sum-exp.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megaseek.tensor_parallel import mappings as M
from megaseek.tensor_parallel.layers import TPContext
from megaseek.tensor_parallel.scratch import scratch


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """loss_t = log(sum_v exp(z_tv)) - z_t,y_t with z split by vocab across ranks; never gathers z.

    Forward: global max m_t (all-reduce MAX), target logit (all-reduce SUM, only its owner contributes),
    S_t = sum_v exp(z_tv - m_t) (all-reduce SUM); loss_t = log S_t - (z_t,y_t - m_t).
    Backward: dz_tv = g_t (exp(z_tv - m_t) / S_t - onehot(y_t)_v), on the local slice only.

    One (b, s, v/p) fp32 tensor is used (e = exp(z - m), saved, and turned into dz in place by backward, so
    backward runs once per forward), where log_softmax + nll_loss allocate four: on CPU each such tensor costs
    its page faults as well as its pass over memory (tiny model: 64 MiB each step), so it comes from
    `scratch` (kept across steps while free). Used at tp = 1 too (group None: no communication). The logits
    are not modified.
    """

    @staticmethod
    def forward(ctx, logits, target, group, vocab_start, keep):
        zmax = logits.amax(dim=-1).float()  # (b, s) (a max is exact in any float dtype)
        if group is not None:
            dist.all_reduce(zmax, op=dist.ReduceOp.MAX, group=group)
            if M.CommCounter.active is not None:
                M.CommCounter.active.add("all_reduce", zmax)
        n_local = logits.shape[-1]
        outside = (target < vocab_start) | (target >= vocab_start + n_local)
        local_t = (target - vocab_start).masked_fill(outside, 0)
        z_t = logits.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).float()  # (b, s) target logits
        z_t = (z_t - zmax).masked_fill(outside, 0.0)
        exp = scratch(logits.shape, torch.float32, logits.device, keep)  # (b, s, v/p), reused across steps (CPU)
        torch.sub(logits, zmax.unsqueeze(-1), out=exp).exp_()  # exp(z - m), in fp32 for any logits dtype
        sum_exp = exp.sum(dim=-1)  # (b, s)
        if group is not None:
            both = torch.stack([z_t, sum_exp])  # one all-reduce for the two (b, s) tensors
            if M.CommCounter.active is not None:
                M.CommCounter.active.add("all_reduce", both)
            dist.all_reduce(both, group=group)
            z_t, sum_exp = both[0], both[1]
        loss = sum_exp.log() - z_t  # (b, s)
        ignored = target < 0  # the same on every rank: no loss, no gradient
        if ignored.any():
            loss = loss.masked_fill(ignored, 0.0)
            outside = outside | ignored
        ctx.save_for_backward(exp, sum_exp, local_t, outside, ignored)
        ctx.in_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, g):
        exp, sum_exp, local_t, outside, ignored = ctx.saved_tensors
        w = (g / sum_exp).masked_fill(ignored, 0.0)  # (b, s)
        grad = exp.mul_(w.unsqueeze(-1))  # (b, s, v/p): g softmax, in place
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -g.masked_fill(outside, 0.0).unsqueeze(-1).to(grad.dtype))
        return grad.to(ctx.in_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, target: torch.Tensor, ctx: TPContext,
                                 vocab_start: int) -> torch.Tensor:
    """Per-token loss (b, s) from vocab-sharded logits (b, s, V_pad/p); 0 where target < 0."""
    keep = torch.is_grad_enabled() and logits_local.requires_grad  # a training step's loss: its buffer is kept
    return _VocabParallelCrossEntropy.apply(logits_local, target, ctx.group if ctx.size > 1 else None, vocab_start,
                                            keep)
