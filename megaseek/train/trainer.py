"""The loop: run steps of whatever objective the step runner holds; everything else is a callback.

    fit():  on_fit_start -> while step < steps: [batches -> runner.train_step -> on_step_end] -> on_fit_end

Callbacks see the trainer and may: move `step` (resume, rollback: they call `restore` and `set_step`), ask to
`stop(reason)` after the current step, add to the summary. Events, in the order callbacks are given:

    on_fit_start(t)            resume, signal handlers, sinks
    on_step_end(t, out)        `out`: the runner's record of the step, plus `skipped` (non-finite, not applied)
    on_rollback(t, step)       the step counter went back to `step` (accumulated metrics are stale)
    on_stop(t, reason)         a stop was requested; the last chance to save
    on_train_end(t)            the loop finished without an error (sampling)
    on_fit_end(t)              always (also on errors, before the exception leaves fit)
"""
from __future__ import annotations

import time
from typing import Optional


class Callback:
    def on_fit_start(self, trainer) -> None: ...
    def on_step_end(self, trainer, out: dict) -> None: ...
    def on_rollback(self, trainer, step: int) -> None: ...
    def on_stop(self, trainer, reason: str) -> None: ...
    def on_train_end(self, trainer) -> None: ...
    def on_fit_end(self, trainer) -> None: ...


class Trainer:
    """Holds the run's moving parts (engine, loader, runner, checkpoint state) and the step counter."""

    def __init__(self, runner, loader, state, steps: int, callbacks: list, log=print):
        self.runner, self.loader, self.state, self.steps = runner, loader, state, int(steps)
        self.callbacks = list(callbacks)
        self.log = log
        self.step = 0
        self.start_step = 0
        self.summary: dict = {}
        self._stop: Optional[str] = None
        self.batch_index = 0  # global batch (0-based) of the step in flight: a data position, not a step
        self.loss_hook = None  # tests: see megaseek/testing/faults.py

    # --- what callbacks may do ---
    def stop(self, reason: str) -> None:
        self._stop = self._stop or reason

    @property
    def stopping(self) -> Optional[str]:
        return self._stop

    def set_step(self, step: int, *, rollback: bool = False) -> None:
        self.step = int(step)
        if rollback:
            self._emit("on_rollback", self.step)

    def skipped_steps(self) -> int:
        return int(getattr(self.runner.engine, "skipped_steps", 0))

    # --- the loop ---
    def _emit(self, event: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, event)(self, *args)

    def fit(self) -> dict:
        t0 = time.perf_counter()
        try:
            self._emit("on_fit_start")
            self.start_step = self.step
            while self.step < self.steps and self._stop is None:
                self.batch_index = int(self.loader.state_dict()["next_batch"])
                before = self.skipped_steps()
                out = self.runner.train_step(self.loader.batches(), loss_hook=self.loss_hook)
                out["skipped"] = self.skipped_steps() > before  # not applied; the stability policy decides
                self.step += 1  # counted either way: the data moved on
                self._emit("on_step_end", out)
            if self._stop is not None:
                self._emit("on_stop", self._stop)
            self._emit("on_train_end")
        finally:
            self.summary["wall_time_s"] = time.perf_counter() - t0
            self._emit("on_fit_end")
        self.summary.update({"steps": self.step, "steps_this_run": self.step - self.start_step,
                             "stopped_by": self._stop, "skipped_steps": self.skipped_steps()})
        return self.summary
