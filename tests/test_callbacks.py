"""Each callback of megaseek/train/callbacks.py on its own, against a fake trainer (what the loop exposes to
callbacks: step, steps, stop / stopping, set_step, skipped_steps, summary), and the test-only fault hooks of
megaseek/testing/faults.py. No process group, no model: milliseconds."""
from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from megaseek.testing import faults
from megaseek.train import callbacks as C


class FakeTrainer:
    def __init__(self, steps: int, step: int = 0):
        self.step, self.steps, self.summary = step, steps, {}
        self._stop, self.rollbacks_to = None, []
        self.engine_skipped = 0
        self.loss_hook, self.batch_index = None, 0

    def stop(self, reason):
        self._stop = self._stop or reason

    @property
    def stopping(self):
        return self._stop

    def set_step(self, step, *, rollback=False):
        self.step = step
        if rollback:
            self.rollbacks_to.append(step)

    def skipped_steps(self):
        return self.engine_skipped


class FakeLoader:
    def __init__(self):
        self.next_batch = 0

    def state_dict(self):
        return {"next_batch": self.next_batch, "consumed_samples": 16 * self.next_batch}

    def load_state_dict(self, d):
        self.next_batch = d["next_batch"]


class FakeEngine:
    skipped_steps = 0


class FakeState:
    """RunState's surface: save / newest / restore; restore rewinds the loader and the engine's counters to
    the checkpoint, as the real one does."""

    def __init__(self, run_dir: Path, ckpt_step=None):
        self.run_dir, self.ckpt_step = Path(run_dir), ckpt_step
        self.loader, self.engine = FakeLoader(), FakeEngine()
        self.saved, self.restored = [], []

    def save(self, step):
        self.saved.append(step)
        self.ckpt_step = step
        return self.run_dir / f"global_step{step}"

    def newest(self):
        return None if self.ckpt_step is None else self.run_dir / f"global_step{self.ckpt_step}"

    def restore(self, path):
        self.restored.append(path.name)
        self.loader.next_batch = self.ckpt_step  # the checkpoint's data position
        self.engine.skipped_steps = 0
        return self.ckpt_step


def _step(cb, t, **out):
    t.step += 1
    out.setdefault("grad_norm", 1.0)
    cb.on_step_end(t, out)
    return out


# --- Stability ---------------------------------------------------------------------------------------------

def test_stability_counts_streaks_and_a_clean_step_resets(tmp_path):
    st = FakeState(tmp_path, ckpt_step=None)
    cb = C.Stability(st, max_bad=3, action="stop", max_rollbacks=2, log=lambda *a: None)
    t = FakeTrainer(steps=20)
    for skipped in (True, True, False, True, True):
        _step(cb, t, skipped=skipped)
    assert cb.streak == 2 and st.restored == []
    with pytest.raises(RuntimeError, match=r"3 consecutive steps .*train\.max_bad_steps=3.*train\.on_bad_steps=stop"):
        _step(cb, t, skipped=True)
    assert t.step == 6


def test_stability_rollback_restores_and_keeps_the_loader_position(tmp_path):
    st = FakeState(tmp_path, ckpt_step=4)
    logs = []
    cb = C.Stability(st, max_bad=2, action="rollback", max_rollbacks=1, log=logs.append)
    t = FakeTrainer(steps=20, step=6)
    st.loader.next_batch = 7  # the data moved past the failing batches
    st.engine.skipped_steps = 2
    _step(cb, t, skipped=True)
    assert st.restored == [] and cb.streak == 1
    out = _step(cb, t, skipped=True)
    assert st.restored == ["global_step4"] and out["rolled_back"] is True
    assert t.step == 4 and t.rollbacks_to == [4]            # the step went back, announced as a rollback
    assert st.loader.next_batch == 7                        # ...but the data position did not
    assert st.engine.skipped_steps == 2                     # a run statistic: not undone
    assert cb.streak == 0 and cb.rollbacks == 1
    assert any("rolled back to global_step4 (step 4)" in m and "112" in m for m in logs), logs
    # the next streak exhausts max_rollbacks: stop, with the message naming the keys
    _step(cb, t, skipped=True)
    with pytest.raises(RuntimeError, match=r"train\.max_bad_steps=2.*1 rollbacks so far"):
        _step(cb, t, skipped=True)
    cb.on_fit_end(t)
    assert t.summary["rollbacks"] == 1


def test_stability_rollback_without_a_checkpoint_stops(tmp_path):
    cb = C.Stability(FakeState(tmp_path), max_bad=1, action="rollback", max_rollbacks=5, log=lambda *a: None)
    with pytest.raises(RuntimeError, match=r"train\.max_bad_steps=1"):
        _step(cb, FakeTrainer(steps=5), skipped=True, grad_norm=float("nan"))
    with pytest.raises(ValueError, match="train.on_bad_steps='skip'"):
        C.Stability(FakeState(tmp_path), 1, "skip", 1)


# --- Checkpointing -----------------------------------------------------------------------------------------

def test_checkpointing_saves_at_the_interval_and_the_last_step(tmp_path):
    st = FakeState(tmp_path)
    cb = C.Checkpointing(st, tmp_path, save_every=4, log=lambda *a: None)
    t = FakeTrainer(steps=10)
    for _ in range(10):
        _step(cb, t, skipped=False)
    assert st.saved == [4, 8, 10]
    cb.on_fit_end(t)
    assert t.summary["checkpoint"] == str(tmp_path / "global_step10")


@pytest.mark.parametrize("stop_at", [6, 8])
def test_checkpointing_saves_once_on_a_stop(tmp_path, stop_at):
    """A stop requested during step 8 (an interval step) saves once, not twice; a stop at 6 saves at 6."""
    st = FakeState(tmp_path)
    logs = []
    cb = C.Checkpointing(st, tmp_path, save_every=4, log=logs.append)
    t = FakeTrainer(steps=10)
    while t.step < t.steps and t.stopping is None:
        t.step += 1
        if t.step == stop_at:
            t.stop("SIGTERM")
        cb.on_step_end(t, {"grad_norm": 1.0})
    cb.on_stop(t, t.stopping)
    assert st.saved == ([4, 8] if stop_at == 8 else [4, 6])
    assert logs == [f"[ckpt] SIGTERM: saved global_step{stop_at} at step {stop_at}; exiting cleanly"]


def test_checkpointing_skips_a_rolled_back_step(tmp_path):
    st = FakeState(tmp_path)
    cb = C.Checkpointing(st, tmp_path, save_every=1, log=lambda *a: None)
    t = FakeTrainer(steps=10)
    _step(cb, t, rolled_back=True)
    assert st.saved == []
    cb.on_fit_end(t)
    assert t.summary["checkpoint"] is None


# --- Preemption --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_preemption_signal_sets_stop_after_the_step(sig):
    old = {s: signal.getsignal(s) for s in C.Preemption.SIGNALS}
    try:
        cb = C.Preemption()
        t = FakeTrainer(steps=10)
        cb.on_fit_start(t)
        _step(cb, t)
        assert t.stopping is None
        os.kill(os.getpid(), sig)
        deadline = time.time() + 5
        while cb.received is None and time.time() < deadline:
            time.sleep(0.01)
        assert t.stopping is None  # not before the current step ends
        _step(cb, t)
        assert t.stopping == sig.name and t.step == 2
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- Metrics -----------------------------------------------------------------------------------------------

class FakeHub:
    def __init__(self):
        self.records, self.progress_calls, self.closed = [], [], False

    def log(self, rec):
        self.records.append(dict(rec))
        return rec

    def progress(self, step, rec):
        self.progress_calls.append(step)

    def close(self):
        self.closed = True


class Clock:
    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def test_metrics_record_is_the_interval_mean_with_throughput_and_mfu(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(C, "time", clock)
    hub = FakeHub()
    starts = []
    flops = {"model": 6.0e6, "hardware": 8.0e6}
    cb = C.Metrics(lambda start: (starts.append(start), hub)[1], log_every=2, tokens_per_step=1000,
                   samples_per_step=8, world_size=2, flops=flops, peak=(1.0e10, "test peak"),
                   lr_fn=lambda: 3e-4, loss_scale_fn=lambda: None, extra=(lambda t: {"val_loss": 9.0},))
    t = FakeTrainer(steps=5)
    cb.on_fit_start(t)
    assert starts == [0]
    for loss, fwd in ((1.0, 0.5), (3.0, 1.5)):
        clock.now += 2.0
        _step(cb, t, loss=loss, time_forward_s=fwd, skipped=False, grad_norm=0.25)
    rec = hub.records[-1]
    tps = 1000 * 2 / 4.0  # tokens per step x steps / seconds of the interval
    assert rec["step"] == 2 and rec["loss"] == 2.0 and rec["time_forward_s"] == 1.0
    assert rec["tokens_per_s"] == tps == 500.0 and rec["tokens_per_s_per_rank"] == 250.0
    assert rec["mfu"] == pytest.approx(6.0e6 * 500 / 1e10) and rec["mfu"] == pytest.approx(0.3)
    assert rec["hfu"] == pytest.approx(0.4) and rec["model_tflops"] == pytest.approx(6.0e6 * 500 / 1e12)
    assert rec["step_time_s"] == 2.0 and rec["samples"] == 16 and rec["lr"] == 3e-4 and rec["grad_norm"] == 0.25
    assert rec["val_loss"] == 9.0 and rec["peak_source"] == "test peak" and "loss_scale" not in rec
    assert "skipped" not in rec
    # a rolled-back step is not counted; a rollback resets the interval; the last step always logs
    clock.now += 1.0
    _step(cb, t, loss=100.0, rolled_back=True)
    cb.on_rollback(t, 2)
    t.step = 2
    for loss in (5.0, 6.0, 7.0):
        clock.now += 1.0
        _step(cb, t, loss=loss, skipped=False)
    assert [r["step"] for r in hub.records] == [2, 4, 5]
    assert hub.records[1]["loss"] == 5.5 and hub.records[1]["tokens_per_s"] == 1000.0
    assert hub.records[2]["loss"] == 7.0
    assert hub.progress_calls == [1, 2, 3, 4, 5]
    cb.on_fit_end(t)
    assert hub.closed and t.summary["final_loss"] == 7.0


def test_metrics_reports_the_loss_scale_when_there_is_one(monkeypatch):
    monkeypatch.setattr(C, "time", Clock())
    hub = FakeHub()
    cb = C.Metrics(lambda s: hub, 1, 10, 1, 1, {"model": 1.0, "hardware": 1.0}, (1.0, "x"), lambda: 0.1,
                   lambda: 1024.0)
    t = FakeTrainer(steps=3)
    cb.on_fit_start(t)
    C.time.now += 1.0
    _step(cb, t, loss=1.0)
    assert hub.records[0]["loss_scale"] == 1024.0


# --- Sampling ----------------------------------------------------------------------------------------------

def test_sampling_puts_the_text_in_the_summary():
    logs = []
    cb = C.Sampling(lambda: "def f(): pass", log=logs.append)
    t = FakeTrainer(steps=1)
    cb.on_train_end(t)
    assert t.summary["sample"] == "def f(): pass" and logs == ["[megaseek] sample:\ndef f(): pass"]


# --- fault hooks (test-only, from the environment) ---------------------------------------------------------

class FakeManager:
    on_files_written = None


def test_faults_unset_is_a_no_op(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    t, m = FakeTrainer(steps=1), FakeManager()
    faults.install(t, m, rank=0)
    assert t.loss_hook is None and m.on_files_written is None and faults.from_env() is None


def test_faults_nan_steps_on_one_rank_keyed_on_the_data_position(monkeypatch):
    monkeypatch.setenv(faults.ENV, json.dumps({"nan_step": [2, 4], "nan_rank": 1}))
    t0, t1 = FakeTrainer(steps=5), FakeTrainer(steps=5)
    faults.install(t0, FakeManager(), rank=0)
    faults.install(t1, FakeManager(), rank=1)
    assert t0.loss_hook is None and t1.loss_hook is not None
    loss = torch.tensor(2.5)
    got = {}
    for b in range(5):  # batch_index is 0-based; nan_step names 1-based global batches
        t1.batch_index = b
        got[b + 1] = float(t1.loss_hook(loss))
    assert [k for k, v in got.items() if math.isnan(v)] == [2, 4]
    assert got[1] == got[3] == got[5] == 2.5
    monkeypatch.setenv(faults.ENV, json.dumps({"nan_step": 3}))  # an int, rank 0 by default
    t = FakeTrainer(steps=5)
    faults.install(t, FakeManager(), rank=0)
    t.batch_index = 2
    assert math.isnan(float(t.loss_hook(loss)))


def test_faults_stall_only_the_named_checkpoint(monkeypatch):
    monkeypatch.setenv(faults.ENV, json.dumps({"save_sleep_step": 3, "save_sleep_s": 0.2}))
    m, logs = FakeManager(), []
    faults.install(FakeTrainer(steps=5), m, rank=0, log=logs.append)
    t0 = time.perf_counter()
    m.on_files_written(2, Path("tmp-global_step2"))
    t1 = time.perf_counter()
    m.on_files_written(3, Path("tmp-global_step3"))
    t2 = time.perf_counter()
    assert t1 - t0 < 0.1 and t2 - t1 >= 0.2
    assert logs == ["[ckpt] fault injection: stalling 0.2s while writing tmp-global_step3"]


def test_faults_are_not_a_config_key():
    from dataclasses import fields

    from megaseek.config.sections import SCHEMAS
    names = {f.name for cls in SCHEMAS.values() for f in fields(cls)}
    assert not any("fault" in n or "nan_step" in n for n in names)


# --- the loop itself, with a fake step runner ----------------------------------------------------------------

class FakeRunner:
    """Counts steps; the engine 'skips' (non-finite) the steps listed in `bad` (1-based)."""

    def __init__(self, bad=()):
        self.engine, self.bad, self.calls = FakeEngine(), set(bad), 0
        self.engine.skipped_steps = 0

    def train_step(self, batches, loss_hook=None):
        self.calls += 1
        if self.calls in self.bad:
            self.engine.skipped_steps += 1
        return {"loss": float(self.calls), "grad_norm": 1.0}


class Recorder(C.Callback):
    def __init__(self, stop_at=None, fail_at=None):
        self.events, self.stop_at, self.fail_at = [], stop_at, fail_at

    def on_fit_start(self, t):
        self.events.append("fit_start")

    def on_step_end(self, t, out):
        self.events.append(("step", t.step, out["skipped"]))
        if t.step == self.fail_at:
            raise RuntimeError("boom")
        if t.step == self.stop_at:
            t.stop("asked")

    def on_stop(self, t, reason):
        self.events.append(("stop", reason))

    def on_train_end(self, t):
        self.events.append("train_end")

    def on_fit_end(self, t):
        self.events.append("fit_end")


class LoopLoader(FakeLoader):
    def batches(self):
        self.next_batch += 1
        return [{}]


def test_trainer_loop_events_skips_and_stop():
    from megaseek.train.trainer import Trainer
    rec = Recorder()
    t = Trainer(FakeRunner(bad=[2]), LoopLoader(), state=None, steps=3, callbacks=[rec], log=lambda *a: None)
    s = t.fit()
    assert rec.events == ["fit_start", ("step", 1, False), ("step", 2, True), ("step", 3, False), "train_end",
                          "fit_end"]
    assert s["steps"] == 3 and s["skipped_steps"] == 1 and s["stopped_by"] is None and t.batch_index == 2
    rec = Recorder(stop_at=2)
    s = Trainer(FakeRunner(), LoopLoader(), None, 5, [rec], log=lambda *a: None).fit()
    assert rec.events[-4:] == [("step", 2, False), ("stop", "asked"), "train_end", "fit_end"]
    assert s["steps"] == 2 and s["stopped_by"] == "asked"
    rec = Recorder(fail_at=1)
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(FakeRunner(), LoopLoader(), None, 5, [rec], log=lambda *a: None).fit()
    assert rec.events == ["fit_start", ("step", 1, False), "fit_end"]  # fit_end also on an error
