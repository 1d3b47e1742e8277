"""Gradient reduction overlapped with backward vs not, at dp=2, in the same run: DeepSpeed ZeRO's
`overlap_comm` (buckets of `zero.reduce_bucket_size` reduced while backward goes on) against the same run with
it off. Runs alternate (off, on, off, on, ...) so machine noise hits both; the median step time over the
steps after the first few of each run is compared.

    python bench/overlap.py [--repeats 1] [--steps 30] [--stage 2] [--bucket 200000] [hydra overrides...]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMALL = ["model.vocab_size=1001", "model.hidden_size=128", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=2", "model.intermediate_size=256", "model.max_seq_len=128", "data.max_bytes=1500000",
         "data.tokenizer_sample_bytes=1000000", "train.seq_len=128", "train.micro_batch_size=4",
         "train.global_batch_size=8", "train.log_interval=1", "logging.progress=false", "train.sample_tokens=0",
         "logging.wandb.mode=disabled", "logging.tensorboard.enabled=false"]


def one_run(run_dir: Path, overlap: bool, args, extra) -> list[float]:
    port = 29600 + os.getpid() % 1000
    cmd = [str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={port}", "launch/pretrain.py", *SMALL,
           f"run_dir={run_dir}", f"train.steps={args.steps}", f"zero.stage={args.stage}",
           f"zero.overlap_comm={str(overlap).lower()}", f"zero.reduce_bucket_size={args.bucket}", *extra]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"run failed ({p.returncode}):\n{p.stderr[-3000:]}")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [float(r["step_time_s"]) for r in recs if int(r["step"]) > 5]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--stage", type=int, default=2)
    p.add_argument("--bucket", type=int, default=200_000, help="zero.reduce_bucket_size (elements)")
    args, extra = p.parse_known_args(argv)
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="overlap-") as tmp:
        for i in range(args.repeats):
            for overlap in (False, True):
                times[overlap] += one_run(Path(tmp) / f"r{i}-{int(overlap)}", overlap, args, extra)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({"dp": 2, "zero_stage": args.stage, "bucket": args.bucket, "steps_measured": len(times[True]),
                      "step_time_off_s": off, "step_time_on_s": on, "on_vs_off": on / off}))
    print(f"[overlap] dp=2 ZeRO-{args.stage}: step {on * 1e3:.1f} ms with overlap_comm vs {off * 1e3:.1f} ms "
          f"without, ratio {on / off:.3f}", flush=True)


if __name__ == "__main__":
    main()
