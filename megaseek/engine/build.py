"""Model + optimizer + schedule -> deepspeed.initialize. The glue to DeepSpeed, nothing else."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from megaseek.config.deepspeed import deepspeed_config
from megaseek.config.schema import Layout
from megaseek.distributed.groups import ParallelGroups


def is_expert_param(p: torch.Tensor) -> bool:
    """DeepSpeed's rule (deepspeed.moe.utils.is_moe_param): tagged `allreduce=False` (experts at ep > 1)."""
    return hasattr(p, "allreduce") and not p.allreduce


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices (linear and embedding weights); no decay for norms and biases (1-D).
    Expert parameters (ep > 1) go into their own groups marked `'moe': True` and named by their expert group,
    which DeepSpeed's ZeRO optimizer partitions and reduces over the expert-data-parallel group only."""
    decay, no_decay, experts = [], [], {}
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if is_expert_param(p):
            experts.setdefault((p.group_name, p.ndim >= 2), []).append(p)
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    for (name, dec), params in sorted(experts.items()):
        groups.append({"params": params, "weight_decay": weight_decay if dec else 0.0, "moe": True, "name": name})
    return groups


def register_expert_groups(groups: ParallelGroups, name: str) -> None:
    """Hand our expert-parallel and expert-data-parallel groups to DeepSpeed under the expert group name its
    engine and ZeRO optimizer look up (deepspeed.utils.groups holds them in module dicts: DeepSpeed's own
    global state, written here and nowhere else)."""
    from deepspeed.utils import groups as dsg
    dsg._EXPERT_PARALLEL_GROUP[name] = groups.ep.group
    dsg._EXPERT_PARALLEL_GROUP_RANKS[name] = list(groups.ep.ranks)
    dsg._EXPERT_DATA_PARALLEL_GROUP[name] = groups.edp.group
    dsg._EXPERT_DATA_PARALLEL_GROUP_RANKS[name] = list(groups.edp.ranks)


def _moe_marker(num_experts: int) -> torch.nn.Module:
    """DeepSpeed turns on its expert handling (`has_moe_layers`: expert-data-parallel broadcast, reduction and
    ZeRO partitions) only when the model holds an instance of its own MoE class. This parameter-free stand-in
    is attached to the model while the engine is built, then removed."""
    from deepspeed.moe.layer import MoE

    class ExpertMarker(MoE):
        def __init__(self):
            torch.nn.Module.__init__(self)
            self.num_experts = num_experts

        def set_deepspeed_parallelism(self, *args, **kwargs):  # our groups are registered already
            return None

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertMarker is not a layer")

    return ExpertMarker()


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
    """DeepSpeed's CPU Adam with optimizer offload; else torch AdamW (fused). At ZeRO-0 DeepSpeed has no
    overflow check in fp32, so the AdamW is our GuardedAdamW (same arithmetic, can skip a step); at ZeRO >= 1
    DeepSpeed's ZeRO optimizer skips non-finite steps itself and gets the plain class it recognises."""
    groups = param_groups(model, float(opt_cfg["weight_decay"]))
    kw = dict(lr=float(opt_cfg["lr"]), betas=tuple(float(b) for b in opt_cfg["betas"]), eps=float(opt_cfg["eps"]))
    if offload:  # ZeRO-Offload steps on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once)
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    cls = GuardedAdamW if zero_stage == 0 else torch.optim.AdamW
    return cls(groups, fused=True, **kw)  # one fused kernel per group (CPU and CUDA): 4-10x foreach here


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
    expert_names = sorted({p.group_name for p in model.parameters() if is_expert_param(p)})
    for name in expert_names:
        register_expert_groups(groups, name)
    if expert_names:
        model.add_module("_deepspeed_moe_marker", _moe_marker(run.model.n_routed_experts))
    try:
        engine, opt, _, sched = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_cfg,
                                                     mpu=groups.mpu())
    finally:
        if expert_names:
            del model._modules["_deepspeed_moe_marker"]
    return engine, opt, sched, ds_cfg
