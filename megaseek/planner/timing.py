"""Step time, tokens/s and MFU from the preset's peak FLOP/s and bandwidths.

    t_mb     = hardware FLOPs of one micro-batch on one GPU / (peak * compute_efficiency)
               (FLOPs from megaseek.model.flops: 6 N + 12 L s h per token, + the recomputed forward)
    pipeline = (m + pp - 1) (t_mb + tensor comm + p2p)          1F1B: bubble = (pp - 1) / (m + pp - 1)
    step     = pipeline + exposed data-parallel comm + optimizer (memory-bound: ~(18 + w) bytes per
               local parameter through HBM; offloaded: states over PCIe and the host's Adam)
    MFU      = model FLOPs per token * tokens/s / (world * peak)
Tensor-parallel and p2p communication are not overlapped (as in Megatron); data-parallel communication
is overlapped with the backward (2/3 of the compute) only with zero.overlap_comm.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megaseek.model.flops import flops_per_token
from megaseek.planner.comm import Comm
from megaseek.planner.hardware import GB, Hardware
from megaseek.planner.memory import stage_params
from megaseek.planner.setup import Setup

PCIE_BPS = 25 * GB          # host <-> GPU for offloaded states
HOST_ADAM_BPS = 10 * GB     # DeepSpeed CPU Adam streams its states at about this rate per GPU


@dataclass
class Timing:
    step_s: float
    compute_s: float
    bubble: float              # fraction of the pipeline time idle in fill/drain
    comm_exposed_s: float
    optimizer_s: float
    tokens_per_s: float
    mfu: float
    hfu: float
    peak_flops: float


def estimate_time(st: Setup, hw: Hardware, comm: Comm, peak_flops: Optional[float] = None) -> Optional[Timing]:
    """None when the peak FLOP/s is unknown (a CPU run without a measured peak)."""
    peak = peak_flops or hw.peak_flops(st.precision)
    if not peak:
        return None
    m = st.grad_accum
    f = flops_per_token(st.model, st.seq_len, st.checkpointing)
    tokens_mb = st.micro_batch * st.seq_len
    t_mb = f["hardware"] * tokens_mb / (st.tp * st.pp) / (peak * hw.compute_efficiency)
    slots = m + st.pp - 1
    pipeline = slots * (t_mb + (comm.tp_time + comm.pp_time + comm.ep_time) / m)
    bubble = (st.pp - 1) / slots
    backward = 2.0 / 3.0 * t_mb * m
    dp_exposed = max(0.0, comm.dp_time - backward) if st.overlap_comm else comm.dp_time
    n_local = max(s.params - s.experts + s.experts * st.ep for s in
                  stage_params(st.model, st.tp, st.pp, st.partition, st.ep)) / st.dp  # ZeRO partition
    if st.offload_optimizer:
        opt = 2 * st.bytes_per_value * n_local / PCIE_BPS + 16 * n_local / HOST_ADAM_BPS
    else:
        hbm = hw.hbm_bandwidth * GB
        opt = (18 + st.bytes_per_value) * n_local / hbm if hbm else 0.0
    step = pipeline + dp_exposed + opt
    tokens = st.global_batch * st.seq_len / step
    world_peak = st.world_size * peak
    return Timing(step_s=step, compute_s=slots * t_mb, bubble=bubble,
                  comm_exposed_s=slots * (comm.tp_time + comm.pp_time + comm.ep_time) / m + dp_exposed, optimizer_s=opt,
                  tokens_per_s=tokens, mfu=f["model"] * tokens / world_peak, hfu=f["hardware"] * tokens / world_peak,
                  peak_flops=peak)
