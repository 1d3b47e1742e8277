"""Metric sinks. The JSONL file in the run directory is always on (rank 0 writes it); other sinks
(progress bar here; wandb, TensorBoard, Prometheus in their own modules) receive the same dicts."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible as strings
    return v


class JsonlSink:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._f.close()


class ProgressSink:
    """A tqdm bar on rank 0: step, loss, lr, tokens/s, MFU (and validation loss once there is one).
    Redrawn at log steps and at most once a second in between (a terminal write costs real time)."""

    def __init__(self, total: int, initial: int = 0, min_interval_s: float = 1.0):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=min_interval_s)
        self.min_interval_s, self.t_draw, self.post = min_interval_s, 0.0, {}

    def update(self, step: int, rec: Optional[dict]) -> None:
        self.bar.n = step
        now = time.perf_counter()
        if rec is not None:
            self.post = dict(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                             tok_s=f"{rec['tokens_per_s']:.0f}", mfu=f"{100 * rec['mfu']:.1f}%")
            if "val_loss" in rec:
                self.post["val"] = f"{rec['val_loss']:.4f}"
            self.bar.set_postfix(self.post, refresh=False)
        elif now - self.t_draw < self.min_interval_s:
            return
        self.t_draw = now
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: Path, dedupe: bool = False) -> list[dict]:
    """The records of a metrics JSONL file. dedupe: keep the last record of each step, in step order
    (a run resumed from a checkpoint older than its last log step logs those steps again)."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if dedupe:
        by_step = {r.get("step"): r for r in recs}
        recs = [by_step[k] for k in sorted(by_step, key=lambda s: (s is None, s or 0))]
    return recs


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
