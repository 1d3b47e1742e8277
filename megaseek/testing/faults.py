"""Fault injection for tests, switched on by the environment variable MEGASEEK_FAULTS (JSON), never by the
run config:

    {"nan_step": 3 | [5, 6], "nan_rank": 0}        this rank's loss is NaN on these global batches (1-based;
                                                    keyed on the data position, so after a rollback the
                                                    data moves on, as a bad batch would)
    {"save_sleep_step": 4, "save_sleep_s": 600}    stall while writing that step's checkpoint (to kill a
                                                    run mid-save)
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

ENV = "MEGASEEK_FAULTS"


def from_env() -> Optional[dict]:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


def install(trainer, ckpt_manager, rank: int, log=print) -> None:
    """Wire the faults named in MEGASEEK_FAULTS into a built trainer (no-op when it is unset)."""
    f = from_env()
    if not f:
        return
    steps = f.get("nan_step", [])
    steps = [int(s) for s in (steps if isinstance(steps, list) else [steps])]
    if steps and int(f.get("nan_rank", 0)) == rank:
        def nan_loss(loss):
            return loss * float("nan") if trainer.batch_index + 1 in steps else loss
        trainer.loss_hook = nan_loss
    if f.get("save_sleep_step") is not None:
        when, secs = int(f["save_sleep_step"]), float(f.get("save_sleep_s", 600))

        def stall(step, tmp):
            if step == when:
                log(f"[ckpt] fault injection: stalling {secs}s while writing {tmp.name}")
                time.sleep(secs)
        ckpt_manager.on_files_written = stall
