"""MetricsHub: the one object the trainer talks to about metrics. Every rank owns one.

The trainer calls `log(record)` on every rank at each log step with the same global record (loss,
lr, grad_norm, tokens_per_s, mfu, ...); the hub adds what it measures itself and fans the result
out to the sinks enabled in `cfg.logging` (rank 0 writes the JSONL file, always).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from megaseek.monitor.metrics import JsonlSink, ProgressSink


class MetricsHub:
    def __init__(self, log_cfg: Any, run_dir: Path, rank: int, world_size: int, total_steps: int,
                 start_step: int = 0, run_config: Optional[dict] = None):
        self.rank, self.world_size = rank, world_size
        self.jsonl = JsonlSink(Path(run_dir) / "metrics.jsonl") if rank == 0 else None
        self.bar = ProgressSink(total_steps, start_step) if (rank == 0 and log_cfg.get("progress", True)) else None

    def log(self, record: dict) -> dict:
        """Collective-free. Returns the record as written."""
        if self.jsonl:
            self.jsonl.write(record)
        return record

    def progress(self, step: int, record: Optional[dict]) -> None:
        if self.bar:
            self.bar.update(step, record)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.jsonl:
            self.jsonl.close()
