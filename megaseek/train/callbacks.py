"""The components around the loop, each small and testable on its own (see trainer.py for the events).

Order matters and is the job's: Resume (moves the step at start), Stability (may roll back: the others then
skip the step), Metrics (log record, progress), Preemption (may ask to stop), Checkpointing (saves at
intervals, on stop, at the end), Sampling (after training).
"""
from __future__ import annotations

import math
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megaseek.ckpt import checkpoint as ckpt_files
from megaseek.train.trainer import Callback


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # every rank decides alike
    return bool(t.item() > 0)


class Resume(Callback):
    """Continue from the newest valid checkpoint of the run directory (any layout), if there is one.

    With this run's `layout` (dp, tp, pp, ep, world_size, micro_batch, global_batch, grad_accum) given, a
    resume at another layout than the checkpoint's (an elastic shrink or regrow, a reshape) is logged and
    recorded (megaseek/distributed/elastic.py): as a `Metrics` extra hook, the record goes under the key
    `layout_change` into the first metrics.jsonl record after the resume."""

    def __init__(self, state, log=print, layout: Optional[dict] = None):
        self.state, self.log, self.layout = state, log, layout
        self.change: Optional[dict] = None

    def on_fit_start(self, t) -> None:
        path = self.state.newest()
        if path is not None:
            t.set_step(self.state.restore(path))
            self.log(f"[ckpt] resumed from {path.name} at step {t.step}")
            if self.layout is not None:
                from megaseek.distributed.elastic import checkpoint_layout, layout_change
                self.change = layout_change(checkpoint_layout(path), self.layout, t.step)
                if self.change is not None:
                    self.log(self.change["message"])

    def __call__(self, t) -> dict:
        change, self.change = self.change, None
        return {"layout_change": change} if change else {}


class Checkpointing(Callback):
    """Save every `save_every` steps, at the last step and on a requested stop."""

    def __init__(self, state, run_dir: Path, save_every: int, log=print):
        self.state, self.run_dir, self.save_every, self.log = state, Path(run_dir), int(save_every), log
        self.last_path: Optional[Path] = None

    def on_step_end(self, t, out: dict) -> None:
        if out.get("rolled_back") or t.stopping:
            return
        if t.step % self.save_every == 0 or t.step == t.steps:
            self.last_path = self.state.save(t.step)

    def on_stop(self, t, reason: str) -> None:
        self.last_path = self.state.save(t.step)
        self.log(f"[ckpt] {reason}: saved {self.last_path.name} at step {t.step}; exiting cleanly")

    def on_fit_end(self, t) -> None:
        path = self.last_path
        if path is None and ckpt_files.latest_tag(self.run_dir):
            path = ckpt_files.checkpoint_dir(self.run_dir) / ckpt_files.latest_tag(self.run_dir)
        t.summary["checkpoint"] = str(path) if path else None


class Preemption(Callback):
    """SIGTERM / SIGUSR1 (Slurm preemption): finish the current step, then stop (Checkpointing saves)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[str] = None

    def on_fit_start(self, t) -> None:
        def handler(signum, frame):
            self.received = signal.Signals(signum).name
        for sig in self.SIGNALS:
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (tests running the trainer in a thread)
                pass

    def on_step_end(self, t, out: dict) -> None:
        if out.get("rolled_back"):
            return
        if _any_rank(self.received is not None):  # every rank stops at the same step
            t.stop(self.received or "a signal on another rank")


class Stability(Callback):
    """Non-finite steps (skipped on every rank together by the engine): after `max_bad` in a row, roll back to
    the newest checkpoint (the data position moves on, past the batches that failed) or stop with a clear
    message."""

    def __init__(self, state, max_bad: int, action: str, max_rollbacks: int, log=print):
        if action not in ("rollback", "stop"):
            raise ValueError(f"train.on_bad_steps={action!r}: choose rollback or stop")
        self.state, self.max_bad, self.action, self.max_rollbacks, self.log = state, max_bad, action, max_rollbacks, log
        self.streak, self.rollbacks = 0, 0

    def on_step_end(self, t, out: dict) -> None:
        if not out.get("skipped"):
            self.streak = 0
            return
        self.streak += 1
        self.log(f"[train] step {t.step} skipped on every rank: non-finite loss or gradients "
                 f"(grad_norm={out['grad_norm']}), {self.streak} in a row")
        if self.streak < self.max_bad:
            return
        path = self.state.newest() if self.action == "rollback" else None
        if path is None or self.rollbacks >= self.max_rollbacks:
            raise RuntimeError(f"training stopped at step {t.step}: {self.streak} consecutive steps with non-finite "
                               f"loss or gradients (train.max_bad_steps={self.max_bad}, train.on_bad_steps="
                               f"{self.action}, {self.rollbacks} rollbacks so far). Lower optimizer.lr or check the data.")
        loader, engine = self.state.loader, self.state.engine
        position, skipped = loader.state_dict(), int(getattr(engine, "skipped_steps", 0))
        back = self.state.restore(path)
        loader.load_state_dict(position)
        engine.skipped_steps = skipped  # a run statistic: the rollback does not undo it
        self.rollbacks += 1
        self.streak = 0
        out["rolled_back"] = True
        self.log(f"[train] {self.max_bad} consecutive non-finite steps: rolled back to {path.name} (step {back}); "
                 f"the data position stays at {position.get('consumed_samples', position.get('next_batch'))}")
        t.set_step(back, rollback=True)

    def on_fit_end(self, t) -> None:
        t.summary["rollbacks"] = self.rollbacks


class Metrics(Callback):
    """The log record every `log_every` steps (mean of the interval's step records; loss is the global-batch
    mean), tokens/s, MFU/HFU against `peak_flops`, into the metrics hub (every sink); the progress bar.
    `extra(t) -> dict` hooks (evaluation) add to records at their steps."""

    def __init__(self, hub_factory: Callable, log_every: int, tokens_per_step: int, samples_per_step: int,
                 world_size: int, flops: dict, peak: tuple, lr_fn: Callable, loss_scale_fn: Callable,
                 extra: tuple = ()):
        self.hub_factory, self.log_every = hub_factory, int(log_every)
        self.tokens_per_step, self.samples_per_step, self.world = tokens_per_step, samples_per_step, world_size
        self.flops, (self.peak, self.peak_src) = flops, peak
        self.lr_fn, self.loss_scale_fn, self.extra = lr_fn, loss_scale_fn, tuple(extra)
        self.hub, self.last = None, None
        self._reset()

    def _reset(self) -> None:
        self.acc, self.n, self.t_log = {}, 0, time.perf_counter()

    def restart_clock(self) -> None:
        """Start the interval's clock now: work done outside the steps (an evaluation) is not in tokens/s."""
        self.t_log = time.perf_counter()

    def on_fit_start(self, t) -> None:
        self.hub = self.hub_factory(t.step)
        self._reset()

    def on_rollback(self, t, step: int) -> None:
        self._reset()

    def record(self, t, out: dict) -> dict:
        dt = time.perf_counter() - self.t_log
        tps = self.tokens_per_step * self.n / dt
        rec = {"step": t.step, "loss": self.acc.pop("loss") / self.n, "lr": float(self.lr_fn()),
               "grad_norm": out["grad_norm"], "tokens_per_s": tps, "tokens_per_s_per_rank": tps / self.world,
               "samples": t.step * self.samples_per_step, "mfu": self.flops["model"] * tps / self.peak,
               "hfu": self.flops["hardware"] * tps / self.peak, "model_tflops": self.flops["model"] * tps / 1e12,
               "step_time_s": dt / self.n, "skipped_steps": t.skipped_steps(),
               "peak_tflops": self.peak / 1e12, "peak_source": self.peak_src}
        rec.update({k: v / self.n for k, v in self.acc.items()})
        scale = self.loss_scale_fn()
        if scale is not None:
            rec["loss_scale"] = float(scale)
        return rec

    def on_step_end(self, t, out: dict) -> None:
        if out.get("rolled_back"):
            return
        for k, v in out.items():
            if k not in ("grad_norm", "skipped") and isinstance(v, (int, float)):
                self.acc[k] = self.acc.get(k, 0.0) + v
        self.n += 1
        rec = None
        if t.step % self.log_every == 0 or t.step == t.steps:
            rec = self.record(t, out)
            for hook in self.extra:
                rec.update(hook(t) or {})
            self.last = self.hub.log(rec)
            self._reset()
        self.hub.progress(t.step, rec)

    def on_fit_end(self, t) -> None:
        if self.hub is not None:
            self.hub.close()  # frees the metrics port and ends the wandb run, also on a crash
        t.summary["final_loss"] = self.last["loss"] if self.last else None


class Evaluation:
    """Held-out loss and perplexity every `every` steps (a `Metrics` extra hook): the first `n_batches` x
    global_batch validation windows, split across data-parallel ranks in full micro-batches."""

    def __init__(self, runner, valid, every: int, steps: int, global_batch: int, micro_batch: int, dp: int,
                 dp_rank: int, seq_len: int, n_batches: int):
        self.runner, self.valid, self.every, self.steps = runner, valid, int(every), int(steps)
        n = min(len(valid), n_batches * global_batch) if valid is not None else 0
        per_rank = (n // dp) // micro_batch * micro_batch
        mine = range(dp_rank * per_rank, (dp_rank + 1) * per_rank)
        from megaseek.data.loader import window_batch
        self.batches = [window_batch(*valid.batch(list(mine[k:k + micro_batch])), micro_batch, seq_len)
                        for k in range(0, per_rank, micro_batch)] if per_rank else []

    def due(self, step: int) -> bool:
        return bool(self.every) and bool(self.batches) and (step % self.every == 0 or step == self.steps)

    def __call__(self, t) -> dict:
        if not self.due(t.step):
            return {}
        val = self.runner.evaluate(self.batches)
        return {"val_loss": val, "val_ppl": math.exp(min(val, 50.0))}


class ExpertBalance(Callback):
    """MoE models, at every global-batch end (before Metrics reads the record): expert loads summed over the
    data-parallel group, the aux-loss-free bias update, and per-layer load / drop / balance-loss metrics into
    the step's record (megaseek/model/moe/balance.py). With pp > 1 each stage holds its own layers: the
    per-layer metrics are gathered over the pipeline group, so every stage's record (rank 0 writes the sinks)
    has every MoE layer and `moe/max_load` is the max over the whole model."""

    def __init__(self, model, dp_group, pp_group=None):
        self.model, self.dp_group, self.pp_group = model, dp_group, pp_group

    def on_step_end(self, t, out: dict) -> None:
        if out.get("rolled_back"):
            return
        from megaseek.model.moe.balance import end_of_global_batch
        mine = end_of_global_batch(self.model, self.dp_group)
        if self.pp_group is not None and dist.is_initialized() and dist.get_world_size(self.pp_group) > 1:
            stages = [None] * dist.get_world_size(self.pp_group)
            dist.all_gather_object(stages, {k: v for k, v in mine.items() if k != "moe/max_load"},
                                   group=self.pp_group)
            mine = {k: v for d in stages for k, v in d.items()}
            loads = [v for k, v in mine.items() if k.endswith("/max_load")]
            if loads:
                mine["moe/max_load"] = max(loads)
        out.update(mine)


class Sampling(Callback):
    """A sample from the model after training (every rank takes part: tensor ranks, pipeline stages, and
    the data-parallel world in lockstep, so ZeRO-3's gathers match)."""

    def __init__(self, sample_fn: Callable[[], Optional[str]], log=print):
        self.sample_fn, self.log = sample_fn, log

    def on_train_end(self, t) -> None:
        text = self.sample_fn()
        t.summary["sample"] = text
        if text is not None:
            self.log("[megaseek] sample:\n" + text)
