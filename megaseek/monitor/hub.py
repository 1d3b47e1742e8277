"""MetricsHub: the one object the trainer talks to about metrics. Every rank owns one.

The trainer calls `log(record)` on every rank at each log step with the same global record (loss, lr,
grad_norm, tokens_per_s, mfu, per-phase times, val_loss at eval steps, ...). The hub adds what it
measures itself and fans the result out:

    every rank  system metrics (psutil; torch.cuda / NVML)   -> run_dir/system/rank<r>.jsonl
                time in collectives (CommTimer)               -> time_comm_s
                Prometheus endpoint on port + local_rank      -> /metrics, label rank=<r>
    rank 0      run_dir/metrics.jsonl (always), progress bar, TensorBoard, wandb

`log` is collective-free and cheap: JSONL lines are written in place, Prometheus gets a dict reference,
TensorBoard and wandb are written by a background thread (`logging.background`). The hub reports its own
cost: `time_monitor_s` = time spent in the hub on the training thread per step (this interval's
`progress` calls and the previous `log`). A sink that fails warns
once and is dropped; the JSONL file is the exception: its errors propagate.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from megaseek.monitor.metrics import JsonlSink, ProgressSink


def _get(cfg: Any, dotted: str, default=None):
    node = cfg
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part) if hasattr(node, "get") else getattr(node, part, None)
    return default if node is None else node


class SinkThread:
    """Builds, writes and closes slow sinks off the training thread (or inline when threaded=False)."""

    def __init__(self, factories: list[tuple[str, Callable]], threaded: bool = True, maxsize: int = 10_000):
        self.factories, self.threaded, self.sinks, self.dropped = factories, threaded, [], 0
        self.q: queue.Queue = queue.Queue(maxsize)
        if threaded:
            self.thread = threading.Thread(target=self._run, name="megaseek-monitor", daemon=True)
            self.thread.start()
        else:
            self._build()

    def _build(self) -> None:
        for name, make in self.factories:
            try:
                self.sinks.append((name, make()))
            except Exception as e:
                warnings.warn(f"[monitor] {name} sink off: {type(e).__name__}: {e}")

    def _write(self, rec: dict) -> None:
        for item in list(self.sinks):
            try:
                item[1].write(rec)
            except Exception as e:
                warnings.warn(f"[monitor] {item[0]} sink off after an error: {type(e).__name__}: {e}")
                self.sinks.remove(item)

    def _run(self) -> None:
        self._build()
        while (rec := self.q.get()) is not None:
            self._write(rec)
        self._close_sinks()

    def put(self, rec: dict) -> None:
        if not self.threaded:
            return self._write(rec)
        try:
            self.q.put_nowait(rec)
        except queue.Full:  # never block training on a dashboard
            self.dropped += 1

    def _close_sinks(self) -> None:
        for name, s in self.sinks:
            try:
                s.close()
            except Exception as e:
                warnings.warn(f"[monitor] closing {name}: {e}")

    def close(self, timeout: float = 120.0) -> None:
        if not self.threaded:
            return self._close_sinks()
        self.q.put(None)
        self.thread.join(timeout)
        if self.dropped:
            warnings.warn(f"[monitor] {self.dropped} records dropped: a sink could not keep up")


class MetricsHub:
    def __init__(self, log_cfg: Any, run_dir: Path, rank: int, world_size: int, total_steps: int,
                 start_step: int = 0, run_config: Optional[dict] = None):
        log_cfg = log_cfg if log_cfg is not None else {}
        self.rank, self.world_size, self.run_dir = rank, world_size, Path(run_dir)
        self.last_step, self.hub_s, self.since_log = start_step, 0.0, 0
        rc = run_config or {}
        self.seq_len = _get(rc, "train.seq_len")
        self.local_rank = int(os.environ.get("LOCAL_RANK", rank))
        self.jsonl = JsonlSink(self.run_dir / "metrics.jsonl") if rank == 0 else None
        self.bar = ProgressSink(total_steps, start_step) if (rank == 0 and _get(log_cfg, "progress", True)) else None

        self.system = None
        if _get(log_cfg, "system_stats", True):
            from megaseek.monitor.system import SystemStats
            self.system = SystemStats()
        self.rank_file = None
        if _get(log_cfg, "rank_files", True):
            self.rank_file = JsonlSink(self.run_dir / "system" / f"rank{rank}.jsonl")
        self.comm = None
        if _get(log_cfg, "comm_timing", True):
            from megaseek.monitor.comm import CommTimer
            self.comm = CommTimer().install()
            self.comm.take()  # count from now
            self.comm.take_bytes()

        self.prom = self._start_prometheus(log_cfg, rc)
        self.slow = self._start_slow_sinks(log_cfg, rc, start_step) if rank == 0 else None

    # --- construction ---
    def _start_prometheus(self, log_cfg: Any, rc: dict):
        port = int(_get(log_cfg, "prometheus.port", 0) or 0)
        all_ranks = bool(_get(log_cfg, "prometheus.all_ranks", True))
        if port <= 0 or (self.rank != 0 and not all_ranks):
            return None
        host = str(_get(log_cfg, "prometheus.host", "127.0.0.1"))
        port += self.local_rank if all_ranks else 0
        info = {"run": self.run_dir.name, "model": _get(rc, "model.name", ""),
                "precision": _get(rc, "precision.name", ""), "world_size": self.world_size}
        try:
            from megaseek.monitor.prometheus_sink import PrometheusSink
            return PrometheusSink(host, port, self.rank, info)
        except OSError as e:
            warnings.warn(f"[monitor] rank {self.rank}: no Prometheus endpoint on {host}:{port}: {e}")
            return None

    def _start_slow_sinks(self, log_cfg: Any, rc: dict, start_step: int) -> Optional[SinkThread]:
        factories = []
        if _get(log_cfg, "tensorboard.enabled", False):
            def make_tb():
                import yaml
                from megaseek.monitor.tensorboard_sink import TensorBoardSink
                return TensorBoardSink(self.run_dir / "tensorboard", start_step,
                                       int(_get(log_cfg, "tensorboard.flush_secs", 10)),
                                       yaml.safe_dump(rc, sort_keys=False) if rc else None)
            factories.append(("tensorboard", make_tb))
        wandb_cfg = _get(log_cfg, "wandb", {})
        from megaseek.monitor.wandb_sink import resolve_mode
        if resolve_mode(_get(wandb_cfg, "mode", "disabled")) != "disabled":
            def make_wandb():
                from megaseek.monitor.wandb_sink import WandbSink
                return WandbSink(wandb_cfg, self.run_dir, rc, self.world_size)
            factories.append(("wandb", make_wandb))
        if not factories:
            return None
        return SinkThread(factories, threaded=bool(_get(log_cfg, "background", True)))

    # --- the seam ---
    def log(self, record: dict) -> dict:
        """Collective-free. Returns the record as written to metrics.jsonl (rank 0's view)."""
        t_in = time.perf_counter()
        rec = dict(record)
        step = int(rec.get("step", self.last_step))
        # steps in this interval; after a rollback (step went back) count the progress() calls instead
        n_steps = step - self.last_step if step > self.last_step else max(1, self.since_log + 1)
        self.last_step, self.since_log = step, -1  # progress() of this step comes next
        self._derive(rec)
        mine = {"time_monitor_s": self.hub_s / n_steps}
        if self.comm is not None:
            secs, _ = self.comm.take()
            mine["time_comm_s"] = secs / n_steps
            mine["comm_bytes"] = self.comm.take_bytes() / n_steps  # this rank's, per step
        if self.system is not None:
            mine.update(self.system.sample())
        for k, v in mine.items():
            rec.setdefault(k, v)  # the trainer's own figure wins
        if self.rank_file is not None:
            self.rank_file.write({"step": step, "rank": self.rank, "time": rec["time"], **mine,
                                  **{k: v for k, v in record.items() if k.startswith("time_")}})
        if self.prom is not None:
            self.prom.update(rec)
        if self.jsonl is not None:
            self.jsonl.write(rec)
        if self.slow is not None:
            self.slow.put(rec)
        self.hub_s = time.perf_counter() - t_in
        return rec

    def _derive(self, rec: dict) -> None:
        rec.setdefault("time", time.time())
        if "samples" in rec and self.seq_len:
            rec.setdefault("tokens_seen", int(rec["samples"]) * int(self.seq_len))
        tf, mfu, hfu = rec.get("model_tflops"), rec.get("mfu"), rec.get("hfu")
        if isinstance(tf, (int, float)) and isinstance(mfu, (int, float)) and mfu > 0:
            rec.setdefault("peak_tflops", tf / mfu)
            if isinstance(hfu, (int, float)):
                rec.setdefault("hardware_tflops", tf * hfu / mfu)

    def progress(self, step: int, record: Optional[dict]) -> None:
        t_in = time.perf_counter()
        self.since_log += 1
        if self.bar:
            self.bar.update(step, record)
        if self.prom is not None:
            self.prom.set_step(step)
        self.hub_s += time.perf_counter() - t_in

    def close(self) -> None:
        for name in ("bar", "slow", "prom", "rank_file", "jsonl"):
            sink = getattr(self, name)
            if sink is not None:
                try:
                    sink.close()
                except Exception as e:
                    if name == "jsonl":
                        raise
                    warnings.warn(f"[monitor] closing {name}: {e}")
                setattr(self, name, None)
        if self.comm is not None:
            self.comm.uninstall()
            self.comm = None
