"""PowerSGD through the real training job against the uncompressed job, in the same run: two gloo ranks
(dp=2, ZeRO-0) train the default tiny model on the default corpus with DeepSpeed's plain all-reduce, then
with `parallel.powersgd.rank=R` (error feedback on, and optionally off). Prints each run's loss (mean of the
last 20 logged steps) relative to the plain run, and its bytes per step (`comm_bytes`, the collective
counter, after warm-up) relative to the plain run's.

    python bench/powersgd_job.py --data-root DIR [--steps 300] [--rank 4] [--warmup 10[,60,...]] [--no-ef]
                                 [overrides...]

Several warm-up lengths (a comma list) run as separate PowerSGD variants in the same launch; `--no-ef` adds
an error-feedback-off run for each. Besides the last-20 mean, each line gives the ratio of 20-step loss means
to the plain run's at steps 60, 100, 150, 200, 250, 300 (`gap`): where the gap opens.

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
    p.add_argument("--warmup", default="10", help="PowerSGD warm-up steps; a comma list runs each")
    p.add_argument("--no-ef", action="store_true", help="also run PowerSGD without error feedback")
    args, overrides = p.parse_known_args(argv)
    from megaseek.distributed.spawn import run_world
    overrides = [f"train.steps={args.steps}", "train.save_interval=100000"] + overrides
    warmups = [int(w) for w in str(args.warmup).split(",")]
    variants, warm_of = [("plain", [])], {"plain": 0}
    for w in warmups:
        psgd = [f"parallel.powersgd.rank={args.rank}", f"parallel.powersgd.warmup_steps={w}"]
        tag = "" if len(warmups) == 1 else f"_w{w}"
        variants.append((f"powersgd{tag}", psgd))
        warm_of[f"powersgd{tag}"] = w
        if args.no_ef:
            variants.append((f"powersgd_no_ef{tag}", psgd + ["parallel.powersgd.error_feedback=false"]))
            warm_of[f"powersgd_no_ef{tag}"] = w
    res = run_world(2, _runs, args.out, args.data_root, variants, overrides, timeout=6 * 3600)[0]
    mean20 = lambda recs, end: sum(r["loss"] for r in recs[end - 20:end]) / 20  # noqa: E731  (steps end-19..end)
    base = res["plain"]["records"]
    for name, _ in variants:
        recs = res[name]["records"]
        w = max(warm_of[name], max(warmups))  # bytes: after every run's warm-up
        after = lambda rr: sum(r["comm_bytes"] for r in rr[w + 1:]) / len(rr[w + 1:])  # noqa: E731
        n = len(recs)
        print(json.dumps({"run": name, "warmup": warm_of[name], "steps": n,
                          "loss_last20": round(mean20(recs, n), 4),
                          "loss_vs_plain": round(mean20(recs, n) / mean20(base, n), 4),
                          "gap": {s: round(mean20(recs, s) / mean20(base, s), 4)
                                  for s in (60, 100, 150, 200, 250, 300) if s <= n},
                          "bytes_per_step": round(after(recs)), "bytes_vs_plain": round(after(recs) / after(base), 4),
                          "wall_s": round(res[name]["wall_s"], 1)}))


if __name__ == "__main__":
    main()
