"""`python launch/plan.py [hydra overrides] [--world N] [--top K] [--no-search] [--check] [--env]`

Prints the plan of the configured layout (memory per GPU by part, fit, bubble, communication, step time,
tokens/s, MFU) and the best layouts that fit at the same world size. Exit status 2 when the configured
layout is refused (does not divide the world, does not fit, or fails validate()), with the numbers.
`--env` prints the preset's NCCL settings as `export K=V` lines (the Slurm script evaluates them).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="launch/plan.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=None, help="world size (default: the preset's nodes x GPUs)")
    ap.add_argument("--top", type=int, default=5, help="how many of the best layouts to list")
    ap.add_argument("--no-search", action="store_true", help="only the configured layout")
    ap.add_argument("--check", action="store_true", help="quiet unless refused (for launch scripts)")
    ap.add_argument("--env", action="store_true", help="print the preset's NCCL settings as export lines")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak per rank (default: preset; CPU: measured)")
    return ap.parse_known_args(argv)


def main(argv: Optional[list[str]] = None, out=sys.stdout) -> int:
    args, overrides = parse(sys.argv[1:] if argv is None else argv)
    from megaseek.config.schema import ConfigError, validate
    from megaseek.planner.hardware import Hardware
    from megaseek.planner.plan import make_plan, search
    from megaseek.planner.preflight import nccl_env
    from megaseek.planner.report import describe, table
    from megaseek.planner.setup import Setup

    cfg = compose(overrides)
    hw = Hardware.from_config(cfg)
    if args.env:
        for k, v in sorted(nccl_env(cfg).items()):
            print(f"export {k}={_quote(v)}", file=out)
        return 0
    world = args.world or (hw.world_size if "cluster" in cfg else int(os.environ.get("WORLD_SIZE", "1")))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None and not hw.is_gpu and not args.check:
        from megaseek.model.flops import measure_matmul_peak
        peak = measure_matmul_peak(seconds=0.3)
    setup = Setup.from_config(cfg, world)
    plan = make_plan(setup, hw, world, peak_flops=peak)
    try:
        validate(cfg, world, has_cuda=hw.is_gpu)
    except ConfigError as e:
        if str(e) not in " ".join(plan.problems):
            plan.problems.insert(0, str(e))
    if not (args.check and plan.ok):
        print(describe(plan, title="configured layout"), file=out)
    if not args.no_search and not args.check:
        best = search(setup, hw, world, top=args.top, peak_flops=peak)
        print(f"\n== best layouts that fit on {world} ranks (model, global batch, seq and precision as configured)",
              file=out)
        print(table(best) if best else "   none fits: use a larger cluster or a smaller model", file=out)
    return 0 if plan.ok else 2


def _quote(v: str) -> str:
    import shlex
    return shlex.quote(v)
