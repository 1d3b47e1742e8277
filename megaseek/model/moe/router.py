"""The DeepSeek router: top-k experts per token from sigmoid (V3) or softmax (V2) scores, group-limited.

Shapes: T tokens, h hidden, E routed experts, G groups of E/G experts, k experts per token.

    z = x W^T                       (T, E)   in fp32 whatever the training precision (W upcast)
    s = sigmoid(z) | softmax(z)     (T, E)   the affinities
    c = s + b                       (T, E)   b: e_score_correction_bias (aux-loss-free balancing); used for the
                                             CHOICE only, never in the gate weights
    groups (G > 1): score_g = sum of the top-2 c in group g (V3, `top2_sum`) | max c in g (V2, `max`);
                    the topk_group best groups stay, the other experts' c -> -inf
    idx = topk(c, k)                (T, k)
    w = s[idx]; w /= sum(w) (norm_topk_prob); w *= routed_scaling_factor      (T, k)

This is transformers' DeepseekV3TopkRouter (V2's DeepseekV2TopkRouter with softmax and `max`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.tensor_parallel.layers import master_normal
from megaseek.tensor_parallel.mappings import copy_to_region


@dataclass
class Routing:
    scores: torch.Tensor   # (T, E) fp32 affinities s (differentiable)
    idx: torch.Tensor      # (T, k) chosen experts (long)
    weights: torch.Tensor  # (T, k) fp32 gate weights (differentiable)


def group_mask(choice: torch.Tensor, n_group: int, topk_group: int, group_score: str) -> torch.Tensor:
    """(T, E) bool: experts of the topk_group best groups of each token."""
    t, e = choice.shape
    grouped = choice.view(t, n_group, e // n_group)  # (T, G, E/G)
    if group_score == "top2_sum":
        score = grouped.topk(2, dim=-1).values.sum(-1)  # (T, G)
    elif group_score == "max":
        score = grouped.max(dim=-1).values  # (T, G)
    else:
        raise ValueError(f"model.group_score={group_score!r}: choose top2_sum or max")
    best = score.topk(topk_group, dim=-1).indices  # (T, topk_group)
    keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)  # (T, G)
    return keep.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, top_k: int, scoring_func: str,
          n_group: int = 1, topk_group: int = 1, group_score: str = "top2_sum", norm_topk_prob: bool = True,
          routed_scaling_factor: float = 1.0) -> Routing:
    """x (T, h) any dtype; weight (E, h); bias (E,) fp32. Everything in fp32."""
    z = F.linear(x.float(), weight.float())  # (T, E)
    if scoring_func == "sigmoid":
        s = z.sigmoid()
    elif scoring_func == "softmax":
        s = z.softmax(dim=-1)
    else:
        raise ValueError(f"model.scoring_func={scoring_func!r}: choose sigmoid or softmax")
    choice = s.detach() + bias.float()  # (T, E): the bias steers the choice, not the weights
    if n_group > 1:
        choice = choice.masked_fill(~group_mask(choice, n_group, topk_group, group_score), float("-inf"))
    idx = choice.topk(top_k, dim=-1).indices  # (T, k)
    w = s.gather(1, idx)  # (T, k)
    if norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return Routing(scores=s, idx=idx, weights=w * routed_scaling_factor)


class Router(nn.Module):
    """`weight` (E, h) replicated on every rank; `e_score_correction_bias` (E,) a persistent fp32 buffer moved
    only by the aux-loss-free update (balance.py), never by the optimizer."""

    def __init__(self, cfg, seed: int):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(master_normal((cfg.n_routed_experts, cfg.hidden_size), cfg.init_std, seed))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Module casts (DeepSpeed's bf16 cast included) leave the bias in fp32."""
        super()._apply(fn, recurse)
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor, tp_group=None) -> Routing:
        """x (T, h), the same on every tensor rank. `tp_group` (tp > 1): W is used through copy_to_region
        (identity forward, all-reduce backward), see MoELayer: inside the tensor-parallel region each rank's
        gradient of W is a partial sum."""
        c = self.cfg
        weight = self.weight if tp_group is None else copy_to_region(self.weight, tp_group)
        return route(x, weight, self.e_score_correction_bias, top_k=c.num_experts_per_tok,
                     scoring_func=c.scoring_func, n_group=c.n_group, topk_group=c.topk_group,
                     group_score=c.group_score, norm_topk_prob=c.norm_topk_prob,
                     routed_scaling_factor=c.routed_scaling_factor)
