"""Record the default config's first 20 steps (fp32): one process, and dp=2 ZeRO-1.

    python tests/baseline/record.py [out.json]

The numbers in tests/baseline/default_20_steps.json were recorded with this script on the training loop
*before* the redesign (issue "One training loop for every objective": commit e4577d6) reading the default
data as prepared by the data package of commit 2967f60 (whose near-duplicate defaults changed the default
corpus), i.e. `git worktree add W e4577d6`, `git archive 2967f60 megaseek/data conf/data | tar -x -C W`, then
`python W/tests/baseline/record.py`. tests/test_baseline.py reruns it on today's loop and asserts that the
redesign reproduced them. If the default data or model changes, record again.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

# The default config (tiny model, embedded corpus, lr schedule of the 150-step default), stopped at 20 steps.
OVERRIDES = ["train.steps=20", "optimizer.decay_steps=150", "train.log_interval=1", "train.sample_tokens=0",
             "logging.progress=false", "logging.wandb.mode=disabled", "logging.tensorboard.enabled=false",
             "logging.system_stats=false", "train.save_interval=100000"]
LAYOUTS = {"one_process": (1, ["zero.stage=0"]), "dp2_zero1": (2, ["zero.stage=1"])}


def _run(rank, world, run_dir, overrides, data_root):
    from megaseek.train.job import pretrain
    from tests.helpers import compose
    cfg = compose(OVERRIDES + overrides + [f"run_dir={run_dir}", f"data.root={data_root}"])
    pretrain(cfg)
    if rank == 0:
        recs = [json.loads(l) for l in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
        return {"loss": [r["loss"] for r in recs], "grad_norm": [r["grad_norm"] for r in recs]}
    return None


def record(data_root: str, tmp: str) -> dict:
    from tests.helpers import run_world
    out = {}
    for name, (world, ov) in LAYOUTS.items():
        out[name] = run_world(world, _run, str(Path(tmp) / name), ov, data_root)[0]
    return out


if __name__ == "__main__":
    import os
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("default_20_steps.json")
    root = os.environ.get("MEGASEEK_BASELINE_DATA", str(REPO / "data"))
    with tempfile.TemporaryDirectory() as tmp:
        res = record(root, tmp)
    dest.write_text(json.dumps(res, indent=1))
    print(json.dumps(res))
