"""1F1B pipeline schedule (PipeDream-flush / Megatron's non-interleaved schedule) on the DeepSpeed engine.

The schedule knows no task: it calls `forward_step(i, x)` for micro-batch i (x: the activations received from
the previous stage, None on the first stage), which returns the stage output, or on the last stage the scalar
to back-propagate (the objective's loss, already scaled). One stage (pp = 1) is the trivial case of the same
schedule: no warm-up, forward and backward alternate, nothing is sent.

Stage s of p stages with m micro-batches runs w = min(p - s - 1, m) warm-up forwards, then alternates one
forward and one backward (steady state), then drains the remaining w backwards. At most p - s
micro-batches' activations are alive on stage s (GPipe keeps m).

Idle fraction per stage (the bubble) in theory: (p - 1) / (m + p - 1).

Backward through the DeepSpeed engine: the last stage calls engine.backward(loss) (DeepSpeed divides by
the accumulation steps); the other stages call engine.backward(sum(y * dy), scale_wrt_gas=False), a
scalar whose gradient w.r.t. the stage output y is exactly dy received from the next stage (already
divided once). engine.step() follows every backward, so DeepSpeed counts micro-steps as usual, except
the last: the boundary step runs after the schedule, once this stage has sent its last gradient, behind
the hook `before_last_step` (gradient norm, tied-weight and data-parallel reductions, which span stages).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from megaseek.pipeline.p2p import StageComm


@dataclass
class StageTimes:
    busy_s: float = 0.0      # forward + backward compute of this stage
    total_s: float = 0.0     # wall time of the forward/backward schedule (without the final optimizer step)
    forward_s: float = 0.0
    backward_s: float = 0.0
    step_s: float = 0.0      # gradient reductions + optimizer step after the schedule
    events: list = field(default_factory=list)  # (kind, micro, t_start, t_end) relative to schedule start


def run_1f1b(engine, comm: StageComm, num_micro: int, forward_step: Callable,
             before_last_step: Optional[Callable[[], None]] = None, record_events: bool = False) -> StageTimes:
    """One optimizer step of this stage over `num_micro` micro-batches. Returns its StageTimes."""
    first, last = comm.prev is None, comm.next is None
    p, s, m = comm.stages, comm.stage, num_micro
    warmup = min(p - s - 1, m)
    remaining = m - warmup
    inputs: list = [None] * m
    outputs: list = [None] * m
    times = StageTimes()
    t0 = time.perf_counter()

    def forward(i: int, x: Optional[torch.Tensor]) -> torch.Tensor:
        ta = time.perf_counter()
        if not first:
            x.requires_grad_(True)
        inputs[i] = x
        y = forward_step(i, x)  # last stage: the scaled loss; else (b, s|s/tp, h)
        outputs[i] = y
        tb = time.perf_counter()
        times.forward_s += tb - ta
        if record_events:
            times.events.append(("F", i, ta - t0, tb - t0))
        return y

    def backward(i: int, dy: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        ta = time.perf_counter()
        y = outputs[i]
        if last:
            engine.backward(y)
        else:
            engine.backward((y * dy).sum(), scale_wrt_gas=False)
        if i < m - 1:
            engine.step()  # DeepSpeed counts the micro-step; the boundary step waits until all sends are done
        dx = None if first else inputs[i].grad
        inputs[i] = outputs[i] = None
        tb = time.perf_counter()
        times.backward_s += tb - ta
        if record_events:
            times.events.append(("B", i, ta - t0, tb - t0))
        return dx

    for i in range(warmup):
        y = forward(i, comm.recv_forward())
        comm.send_forward(None if last else y)
    x = comm.recv_forward() if remaining > 0 else None
    for k in range(remaining):
        i = warmup + k
        y = forward(i, x)
        dy = comm.send_forward_recv_backward(y) if not last else None
        dx = backward(k, dy)
        if k == remaining - 1:
            x = None
            comm.send_backward(dx)
        else:
            x = comm.send_backward_recv_forward(dx)
    for k in range(remaining, m):
        dx = backward(k, comm.recv_backward())
        comm.send_backward(dx)
    # every activation gradient has left this stage: collectives across stages cannot deadlock now
    ta = time.perf_counter()
    times.total_s = ta - t0  # the schedule proper (what the bubble theory describes)
    if before_last_step is not None:
        before_last_step()
    engine.step()
    times.step_s = time.perf_counter() - ta
    times.busy_s = times.forward_s + times.backward_s
    return times


@torch.no_grad()
def forward_only(comm: StageComm, num_micro: int, forward_step: Callable) -> None:
    """Evaluation through the stages: forward_step(i, x) on every micro-batch (the last stage's results are
    kept by forward_step itself)."""
    last = comm.next is None
    for i in range(num_micro):
        y = forward_step(i, comm.recv_forward())
        if not last:
            comm.send_forward(y)
