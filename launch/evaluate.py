"""Evaluate a checkpoint (tp = 1, CPU or whatever torch runs on): the loss of a text file, or downstream tasks.

    python launch/evaluate.py checkpoint=DIR text_file=held_out.txt [seq_len=256]
    python launch/evaluate.py checkpoint=DIR tasks=[stdlib_next_line,stdlib_return_line] [tasks_path=DIR]
                              [limit=N] [batch_size=8] [samples_dir=DIR]

Text mode prints one JSON line {"checkpoint", "text_file", "tokens", "loss", "perplexity"}: the text is tokenized
with the checkpoint's tokenizer.json after one EOS (as every document follows an EOS in training); each of its
`tokens` tokens is predicted once, in independent windows of seq_len (default model.max_seq_len); loss is the mean
token cross-entropy (nats), perplexity = exp(loss).

Task mode runs lm-evaluation-harness tasks through megaseek's lm-eval model (megaseek/eval/lm.py) and prints one
JSON line per task {"checkpoint", "task", "samples", <metric>: value...}: our held-out stdlib tasks
(megaseek/eval/tasks/), task YAMLs in `tasks_path` (as `lm_eval --include_path`), or lm-eval's own tasks whose data
is present locally. `samples_dir` writes each task's per-example results to DIR/<task>.jsonl.
Bad input exits with code 2 and one message.
"""
import json
import os
import sys


OPTIONAL = ("text_file", "seq_len", "tasks", "tasks_path", "limit", "batch_size", "samples_dir")


def _text(args: dict) -> dict:
    from megaseek.ckpt.hf import evaluate_text
    path = args["text_file"]
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such text file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text:
        raise ValueError(f"{path}: empty text file")
    seq_len = int(args["seq_len"]) if args.get("seq_len") else None
    res = evaluate_text(args["checkpoint"], text, seq_len)
    return {"checkpoint": res["checkpoint"], "text_file": os.path.abspath(path), "tokens": res["tokens"],
            "loss": res["loss"], "perplexity": res["perplexity"]}


def _int(args: dict, key: str):
    v = args.get(key)
    if not v:
        return None
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"{key}={v!r}: expected a positive integer")
    return int(v)


def _tasks(args: dict) -> list[dict]:
    from megaseek.ckpt.hf import resolve_checkpoint
    from megaseek.eval.downstream import evaluate, flat_metrics, task_manager, write_samples
    from megaseek.eval.lm import MegaseekLM
    names = [t.strip() for t in args["tasks"].strip().strip("[]").split(",") if t.strip()]
    if not names:
        raise ValueError(f"tasks={args['tasks']!r}: no task name")
    task_manager(names, args.get("tasks_path"))  # unknown names / bad tasks_path fail before the model loads
    ckpt = resolve_checkpoint(args["checkpoint"])
    lm = MegaseekLM(checkpoint=str(ckpt), batch_size=_int(args, "batch_size") or 8)
    res = evaluate(lm, names, args.get("tasks_path"), _int(args, "limit"), log_samples=bool(args.get("samples_dir")))
    if args.get("samples_dir"):
        write_samples(res, args["samples_dir"])
    flat, out = flat_metrics(res), []
    for task in names:
        row = {"checkpoint": str(ckpt), "task": task}
        row.update({k.split("/", 2)[2]: v for k, v in flat.items() if k.startswith(f"eval/{task}/")})
        out.append(row)
    return out


def main(argv: list[str]) -> int:
    from megaseek.ckpt.hf import CheckpointError, parse_cli
    try:
        args = parse_cli(argv, ("checkpoint",), OPTIONAL)
        if bool(args.get("text_file")) == bool(args.get("tasks")):
            raise ValueError("give exactly one of text_file=FILE or tasks=[...]")
        rows = [_text(args)] if args.get("text_file") else _tasks(args)
    except (CheckpointError, ValueError, UnicodeDecodeError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr, flush=True)
        return 2
    for row in rows:
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
