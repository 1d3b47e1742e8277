"""Run lm-eval tasks on a megaseek model and return flat metrics, for training callbacks and launch/evaluate.py.

    run_tasks(logits_fn, tokenizer, ["stdlib_next_line"], max_length=64)
      -> {"eval/stdlib_next_line/acc": 0.41, "eval/stdlib_next_line/acc_norm": 0.39,
          "eval/stdlib_next_line/samples": 200, "eval/seconds": 3.2}

Tasks are looked up in megaseek/eval/tasks/ (held-out stdlib tasks, see build.py), then in `tasks_path` (a
directory of task YAMLs, as `lm_eval --include_path`), then among lm-eval's own tasks (which need their data
present locally: nothing is downloaded on purpose). Metric keys are `eval/<task>/<metric>`; a metric computed
after a filter other than "none" is `<metric>_<filter>`; stderr values are left out (bootstrap off for speed).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Optional, Sequence

from megaseek.eval.build import TASKS_DIR

_SKIP = ("alias", "sample_len", " ")


def task_manager(task_names: Sequence[str], tasks_path: Optional[str | Path] = None):
    """An lm-eval TaskManager over our task directory (+ tasks_path); lm-eval's built-in index is read only
    when a requested name is not one of ours (it takes seconds to index)."""
    from lm_eval.tasks import TaskManager
    paths = [str(TASKS_DIR)]
    if tasks_path is not None:
        p = Path(tasks_path)
        if not p.is_dir():
            raise ValueError(f"tasks_path={p}: no such directory")
        paths.append(str(p.resolve()))
    tm = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in task_names if t not in tm.all_tasks]
    if missing:
        tm = TaskManager(include_path=paths, include_defaults=True)
        missing = [t for t in task_names if t not in tm.all_tasks]
        if missing:
            ours = sorted(t for t in tm.all_tasks if t.startswith("stdlib_"))
            raise ValueError(f"unknown task(s) {missing}: not in {paths} nor lm-eval's tasks (ours: {ours})")
    return tm


def evaluate(lm, task_names: Sequence[str], tasks_path: Optional[str | Path] = None, limit: Optional[int] = None,
             log_samples: bool = False) -> dict:
    """lm-eval's simple_evaluate on an LM instance (no cache, no bootstrap, fixed seeds): its results dict."""
    import lm_eval
    if not task_names:
        raise ValueError("tasks: give at least one task name")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local JSON only: never reach for the hub
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # lm-eval builds its results only where LOCAL_RANK is 0 (it assumes one scoring process per TP group); our LM
    # is a world of one on every rank and every rank computes the same numbers, so every rank gets them back.
    local = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    # lm-eval adds an environment report to every result (torch.utils.collect_env: pip, nvidia-smi and other
    # subprocesses, seconds each call); a training job evaluating every few hundred steps records versions only.
    import lm_eval.evaluator as ev
    env_info, ev.add_env_info = ev.add_env_info, _versions_only
    try:
        return lm_eval.simple_evaluate(model=lm, tasks=list(task_names),
                                       task_manager=task_manager(task_names, tasks_path), limit=limit,
                                       bootstrap_iters=0, log_samples=log_samples, num_fewshot=None)
    finally:
        ev.add_env_info = env_info
        if local is None:
            os.environ.pop("LOCAL_RANK", None)
        else:
            os.environ["LOCAL_RANK"] = local


def _versions_only(storage: dict) -> None:
    from importlib.metadata import version
    import torch
    storage.update({"pretty_env_info": f"torch {torch.__version__}", "lm_eval_version": version("lm_eval")})


def flat_metrics(results: dict) -> dict:
    """{"eval/<task>/<metric>": float, "eval/<task>/samples": n} from lm-eval's results dict."""
    out = {}
    for task, res in results["results"].items():
        for key, v in res.items():
            metric, _, filt = key.partition(",")
            if any(s in metric for s in _SKIP) or metric.endswith("_stderr") or not isinstance(v, (int, float)):
                continue
            out[f"eval/{task}/{metric if filt in ('', 'none') else f'{metric}_{filt}'}"] = float(v)
        n = results.get("n-samples", {}).get(task, {})
        if n:
            out[f"eval/{task}/samples"] = int(n.get("effective", n.get("original", 0)))
    return out


def write_samples(results: dict, out_dir: str | Path) -> None:
    """Each task's per-example results (log_samples=True) to out_dir/<task>.jsonl, one JSON object a line."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, samples in results["samples"].items():
        with open(out_dir / f"{task}.jsonl", "w") as f:
            for s in samples:
                f.write(json.dumps(s, default=str) + "\n")


def run_tasks(logits_fn, tokenizer, task_names: Sequence[str], tasks_path: Optional[str | Path] = None,
              limit: Optional[int] = None, max_length: Optional[int] = None, batch_size: int = 8,
              generate_fn=None, samples_dir: Optional[str | Path] = None) -> dict:
    """Score `logits_fn(ids (b, s)) -> logits (b, s, V)` on the tasks; flat metrics + "eval/seconds".

    Callable from a training callback on every rank of the job (all in lockstep; see lm.py and live.py).
    max_length: the model's context (model.max_seq_len), or a `max_length` attribute of logits_fn.
    generate_fn: the KV-cached generator for generate_until tasks (live.py); samples_dir: per-example
    results written there (<task>.jsonl), as launch/evaluate.py samples_dir= does."""
    import torch
    from megaseek.eval.lm import MegaseekLM
    max_length = max_length or getattr(logits_fn, "max_length", None)
    if not max_length:
        raise ValueError("run_tasks: max_length (the model's max_seq_len) is required")
    t0 = time.perf_counter()
    lm = MegaseekLM(logits_fn=logits_fn, tokenizer=tokenizer, max_length=max_length, batch_size=batch_size,
                    generate_fn=generate_fn)
    with torch.no_grad():
        res = evaluate(lm, task_names, tasks_path, limit, log_samples=samples_dir is not None)
    if samples_dir is not None:
        write_samples(res, samples_dir)
    out = flat_metrics(res)
    out["eval/seconds"] = time.perf_counter() - t0
    return out


def per_sample(results: dict, task: str, metric: str = "acc") -> dict:
    """doc_id -> the sample's metric value, from a results dict made with log_samples=True."""
    return {s["doc_id"]: s[metric] for s in results["samples"][task]}
