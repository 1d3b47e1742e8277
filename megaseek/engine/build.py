"""Model + optimizer + schedule -> deepspeed.initialize. The glue to DeepSpeed, nothing else."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from megaseek.config.deepspeed import deepspeed_config
from megaseek.config.schema import Layout
from megaseek.distributed.groups import ParallelGroups


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (linear and embedding weights); no decay for norms and biases (1-D)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def lr_lambda(step: int, warmup: int, decay_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak lr: linear warmup over `warmup` steps, then cosine to `min_ratio` at
    `decay_steps`, constant after."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if decay_steps <= warmup:
        return 1.0
    t = min(1.0, (step - warmup) / (decay_steps - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that can skip one step on request (set `skip_next`): the gradients are dropped, nothing moves,
    and `overflow` tells DeepSpeed's engine the step was skipped (it then counts it and holds the lr
    schedule), as its ZeRO optimizers do for non-finite gradients."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.skip_next = False
        self.overflow = False

    def step(self, closure=None):
        if self.skip_next:
            self.skip_next, self.overflow = False, True
            self.zero_grad(set_to_none=True)
            return None
        self.overflow = False
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, opt_cfg: Mapping[str, Any], offload: bool, zero_stage: int = 0):
    """DeepSpeed's CPU Adam with optimizer offload; else torch AdamW (foreach). At ZeRO-0 DeepSpeed has no
    overflow check in fp32, so the AdamW is our GuardedAdamW (same arithmetic, can skip a step); at ZeRO >= 1
    DeepSpeed's ZeRO optimizer skips non-finite steps itself and gets the plain class it recognises."""
    groups = param_groups(model, float(opt_cfg["weight_decay"]))
    kw = dict(lr=float(opt_cfg["lr"]), betas=tuple(float(b) for b in opt_cfg["betas"]), eps=float(opt_cfg["eps"]))
    if offload:  # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    cls = GuardedAdamW if zero_stage == 0 else torch.optim.AdamW
    return cls(groups, foreach=True, **kw)


def build_scheduler(optimizer, opt_cfg: Mapping[str, Any], steps: int):
    warmup = int(opt_cfg["warmup_steps"])
    decay = int(opt_cfg["decay_steps"] or steps)
    min_ratio = float(opt_cfg["min_lr"]) / float(opt_cfg["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, decay, min_ratio))


def build_engine(model: torch.nn.Module, cfg: Mapping[str, Any], layout: Layout, groups: ParallelGroups):
    """Returns (engine, optimizer, scheduler, ds_config)."""
    import dataclasses

    import deepspeed

    from megaseek.config.sections import RunConfig
    run = RunConfig.from_config(cfg)
    ds_cfg = deepspeed_config(cfg, layout)
    opt_cfg = dataclasses.asdict(run.optimizer)
    opt = build_optimizer(model, opt_cfg, run.zero.offload_optimizer == "cpu", run.zero.stage)
    sched = build_scheduler(opt, opt_cfg, run.train.steps)
    engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg,
                                                 mpu=groups.mpu())
    return engine, opt, sched, ds_cfg
