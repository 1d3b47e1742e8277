"""The check at the start of every run, after `validate()` and before any process group or model:

1. export the cluster preset's NCCL settings (cluster.nccl: NCCL_SOCKET_IFNAME, NCCL_IB_DISABLE, NCCL_ALGO,
   NCCL_DEBUG, ...) into this rank's environment, before NCCL reads them at communicator creation; a variable
   already set in the environment wins (the launcher or the user said so explicitly);
2. estimate memory per GPU for the layout and refuse (ConfigError with the numbers) one that does not fit
   the preset's GPU memory. Without a preset with `gpu_memory_gb` (local CPU runs) nothing is refused.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from megaseek.config.schema import ConfigError
from megaseek.planner.hardware import Hardware
from megaseek.planner.plan import Plan, make_plan
from megaseek.planner.report import describe
from megaseek.planner.setup import Setup


def nccl_env(cfg: Mapping) -> dict[str, str]:
    """The preset's NCCL_* settings as environment strings (true/false -> 1/0)."""
    out = {}
    for k, v in Hardware.from_config(cfg).nccl.items():
        out[str(k)] = ("1" if v else "0") if isinstance(v, bool) else str(v)
    return out


def export_nccl(cfg: Mapping, environ=None) -> dict[str, str]:
    """Set the preset's NCCL variables that the environment does not already set. Returns what is in effect."""
    environ = os.environ if environ is None else environ
    effective = {}
    for k, v in nccl_env(cfg).items():
        environ.setdefault(k, v)
        effective[k] = environ[k]
    return effective


def preflight(cfg: Any, world_size: int, log: Callable[..., None] = print) -> Optional[Plan]:
    hw = Hardware.from_config(cfg)
    env = export_nccl(cfg)
    rank0 = os.environ.get("RANK", "0") == "0"
    setup = Setup.from_config(cfg, world_size)
    plan = make_plan(setup, hw, world_size)
    if rank0:
        if env:
            log("[plan] NCCL: " + " ".join(f"{k}={v}" for k, v in sorted(env.items())))
        if "cluster" in cfg:
            log(describe(plan, title=f"plan for {hw.name}"))
        else:
            mem = plan.memory
            log(f"[plan] estimated peak memory per rank {mem.peak / 1e9:.2f} GB (parameters "
                f"{mem.parameters / 1e9:.2f}, gradients {mem.gradients / 1e9:.2f}, optimizer {mem.optimizer / 1e9:.2f}, "
                f"activations {mem.activations / 1e9:.2f}, buffers {mem.buffers / 1e9:.2f}; + the process runtime)")
    if hw.capacity_bytes is not None and not plan.memory.fits:
        mem = plan.memory
        raise ConfigError(
            f"layout {setup.describe()} of model {setup.model.name} needs an estimated {mem.peak / 1e9:.1f} GB per GPU "
            f"on pipeline stage {mem.stage} (parameters {mem.parameters / 1e9:.1f} + gradients {mem.gradients / 1e9:.1f} "
            f"+ optimizer {mem.optimizer / 1e9:.1f} + activations {mem.activations / 1e9:.1f} + buffers "
            f"{mem.buffers / 1e9:.1f} + runtime {mem.runtime / 1e9:.1f}), more than the {hw.gpu}'s "
            f"{mem.capacity / 1e9:.1f} GB (cluster.gpu_memory_gb). Raise zero.stage, parallel.tp / parallel.pp, "
            f"use train.activation_checkpointing, or a smaller train.micro_batch_size; "
            f"`python launch/plan.py +cluster={hw.name} ...` lists layouts that fit")
    return plan
