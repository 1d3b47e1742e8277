"""Shared by the multi-node and elastic tests: the training overrides, the one-process reference run (made
once per session, reused), and reading metrics."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL_DATA, SMALL_MODEL

# global batch 16 = micro 4 x accum 4 x dp 1 = micro 4 x accum 2 x dp 2; the lr schedule does not depend on
# train.steps (decay_steps fixed), so a 10-step run equals the first 10 steps of a longer one.
BASE = SMALL_MODEL + SMALL_DATA + [
    "train.seq_len=32", "train.global_batch_size=16", "train.micro_batch_size=4", "train.log_interval=1",
    "optimizer.warmup_steps=3", "optimizer.lr=3e-3", "optimizer.decay_steps=100",
    "logging.progress=false", "train.sample_tokens=0", "logging.wandb.mode=disabled",
    "logging.tensorboard.enabled=false"]
REF_STEPS = 14


def need_netns():
    from megaseek.distributed.cluster import available
    why = available()
    if why:
        pytest.skip(why)


def metrics(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """The last record of each step wins: steps redone after a restart overwrite the lost ones."""
    return {int(r["step"]): float(r["loss"]) for r in metrics(run_dir) if "loss" in r}


def reference_losses(data_root: Path) -> dict[int, float]:
    """One process, REF_STEPS steps, the same overrides: computed once per session beside `data_root`."""
    run = Path(data_root).parent / "netns-reference"
    got = losses_by_step(run)
    if len(got) >= REF_STEPS:
        return got
    p = subprocess.run([sys.executable, "launch/pretrain.py", *BASE, f"data.root={data_root}", f"run_dir={run}",
                        f"train.steps={REF_STEPS}"], cwd=REPO, capture_output=True, text=True, timeout=400,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, REF_STEPS + 1))
    return got
