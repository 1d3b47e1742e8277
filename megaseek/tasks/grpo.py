"""GRPO / RLOO pieces: group advantages and the clipped policy-gradient objective on sampled responses.

Rewards of G responses sampled for one prompt form a group (a row of `rewards`, (n, G)):

    group_norm (GRPO):   A_i = (r_i - mean(r)) / (std(r) + eps)          std over the group (population)
    loo (RLOO):          A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean(r))

A group whose rewards are all equal gives A = 0 exactly (r_i - mean = 0 in both, and 0 / (0 + eps) = 0):
no signal, and no NaN.

The objective (per response token t of sample i, ratio rho = exp(log pi - log pi_old)):

    loss_t = -min(rho A_i, clip(rho, 1 - c, 1 + c) A_i) + kl_coef * k3_t,
    k3_t = exp(log ref - log pi) - (log ref - log pi) - 1       (>= 0, the unbiased low-variance KL estimate)

summed over response tokens; count = response tokens, so the step divides by the global token count. Batches
hold the sampled rows (`input_ids`, `labels`, `loss_mask` on the response, `position_ids`, `document_ids`) and,
per token, `old_logps`, `ref_logps` and `advantages` (b, s). This module has no rollout loop yet (launch/grpo.py).
"""
from __future__ import annotations

import torch

from megaseek.tasks.objective import LossParts, valid_tokens

MODES = ("group_norm", "loo")


def group_advantages(rewards: torch.Tensor, mode: str = "group_norm", eps: float = 1e-6) -> torch.Tensor:
    """(n, G) advantages of (n, G) rewards (see the module docstring), in float64 then cast back."""
    if mode not in MODES:
        raise ValueError(f"advantage mode {mode!r}: choose one of {list(MODES)}")
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, G >= 2), got {tuple(rewards.shape)}: a group needs 2 samples")
    r = rewards.double()
    centred = r - r.mean(dim=1, keepdim=True)  # (n, G)
    if mode == "loo":
        g = r.shape[1]
        out = centred * (g / (g - 1))
    else:
        out = centred / (r.std(dim=1, unbiased=False, keepdim=True) + eps)
    return out.to(rewards.dtype)


class GRPOObjective:
    name = "grpo"

    def __init__(self, clip: float = 0.2, kl_coef: float = 0.0):
        if not 0.0 < clip < 1.0:
            raise ValueError(f"clip={clip} must be in (0, 1)")
        if kl_coef < 0:
            raise ValueError(f"kl_coef={kl_coef} must be >= 0")
        self.clip, self.kl_coef = float(clip), float(kl_coef)

    def count(self, batch: dict) -> torch.Tensor:
        return valid_tokens(batch).sum()

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        valid = valid_tokens(batch).to(logits.device)  # (b, s)
        labels = batch["labels"].to(logits.device).masked_fill(~valid, 0)
        logp = -model.token_losses(logits, labels)  # (b, s) fp32
        old = batch["old_logps"].to(logp)  # (b, s)
        adv = batch["advantages"].to(logp)  # (b, s): the sample's advantage on each of its tokens
        ratio = torch.exp((logp - old).masked_fill(~valid, 0.0))  # (b, s)
        surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - self.clip, 1.0 + self.clip) * adv)  # (b, s)
        loss = -surr
        metrics = {"clip_fraction": (((ratio - 1.0).abs() > self.clip) & valid).float().sum().detach()}
        if self.kl_coef > 0:
            d = (batch["ref_logps"].to(logp) - logp).masked_fill(~valid, 0.0)  # log ref - log pi
            k3 = torch.exp(d) - d - 1.0  # (b, s) >= 0
            loss = loss + self.kl_coef * k3
            metrics["kl"] = (k3 * valid).sum().detach()
        return LossParts(loss_sum=(loss * valid).sum(), count=valid.sum(), metrics=metrics)
