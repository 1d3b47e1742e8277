"""Plot a run: `python launch/plot.py run_dir=DIR [out=FILE.png]`.

Reads DIR/metrics.jsonl (and DIR/system/rank*.jsonl) and writes loss, throughput, MFU/HFU, step-time,
learning-rate and per-rank memory/CPU curves to one PNG (default DIR/metrics.png); records with downstream
scores (`eval/<task>/acc`..., from train.eval_tasks) add a row: the scores and the batch-1 latency against tokens seen."""
import os
import sys



def main(argv: list[str]) -> int:
    args = {}
    for a in argv:
        key, sep, value = a.lstrip("+").partition("=")
        if not sep or key not in ("run_dir", "out", "dpi"):
            print(f"usage: {sys.argv[0]} run_dir=DIR [out=FILE.png] [dpi=N]  (got {a!r})", file=sys.stderr)
            return 2
        args[key] = value
    if "run_dir" not in args:
        print(f"usage: {sys.argv[0]} run_dir=DIR [out=FILE.png] [dpi=N]", file=sys.stderr)
        return 2
    from megaseek.monitor.plot import plot_run
    if not os.path.exists(os.path.join(args["run_dir"], "metrics.jsonl")):
        print(f"no metrics.jsonl in {args['run_dir']}", file=sys.stderr)
        return 1
    out = plot_run(args["run_dir"], args.get("out"), dpi=int(args.get("dpi", 110)))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
