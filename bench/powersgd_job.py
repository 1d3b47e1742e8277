"""PowerSGD through the real training job against the uncompressed job, in the same run: two gloo ranks
(dp=2, ZeRO-0) train the default tiny model on the default corpus with DeepSpeed's plain all-reduce, then
with `parallel.powersgd.rank=R` (error feedback on, and optionally off). Prints each run's loss (mean of the
last 20 logged steps) relative to the plain run, and its bytes per step (`comm_bytes`, the collective
counter, after warm-up) relative to the plain run's.

    python bench/powersgd_job.py --data-root DIR [--steps 300] [--rank 4] [--warmup 10] [--no-ef] [overrides...]

DIR is a data root for the default model (`python launch/prepare_data.py data.root=DIR`); it is prepared
there on first use. Extra arguments are Hydra overrides applied to every run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runs(rank, world, out, data_root, variants, overrides):
    from hydra import compose, initialize_config_dir

    import megaseek  # noqa: F401  (registers the config schemas)
    from megaseek.train.job import pretrain
    conf = str(Path(__file__).resolve().parents[1] / "conf")
    res = {}
    for name, extra in variants:
        d = Path(out) / name
        with initialize_config_dir(config_dir=conf, version_base="1.3"):
            cfg = compose(config_name="config", overrides=["logging=minimal", "zero.stage=0", "train.log_interval=1",
                                                           "train.sample_tokens=0", f"data.root={data_root}",
                                                           f"run_dir={d}"] + overrides + extra)
        summary = pretrain(cfg)
        if rank == 0:
            res[name] = {"records": [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()],
                         "wall_s": summary["wall_time_s"]}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default="runs/bench_powersgd_job")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-ef", action="store_true", help="also run PowerSGD without error feedback")
    args, overrides = p.parse_known_args(argv)
    from megaseek.distributed.spawn import run_world
    overrides = [f"train.steps={args.steps}", "train.save_interval=100000"] + overrides
    psgd = [f"parallel.powersgd.rank={args.rank}", f"parallel.powersgd.warmup_steps={args.warmup}"]
    variants = [("plain", []), ("powersgd", psgd)]
    if args.no_ef:
        variants.append(("powersgd_no_ef", psgd + ["parallel.powersgd.error_feedback=false"]))
    res = run_world(2, _runs, args.out, args.data_root, variants, overrides, timeout=6 * 3600)[0]
    last = lambda recs: sum(r["loss"] for r in recs[-20:]) / len(recs[-20:])  # noqa: E731
    after = lambda recs: sum(r["comm_bytes"] for r in recs[args.warmup + 1:]) / len(recs[args.warmup + 1:])  # noqa: E731
    base = res["plain"]["records"]
    for name, _ in variants:
        recs = res[name]["records"]
        print(json.dumps({"run": name, "steps": len(recs), "loss_last20": round(last(recs), 4),
                          "loss_vs_plain": round(last(recs) / last(base), 4),
                          "bytes_per_step": round(after(recs)), "bytes_vs_plain": round(after(recs) / after(base), 4),
                          "wall_s": round(res[name]["wall_s"], 1)}))


if __name__ == "__main__":
    main()
