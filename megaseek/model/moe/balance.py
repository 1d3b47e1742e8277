"""Expert load balancing: the auxiliary-loss-free bias, the sequence-wise and the classic balance losses, and
the per-layer load statistics.

Aux-loss-free (DeepSeek-V3 sec. 2.1.2): after each global batch, with load_i the number of assignments to
expert i summed over every data-parallel rank (every rank that saw tokens of the batch),

    b_i += rate * sign(mean_j load_j - load_i)

(overloaded experts become less attractive to the router's CHOICE; the gate weights never see b).

Sequence-wise balance loss (DeepSeek-V3 eq. 17-20), per sequence of T tokens, E experts, top-k:

    s'_{i,t} = s_{i,t} / sum_j s_{j,t}            P_i = (1/T) sum_t s'_{i,t}
    f_i = E / (k T) * sum_t 1[i in topk_t]         L_seq = alpha * sum_i f_i P_i

The classic (batch) auxiliary loss is the same formula over all T tokens of the micro-batch (Switch / GShard /
DeepSeek-V2's expert-level loss). Both enter the objective as a SUM weighted by token counts (L_seq * T per
sequence, L_batch * T per micro-batch), so that after the step's division by the global token count the loss
is alpha-weighted mean of per-sequence losses: unchanged by micro-batching, data-parallel or expert layout for
the sequence-wise loss.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _f_and_p(scores: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scores (..., T, E), idx (..., T, k) -> f (..., E) (no gradient), P (..., E)."""
    e, k, t = scores.shape[-1], idx.shape[-1], scores.shape[-2]
    p = (scores / scores.sum(-1, keepdim=True)).mean(-2)  # (..., E)
    hits = torch.zeros(scores.shape[:-2] + (e,), dtype=scores.dtype, device=scores.device)
    hits.scatter_add_(-1, idx.flatten(-2), torch.ones_like(idx.flatten(-2), dtype=scores.dtype))
    return hits * (e / (k * t)), p


def seq_aux_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """scores (b, s, E), idx (b, s, k) -> (b,) the sequence-wise balance loss of each sequence."""
    f, p = _f_and_p(scores, idx)
    return alpha * (f * p).sum(-1)


def batch_aux_loss(scores: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """scores (T, E), idx (T, k) -> scalar: the classic auxiliary loss over all tokens."""
    f, p = _f_and_p(scores, idx)
    return alpha * (f * p).sum()


class ExpertStats:
    """Per-layer sums since the last global-batch end: loads (E,), dropped and total assignments, the balance
    loss (sum of per-sequence / per-micro-batch values) and how many values it holds."""

    def __init__(self, n_experts: int):
        self.n = n_experts
        self.reset()

    def reset(self) -> None:
        self.load = torch.zeros(self.n, dtype=torch.float64)
        self.dropped, self.assigned, self.aux, self.aux_n = 0.0, 0.0, 0.0, 0.0

    def add(self, counts: torch.Tensor, dropped: int, aux_values=None) -> None:
        self.load += counts.detach().double().cpu()
        self.assigned += float(counts.sum())
        self.dropped += float(dropped)
        if aux_values is not None:
            self.aux += float(aux_values.detach().sum())
            self.aux_n += float(aux_values.numel())

    def vector(self) -> torch.Tensor:
        return torch.cat([self.load, torch.tensor([self.dropped, self.assigned, self.aux, self.aux_n],
                                                  dtype=torch.float64)])


def moe_layers(model) -> list:
    return [m for m in model.modules() if hasattr(m, "expert_stats")]


@torch.no_grad()
def end_of_global_batch(model, group=None) -> dict:
    """Sum every MoE layer's statistics over `group` (the data-parallel group of this stage), move the
    aux-loss-free biases (balance=aux_free) and return per-layer metrics; the statistics restart.

    Metrics per layer L: moe/L{L}/max_load (max_i load_i / mean load), moe/L{L}/dropped (fraction of
    assignments dropped by the capacity), moe/L{L}/aux_loss (mean balance loss), and moe/max_load over layers."""
    layers = moe_layers(model)
    if not layers:
        return {}
    stacked = torch.stack([m.expert_stats.vector() for m in layers])  # (layers, E + 4)
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(stacked, group=group)
    out = {}
    for m, row in zip(layers, stacked):
        n = m.expert_stats.n
        load, (dropped, assigned, aux, aux_n) = row[:n], row[n:].tolist()
        mean = float(load.mean())
        if assigned == 0:  # the layer saw no token this global batch (an MTP block on a step without MTP)
            m.expert_stats.reset()
            continue
        if m.cfg.balance == "aux_free" and m.cfg.bias_update_rate > 0 and mean > 0:
            bias = m.gate.e_score_correction_bias
            bias += (m.cfg.bias_update_rate * torch.sign(mean - load)).to(bias)
        key = f"moe/L{m.layer}"
        out[f"{key}/max_load"] = float(load.max()) / mean if mean > 0 else 0.0
        out[f"{key}/dropped"] = dropped / assigned if assigned > 0 else 0.0
        if aux_n > 0:
            out[f"{key}/aux_loss"] = aux / aux_n
        m.last_load = load.clone()
        m.expert_stats.reset()
    loads = [v for k, v in out.items() if k.endswith("/max_load")]
    if loads:
        out["moe/max_load"] = max(loads)
    return out
