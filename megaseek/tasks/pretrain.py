"""Pretraining: masked next-token cross-entropy.

    loss_sum = sum_t mask_t * CE(z_t, y_t),   count = sum_t mask_t,   mask_t = loss_mask_t and y_t >= 0

Labels at masked positions are replaced by 0 before the cross-entropy, so whatever they hold (-100, any id)
the loss and every gradient are bitwise unchanged; the vocab-parallel cross-entropy ignores them identically
at every tensor degree.
"""
from __future__ import annotations

import torch

from megaseek.tasks.objective import LossParts, valid_tokens


class NextTokenObjective:
    name = "pretrain"

    def count(self, batch: dict) -> torch.Tensor:
        return valid_tokens(batch).sum()

    def __call__(self, model, logits: torch.Tensor, batch: dict) -> LossParts:
        valid = valid_tokens(batch).to(logits.device)  # (b, s)
        labels = batch["labels"].to(logits.device).masked_fill(~valid, 0)
        ce = model.token_losses(logits, labels)  # (b, s) fp32
        loss_sum = (ce * valid).sum()
        return LossParts(loss_sum=loss_sum, count=valid.sum())
