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
    """A tqdm bar on rank 0: step, loss, lr, tokens/s, MFU."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True, mininterval=1.0)

    def update(self, step: int, rec: Optional[dict]) -> None:
        self.bar.n = step
        if rec is not None:
            self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                 tok_s=f"{rec['tokens_per_s']:.0f}", mfu=f"{100 * rec['mfu']:.1f}%", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
