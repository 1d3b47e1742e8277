"""Plans as text: the full breakdown of one plan, and a one-line-per-layout table."""
from __future__ import annotations

from megaseek.model.flops import param_counts
from megaseek.planner.plan import Plan


def gb(x: float) -> str:
    return f"{x / 1e9:7.2f} GB"


def _num(x: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def describe(plan: Plan, title: str = "plan") -> str:
    st, hw, mem, comm, t = plan.setup, plan.hardware, plan.memory, plan.comm, plan.timing
    m = st.model
    act = mem.detail["activation"]
    n_total = param_counts(m)["total"]
    cap = f"{mem.capacity / 1e9:.1f} GB {hw.gpu}" if mem.capacity else "no device limit (CPU ranks)"
    lines = [
        f"== {title}: model {m.name} ({_num(n_total)} parameters) on {hw.name} "
        f"({hw.nodes} x {max(1, hw.gpus_per_node)} {hw.gpu}, world {st.world_size})",
        f"   layout {st.describe()}  global batch {st.global_batch} x seq {st.seq_len}",
        f"   memory per GPU (pipeline stage {mem.stage}, {_num(mem.params_on_rank)} parameters on the rank; "
        f"peak in {mem.phase}):",
        f"     parameters   {gb(mem.parameters)}",
        f"     gradients    {gb(mem.gradients)}",
        f"     optimizer    {gb(mem.optimizer)}   (fp32 master + Adam m, v; ZeRO-{st.zero_stage} over dp={st.dp}"
        + (f", routed experts over dp/ep={st.dp // st.ep}" if st.ep > 1 else "") +
        f"{', offloaded' if st.offload_optimizer else ''})",
        f"     activations  {gb(mem.activations)}   ({act['layers']} layers x {act['in_flight']} micro-batch(es) x "
        f"{act['per_layer'] / 1e6:.1f} MB, ckpt={st.checkpointing}, sp={'on' if st.sp else 'off'}; "
        f"head/loss {act['head'] / 1e6:.1f} MB)",
        f"     buffers      {gb(mem.buffers)}   (comm buckets, optimizer-step workspace)",
        f"     runtime      {gb(mem.runtime)}",
        f"     = peak       {gb(mem.peak)}   of {cap}: " + ("fits" if mem.fits else "DOES NOT FIT")
        + (f" (headroom {mem.headroom / 1e9:.1f} GB)" if mem.capacity and mem.fits else ""),
    ]
    if mem.host:
        lines.append(f"     host (offloaded) {gb(mem.host)} per rank")
    per_node = mem.checkpoint_host * max(1, hw.gpus_per_node)
    warn = hw.host_memory_gb is not None and per_node > hw.host_memory_gb * 1e9
    lines.append(f"   checkpoint save: {mem.checkpoint_host / 1e9:.1f} GB of host memory per rank (full fp32 weights + "
                 f"Adam moments of the stage), {per_node / 1e9:.0f} GB per node"
                 + (f"  WARNING: more than the node's {hw.host_memory_gb:.0f} GB" if warn else ""))
    lines.append(f"   communication per step per GPU: tensor {_num(comm.tp_bytes)}B, data {_num(comm.dp_bytes)}B, "
                 f"pipeline {_num(comm.pp_bytes)}B" + (f", expert all-to-all {_num(comm.ep_bytes)}B (ep={st.ep})"
                                                       if st.ep > 1 else ""))
    if t is not None:
        lines.append(f"   pipeline bubble {t.bubble * 100:.1f}%   step {t.step_s:.3f} s (compute {t.compute_s:.3f}, "
                     f"exposed comm {t.comm_exposed_s:.3f}, optimizer {t.optimizer_s:.3f})")
        lines.append(f"   {_num(t.tokens_per_s)} tokens/s   MFU {t.mfu * 100:.1f}%   (peak {_num(t.peak_flops)}FLOP/s "
                     f"per {'GPU' if hw.is_gpu else 'rank'} x efficiency {hw.compute_efficiency})")
    else:
        lines.append(f"   pipeline bubble {(st.pp - 1) / (st.grad_accum + st.pp - 1) * 100:.1f}%   "
                     f"step time: no peak FLOP/s known for this machine")
    for p in plan.problems:
        lines.append(f"   REFUSED: {p}")
    return "\n".join(lines)


def table(plans: list[Plan]) -> str:
    rows = [f"{'#':>2}  {'layout':<60} {'peak GB':>8} {'tokens/s':>10} {'MFU':>6} {'bubble':>7}"]
    for i, p in enumerate(plans, 1):
        t = p.timing
        rows.append(f"{i:>2}  {p.setup.describe():<60} {p.memory.peak / 1e9:8.2f} "
                    f"{(_num(t.tokens_per_s) if t else '-'):>10} {(f'{t.mfu * 100:.1f}%' if t else '-'):>6} "
                    f"{(f'{t.bubble * 100:.1f}%' if t else '-'):>7}")
    return "\n".join(rows)
