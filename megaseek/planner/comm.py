"""Communication volume per step and per GPU, and its time on the preset's network.

Volumes are the logical sizes Megatron and the ZeRO paper use (S = the full tensor); bytes a GPU puts on
the wire in a ring are 2 (n-1)/n S for an all-reduce and (n-1)/n S for an all-gather or reduce-scatter.

Tensor parallel, per micro-batch: per layer 2 all-reduces of the (b, s, h) activations forward (attention
and MLP outputs) and 2 backward (the input gradients of the two column-parallel regions), +2 forward with
full recomputation (+1 selective); the embedding's forward and the head's backward add one each. With
sequence parallelism each all-reduce is an all-gather + reduce-scatter: the same volume.
kv heads fewer than t are replicated: their weight gradients are all-reduced every micro-batch.

Data parallel (Psi = w N):  ZeRO-0 all-reduce 2 Psi once per step;  ZeRO-1 reduce-scatter + all-gather
(2 Psi);  ZeRO-2 reduce-scatter every micro-batch (m Psi) + all-gather Psi;  ZeRO-3 all-gather forward and
backward and reduce-scatter every micro-batch (3 m Psi).  All times (n-1)/n.

Expert parallel (ep = e > 1, MoE layers): per micro-batch and MoE layer each rank sends its T k assignment
rows (T = b s tokens, the full sequence on every tensor rank; h values of w bytes each) through 4 all-to-alls:
dispatch and combine forward, their gradients backward (+2 with full recomputation, which re-runs the
forward; an MoE MTP block on the last stage counts 4, it is never recomputed). Logical volume 4 T k h w per
layer per micro-batch; on the wire (e-1)/e of it leaves the rank
(uniform routing; bench/moe.py measures the routed figure). The routed experts' gradients are reduced over the
expert-data-parallel group (D/e ranks), the other parameters' over D.

Pipeline: each stage boundary sends the (b, s|s/t, h) activation forward and its gradient backward per
micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass

from megaseek.planner.hardware import Hardware
from megaseek.planner.memory import stage_params
from megaseek.planner.setup import Setup


@dataclass
class Comm:
    tp_bytes: float        # logical bytes per step per GPU, tensor group
    dp_bytes: float
    pp_bytes: float
    tp_time: float         # seconds per step (ring, preset bandwidth); 0 when the group has one rank
    dp_time: float
    pp_time: float
    ep_bytes: float = 0.0  # expert-parallel all-to-all (dispatch + combine, forward and backward)
    ep_time: float = 0.0

    @property
    def total_bytes(self) -> float:
        return self.tp_bytes + self.dp_bytes + self.pp_bytes + self.ep_bytes


def tp_allreduces_per_layer(checkpointing: str) -> int:
    return 4 + {"none": 0, "selective": 1, "full": 2}[checkpointing]


def estimate_comm(st: Setup, hw: Hardware) -> Comm:
    m, a, t, D = st.model, st.bytes_per_value, st.tp, st.dp
    mb = st.grad_accum
    act = a * st.micro_batch * st.seq_len * m.hidden_size          # one (b, s, h) tensor
    stages = stage_params(m, t, st.pp, st.partition, st.ep)
    layers = max(s.layers for s in stages)
    big = max(stages, key=lambda s: s.params)
    N, Ne = big.params, big.experts
    De = max(1, D // st.ep)

    tp_ops = 0.0
    if t > 1:
        per_mb = layers * tp_allreduces_per_layer(st.checkpointing) * act + 2 * act
        if m.num_kv_heads < t:
            per_mb += layers * 2 * m.num_kv_heads * m.head_dim * m.hidden_size * a
        tp_ops = per_mb * mb
    tp_wire = 2 * (t - 1) / t * tp_ops if t > 1 else 0.0

    factor = {0: 2.0, 1: 2.0, 2: mb + 1.0, 3: 3.0 * mb}[st.zero_stage]
    dense_ops = factor * st.bytes_per_value * (N - Ne) if D > 1 else 0.0
    expert_ops = factor * st.bytes_per_value * Ne if De > 1 else 0.0
    dp_ops = dense_ops + expert_ops
    dp_wire = ((D - 1) / D * dense_ops if D > 1 else 0.0) + ((De - 1) / De * expert_ops if De > 1 else 0.0)

    per_layer = 4 + (2 if st.checkpointing == "full" else 0)  # MTP blocks: 4 (not recomputed)
    ops = max(per_layer * s.moe_layers + 4 * s.mtp_moe for s in stages)
    ep_ops = 0.0
    if st.ep > 1 and ops:
        rows = st.micro_batch * st.seq_len * m.num_experts_per_tok  # assignments this rank sends
        ep_ops = ops * rows * m.hidden_size * a * mb
    ep_wire = (st.ep - 1) / st.ep * ep_ops

    pp_ops = 2.0 * mb * act / (t if st.sp else 1) if st.pp > 1 else 0.0

    def secs(wire, size, stride):
        bw = hw.busbw(size, stride)
        return wire / bw if wire and bw else 0.0

    return Comm(tp_bytes=tp_ops, dp_bytes=dp_ops, pp_bytes=pp_ops,
                tp_time=secs(tp_wire, t, 1), dp_time=secs(dp_wire, D, t),
                pp_time=secs(pp_ops, 2, t * D), ep_bytes=ep_ops, ep_time=secs(ep_wire, st.ep, t))
