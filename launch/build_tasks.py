"""Build the downstream task files (JSONL + lm-eval YAML) from held-out stdlib text, with a fixed seed:

    python launch/build_tasks.py [out=DIR] [seed=1234] [max_bytes=16000000]

Writes into megaseek/eval/tasks/ by default (the committed copy); prints the manifest's counts as one JSON line.
"""
import json
import sys
from pathlib import Path



def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import parse_cli
    from megaseek.eval.build import DEFAULT_MAX_BYTES, SEED, TASKS_DIR, build
    try:
        args = parse_cli(argv, (), ("out", "seed", "max_bytes"))
        man = build(Path(args.get("out") or TASKS_DIR), int(args.get("seed") or SEED),
                    int(args.get("max_bytes") or DEFAULT_MAX_BYTES))
    except (ValueError, RuntimeError) as e:
        print(f"build_tasks: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps({"counts": man["counts"], "held_out_files": len(man["held_out_files"]),
                      "python": man["python"], "seed": man["seed"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
