"""What a run saves besides tensors, and how it is restored (at any layout): loader position, lr schedule,
Adam step, counters, loss scale, the resolved config. Tensors: megaseek/ckpt (CheckpointManager)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional


def per_group_lists(sched: dict, n_groups: int) -> dict:
    """A saved lr-scheduler state for `n_groups` param groups. Another expert layout has another number of
    groups (the expert groups of ep > 1, megaseek/engine/build.py); every group follows one schedule of one
    peak lr, so a per-group list (base_lrs, _last_lr) of equal values is re-sized."""
    out = {}
    for k, v in sched.items():
        if isinstance(v, list) and len(v) != n_groups:
            if len(set(v)) != 1:
                raise ValueError(f"scheduler state {k}={v}: per-group values differ, cannot re-size to "
                                 f"{n_groups} param groups")
            v = [v[0]] * n_groups
        out[k] = v
    return out


class RunState:
    def __init__(self, ckpt, engine, scheduler, loader, global_batch: int, config: dict):
        self.ckpt, self.engine, self.scheduler, self.loader = ckpt, engine, scheduler, loader
        self.global_batch, self.config = global_batch, config

    def client_state(self, step: int) -> dict:
        sched = {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
        scale = getattr(self.engine.optimizer, "cur_scale", None)
        return {"step": step, "consumed_samples": step * self.global_batch,
                "loader": self.loader.state_dict(), "scheduler": sched,
                "adam_step": self.ckpt.optimizer_step_count(),
                "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
                "loss_scale": float(scale) if scale is not None else None, "config": self.config}

    def save(self, step: int) -> Path:
        return self.ckpt.save(step, self.client_state(step))

    def newest(self) -> Optional[Path]:
        return self.ckpt.newest()

    def restore(self, path: Path) -> int:
        """Load a checkpoint (any layout) and the loader / scheduler / counters; returns its step."""
        st = self.ckpt.load(path)
        self.loader.load_state_dict(st["loader"])
        sched = self.scheduler.state_dict()
        sched.update(per_group_lists(st["scheduler"], len(self.scheduler.optimizer.param_groups)))
        self.scheduler.load_state_dict(sched)
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # load_state_dict does not touch the optimizer: the next step must use this lr
        self.engine.global_steps = int(st["step"])
        self.engine.skipped_steps = int(st.get("skipped_steps", 0))
        if st.get("loss_scale") is not None and hasattr(self.engine.optimizer, "cur_scale"):
            self.engine.optimizer.cur_scale = st["loss_scale"]
        return int(st["step"])
