"""One plan = a Setup on a Hardware: memory, communication, time; the checks that refuse a layout; and
the search over layouts for the best one that fits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from megaseek.planner.comm import Comm, estimate_comm
from megaseek.planner.hardware import Hardware
from megaseek.planner.memory import Memory, estimate_memory
from megaseek.planner.setup import Setup
from megaseek.planner.timing import Timing, estimate_time


@dataclass
class Plan:
    setup: Setup
    hardware: Hardware
    memory: Memory
    comm: Comm
    timing: Optional[Timing]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def layout_problems(st: Setup, world_size: int) -> list[str]:
    """Why a layout cannot run at this world size (the arithmetic validate() checks), empty if it can."""
    m, out = st.model, []
    if world_size % (st.tp * st.pp):
        out.append(f"world size {world_size} is not divisible by tp * pp = {st.tp} * {st.pp} = {st.tp * st.pp}")
    elif st.global_batch % (st.micro_batch * st.dp):
        out.append(f"global batch {st.global_batch} is not a multiple of micro batch {st.micro_batch} x dp {st.dp}")
    try:
        m.validate(st.tp)
    except ValueError as e:
        out.append(str(e))
    if st.pp > m.num_layers:
        out.append(f"pp={st.pp} stages for {m.num_layers} layers")
    if st.pp > 1 and st.zero_stage >= 2:
        out.append(f"pp={st.pp} needs zero.stage <= 1 (DeepSpeed's pipeline engine)")
    if st.sp and st.seq_len % st.tp:
        out.append(f"sequence parallelism needs seq_len {st.seq_len} divisible by tp {st.tp}")
    if st.offload_param and st.zero_stage != 3:
        out.append("offload_param needs zero.stage=3")
    if st.offload_optimizer and st.zero_stage == 0:
        out.append("offload_optimizer needs zero.stage >= 1")
    if st.ep > 1:
        if m.mlp != "moe":
            out.append(f"parallel.ep={st.ep} needs an MoE model (model.mlp=moe)")
        elif m.n_routed_experts % st.ep:
            out.append(f"parallel.ep={st.ep} does not divide model.n_routed_experts={m.n_routed_experts}")
        if st.dp % st.ep:
            out.append(f"parallel.ep={st.ep} does not divide the data-parallel size {st.dp}")
        if st.zero_stage not in (1, 2) or st.offload_optimizer or st.offload_param:
            out.append(f"parallel.ep={st.ep} runs with zero.stage 1 or 2 without offload (DeepSpeed's MoE)")
    if m.mlp == "moe" and st.pp > 1 and m.balance in ("seq_aux", "aux"):
        out.append(f"model.balance={m.balance} with pp={st.pp}: use aux_free (or none) with pipelines")
    if m.mtp_depth and st.sp:
        out.append(f"model.mtp_depth={m.mtp_depth} with sequence parallelism: the MTP modules need whole sequences")
    return out


def make_plan(st: Setup, hw: Hardware, world_size: Optional[int] = None, runtime_bytes: Optional[float] = None,
              peak_flops: Optional[float] = None) -> Plan:
    world = world_size or st.world_size
    problems = layout_problems(st, world)
    mem = estimate_memory(st, hw, runtime_bytes)
    if not mem.fits:
        problems.append(f"estimated peak memory {mem.peak / 1e9:.1f} GB per GPU exceeds the {hw.gpu} capacity "
                        f"{mem.capacity / 1e9:.1f} GB (parameters {mem.parameters / 1e9:.1f}, gradients "
                        f"{mem.gradients / 1e9:.1f}, optimizer {mem.optimizer / 1e9:.1f}, activations "
                        f"{mem.activations / 1e9:.1f}, buffers {mem.buffers / 1e9:.1f}, runtime {mem.runtime / 1e9:.1f})")
    comm = estimate_comm(st, hw)
    return Plan(st, hw, mem, comm, estimate_time(st, hw, comm, peak_flops), problems)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_degrees(base: Setup, dp: int) -> list[int]:
    """ep choices for an MoE model: every divisor of dp that divides n_routed_experts (1 for dense models)."""
    m = base.model
    if m.mlp != "moe":
        return [1]
    return [e for e in _divisors(dp) if m.n_routed_experts % e == 0]


def candidates(base: Setup, world_size: int, gpus_per_node: int, max_tp: Optional[int] = None) -> Iterable[Setup]:
    """Layouts worth considering at this world size: tp within a node, every pp dividing the rest, ZeRO
    0-3 (0-1 with pipelines), power-of-two micro-batches, the three checkpointing modes, SP when tp > 1, and
    for MoE models every expert degree ep dividing dp and the expert count (ZeRO 1-2 only when ep > 1).
    Model, global batch, sequence length and precision stay as configured."""
    tps = [t for t in _divisors(world_size) if t <= (max_tp or max(1, gpus_per_node))]
    for tp in tps:
        for pp in _divisors(world_size // tp):
            if pp > base.model.num_layers:
                continue
            dp = world_size // (tp * pp)
            if base.global_batch % dp:
                continue
            per_dp = base.global_batch // dp
            mbs = [b for b in (1, 2, 4, 8, 16, 32) if per_dp % b == 0]
            for ep in expert_degrees(base, dp):
                for zero in ((0, 1) if pp > 1 else (0, 1, 2, 3)):
                    if ep > 1 and zero not in (1, 2):
                        continue
                    for mb in mbs:
                        for ckpt in ("none", "selective", "full"):
                            for sp in ((False, True) if tp > 1 else (False,)):
                                yield base.with_(tp=tp, pp=pp, dp=dp, ep=ep, zero_stage=zero, micro_batch=mb,
                                                 checkpointing=ckpt, sequence_parallel=sp,
                                                 offload_optimizer=False, offload_param=False)


def search(base: Setup, hw: Hardware, world_size: int, top: int = 5, peak_flops: Optional[float] = None,
           runtime_bytes: Optional[float] = None) -> list[Plan]:
    """The fastest layouts that fit, best first (by estimated tokens/s; by memory when no peak is known)."""
    good = []
    for st in candidates(base, world_size, hw.gpus_per_node):
        if layout_problems(st, world_size):
            continue
        p = make_plan(st, hw, world_size, runtime_bytes, peak_flops)
        if p.ok:
            good.append(p)
    if any(p.timing for p in good):
        good.sort(key=lambda p: (-p.timing.tokens_per_s, p.memory.peak))
    else:
        good.sort(key=lambda p: p.memory.peak)
    return good[:top]
