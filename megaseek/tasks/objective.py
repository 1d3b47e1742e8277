"""The objective seam.

A batch is a dict of (b, s) tensors: `input_ids`, `labels`, `loss_mask` (bool), `position_ids`, optional
`document_ids` (packed documents / padding = -1); a pipeline stage's dict holds only what that stage reads.

An objective turns the model output of a micro-batch and its batch into `LossParts`: the SUM of its loss over
the micro-batch's valid units (tokens for language modelling), the number of those units, and metric sums.
The step divides every micro-batch's sum by the GLOBAL count of valid units of the whole global batch (every
micro-batch of every data-parallel rank), so

    loss = sum_{ranks r, micro m} loss_sum_{r,m} / sum_{r,m} count_{r,m}

exactly, whatever the masks, the accumulation, the data-parallel degree or the tensor degree.

`count(batch)` must be computable from the batch alone (before the forward): the step all-reduces it over
the data-parallel group first, so the denominator is known when each micro-batch is back-propagated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import torch


@dataclass
class LossParts:
    loss_sum: torch.Tensor                 # scalar, differentiable: sum over this micro-batch's valid units
    count: torch.Tensor                    # scalar: this micro-batch's valid units (= Objective.count)
    metrics: dict = field(default_factory=dict)  # name -> scalar sums (reported divided by the global count)


class Objective(Protocol):
    name: str

    def count(self, batch: dict) -> torch.Tensor:
        """Valid units of a micro-batch (a scalar), from the batch alone."""

    def __call__(self, model, output: torch.Tensor, batch: dict) -> LossParts:
        """Loss parts of one micro-batch from the last stage's output (vocab-sharded logits (b, s, V_pad/p))."""


def valid_tokens(batch: dict) -> torch.Tensor:
    """(b, s) bool: a label to learn (label >= 0) that the loss mask keeps."""
    labels = batch["labels"]
    valid = labels >= 0
    mask = batch.get("loss_mask")
    return valid & mask.bool() if mask is not None else valid


def add_model_losses(model, parts: LossParts, batch: Optional[dict] = None) -> LossParts:
    """Add the model's own loss terms of this micro-batch to the objective's: every MoE layer's balance-loss
    sum (model.balance seq_aux | aux, token-weighted, megaseek/model/moe/balance.py), reported as the metric
    `moe_aux_loss` (divided by the global count like every metric, i.e. the alpha-weighted mean balance loss
    summed over layers); and, given the micro-batch, the multi-token prediction loss of a model with
    model.mtp_depth > 0 (megaseek/model/mtp.py), reported as `mtp_loss`. Otherwise `parts` pass unchanged."""
    from megaseek.model.moe.balance import moe_layers
    from megaseek.model.mtp import take_mtp_loss
    metrics, loss_sum = dict(parts.metrics), parts.loss_sum
    mtp = take_mtp_loss(model, batch) if batch is not None else None  # first: an MoE MTP block has a balance loss
    if mtp is not None:  # lambda / D * sum of the depth losses (megaseek/model/mtp.py)
        loss_sum = loss_sum + mtp[0]
        metrics["mtp_loss"] = mtp[1]
    terms = [t for t in (m.take_aux_loss() for m in moe_layers(model)) if t is not None]
    if terms:
        aux = torch.stack(terms).sum()
        metrics["moe_aux_loss"] = aux.detach()
        loss_sum = loss_sum + aux
    if loss_sum is parts.loss_sum:
        return parts
    return LossParts(loss_sum=loss_sum, count=parts.count, metrics=metrics)

