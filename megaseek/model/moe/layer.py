"""The DeepSeekMoE layer (`model.mlp: moe`): shared experts + fine-grained routed experts.

    y = sum_{j in shared} FFN_j(x) + sum_{i in topk(x)} w_i(x) FFN_i(x)        x, y: (b, s|s/p, h)

Per micro-batch of T = b s tokens (the full sequence on every tensor rank, `ctx.enter`):

    1. route (router.py, fp32): idx, w (T, k)
    2. the T k assignments sorted by expert (stable: within an expert, token order); with a capacity factor
       cf each expert keeps its first C = ceil(cf T k / E) assignments of this micro-batch, the rest are
       DROPPED (the token keeps its shared experts and its other assignments; drops are counted)
    3. experts run on their rows: locally at ep = 1, through all-to-all at ep > 1 (dispatch.py)
    4. y_t = sum over kept assignments of w * out (index_add), plus the shared experts; the tensor-parallel
       partial sums of routed and shared experts are reduced once (`ctx.exit`).

Tensor parallelism (tp = p): steps 1-4 run inside the tensor-parallel region (`ctx.enter` .. `ctx.exit`), where
every rank's gradient is a PARTIAL sum whose sum over the p ranks is the true gradient: the experts are
tensor-sharded (experts.py) and the router runs on every rank on the same tokens. With dL/dy replicated,

    dL/dw_t = sum_t' <dL/dy_t, partial_t'(out)>         (rank t' sees only its own partial term)
    dL/dW   = sum_t' J_W^T dL/dw_t  -> W (replicated) is used through copy_to_region: all-reduce of dW over tp
    dL/dx   = partial per rank      -> summed by ctx.enter's backward (all-reduce | reduce-scatter)

The balance losses are computed alike on every rank from the replicated scores, so their gradient is whole on
each rank; inside the region it enters scaled by 1/p (the value unchanged) to stay a partial sum.

Training-mode forwards record loads, drops and the balance loss for balance.py (not during the recomputation
of activation checkpointing, not in eval). With balance=seq_aux|aux the differentiable balance-loss sum is kept
for the objective seam (`take_aux_loss`, megaseek/tasks/objective.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from megaseek.model.moe.balance import ExpertStats, batch_aux_loss, seq_aux_loss
from megaseek.model.moe.dispatch import EPContext, run_experts
from megaseek.model.moe.experts import Expert, LocalExperts
from megaseek.model.moe.router import Router
from megaseek.tensor_parallel.layers import TPContext


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1  # activation recomputation runs inside backward


class MoELayer(nn.Module):
    is_moe = True

    @staticmethod
    def num_params(cfg) -> int:
        """All matmul weights of one MoE layer: router, every routed expert, the shared experts."""
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        return cfg.n_routed_experts * h + 3 * h * i * (cfg.n_routed_experts + cfg.n_shared_experts)

    @staticmethod
    def active_params(cfg) -> int:
        """Matmul weights one token uses: router, k routed experts, the shared experts."""
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        return cfg.n_routed_experts * h + 3 * h * i * (cfg.num_experts_per_tok + cfg.n_shared_experts)

    def __init__(self, cfg, ctx: TPContext, seed: int, out_std: float, *, layer: int = 0,
                 ep: Optional[EPContext] = None):
        super().__init__()
        self.cfg, self.ctx, self.layer = cfg, ctx, layer
        self.ep = ep or EPContext()
        self.gate = Router(cfg, seed + 8)
        self.experts = LocalExperts(cfg, ctx, seed, out_std, self.ep.size, self.ep.rank)
        self.shared_experts = None
        if cfg.n_shared_experts > 0:
            self.shared_experts = Expert(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, ctx,
                                         std=cfg.init_std, out_std=out_std, seed=seed + 5)
        self.expert_stats = ExpertStats(cfg.n_routed_experts)
        self.aux_loss_sum: Optional[torch.Tensor] = None
        self.last_routing = None  # (T, k) chosen experts of the last forward (tests, tools)

    def capacity(self, n_tokens: int) -> Optional[int]:
        cf = self.cfg.capacity_factor
        if cf is None:
            return None
        return int(math.ceil(cf * n_tokens * self.cfg.num_experts_per_tok / self.cfg.n_routed_experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = self.ctx.enter(x)  # (b, s, h) on every tensor rank
        b, s, h = xp.shape
        flat = xp.reshape(b * s, h)  # (T, h)
        r = self.gate(flat, self.ctx.group if self.ctx.size > 1 else None)  # idx, weights (T, k)
        t, k = r.idx.shape
        e = self.cfg.n_routed_experts
        self.last_routing = r.idx.detach()

        flat_e = r.idx.reshape(-1)  # (T k,) expert of each assignment, token-major
        order = torch.argsort(flat_e, stable=True)  # assignments grouped by expert, token order inside
        counts = torch.bincount(flat_e, minlength=e)  # (E,)
        kept_counts, keep = counts, None
        cap = self.capacity(t)
        if cap is not None:  # position of each sorted assignment inside its expert; keep the first `cap`
            start = torch.cumsum(counts, 0) - counts  # (E,)
            pos = torch.arange(t * k, device=flat.device) - start.repeat_interleave(counts)
            keep = pos < cap
            order = order[keep]
            kept_counts = counts.clamp(max=cap)
        tok = order // k  # (n,) token of each kept assignment
        w = r.weights.reshape(-1)[order]  # (n,) fp32
        y_sorted = run_experts(flat[tok], kept_counts, self.experts, self.ep)  # (n, h) partial over tp
        y = torch.zeros_like(flat).index_add(0, tok, (y_sorted.float() * w.unsqueeze(-1)).to(flat.dtype))
        if self.shared_experts is not None:
            y = y + self.shared_experts.partial(flat)  # (T, h) partial
        out = self.ctx.exit(y.view(b, s, h))  # (b, s|s/p, h)

        if self.training and not _in_backward():
            self._record(r, counts, int(counts.sum() - kept_counts.sum()), b, s)
        return out

    def _record(self, r, counts: torch.Tensor, dropped: int, b: int, s: int) -> None:
        cfg = self.cfg
        aux_values = None
        if cfg.balance == "seq_aux":
            per_seq = seq_aux_loss(r.scores.view(b, s, -1), r.idx.view(b, s, -1), cfg.aux_loss_coef)  # (b,)
            self.aux_loss_sum = self._partial((per_seq * s).sum())  # token-weighted sum (see balance.py)
            aux_values = per_seq
        elif cfg.balance == "aux":
            loss = batch_aux_loss(r.scores, r.idx, cfg.aux_loss_coef)
            self.aux_loss_sum = self._partial(loss * (b * s))
            aux_values = loss.reshape(1)
        self.expert_stats.add(counts, dropped, aux_values)

    def _partial(self, loss: torch.Tensor) -> torch.Tensor:
        """The same value, its gradient scaled by 1/tp: a partial sum inside the tensor-parallel region."""
        p = self.ctx.size
        return loss if p == 1 else loss / p + loss.detach() * (1.0 - 1.0 / p)

    def take_aux_loss(self) -> Optional[torch.Tensor]:
        out, self.aux_loss_sum = self.aux_loss_sum, None
        return out
