"""Downstream evaluation during training: lm-eval tasks (`train.eval_tasks`) scored on the live model every
`train.eval_interval` steps, and the batch-1 latency of the KV-cached generator beside the scores.

    DownstreamEval(t) -> {"eval/<task>/<metric>": score, "eval/<task>/samples": n,       (as lm-eval reports)
                          "eval/latency_ttft_ms_p50", "_p95", "eval/latency_decode_ms_p50", "_p95",
                          "eval/latency_prompt_tokens", "eval/latency_new_tokens",
                          "eval/seconds": wall time of the whole evaluation}

It is a `Metrics` extra hook: it runs in the log step after that step's record (step time, tokens/s) is
measured and before the throughput clock restarts, so its own time is reported (`eval/seconds`) and not
counted in tokens/s. As a callback it also scores the model before the first step of a fresh run (step 0:
the untrained baseline), logged as a record of its own, and restarts the throughput clock after.

Every rank takes part and runs the same requests (megaseek/eval/live.py: gathered logits over the tensor
group, logits broadcast from the last pipeline stage, the generator in lockstep over the world); the scores
are equal on every rank. Rank 0 writes per-example results to run_dir/eval/step<N>/<task>.jsonl when
`train.eval_log_samples`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from megaseek.config.schema import ConfigError
from megaseek.train.trainer import Callback


def check_eval_tasks(train) -> None:
    """Refuse a bad `train.eval_tasks` setting before any model is built (names checked against the task
    directories and lm-eval's index)."""
    tasks = list(train.eval_tasks or [])
    if not tasks:
        return
    if int(train.eval_interval) <= 0:
        raise ConfigError(f"train.eval_tasks={tasks} needs train.eval_interval > 0 (the steps between evaluations)")
    if int(train.eval_interval) % int(train.log_interval):
        raise ConfigError(f"train.eval_interval={train.eval_interval} must be a multiple of train.log_interval="
                          f"{train.log_interval}: evaluations run at log steps")
    if train.eval_limit is not None and int(train.eval_limit) < 1:
        raise ConfigError(f"train.eval_limit={train.eval_limit} must be >= 1 (null: every example)")
    if int(train.eval_batch_size) < 1:
        raise ConfigError(f"train.eval_batch_size={train.eval_batch_size} must be >= 1")
    if int(train.eval_latency_tokens) == 1 or int(train.eval_latency_tokens) < 0:
        raise ConfigError(f"train.eval_latency_tokens={train.eval_latency_tokens}: 0 (off) or >= 2")
    from megaseek.eval.downstream import task_manager
    try:
        task_manager(tasks, train.eval_tasks_path)
    except ValueError as e:
        key = "train.eval_tasks_path" if "tasks_path" in str(e) else "train.eval_tasks"
        raise ConfigError(f"{key}: {e}") from None


class DownstreamEval(Callback):
    """Scores and latency of the live model (`model`: this rank's Decoder or pipeline stage; `pipe`: its
    PipelinePeers or None). `train`: the TrainConfig slice."""

    def __init__(self, model, pipe, tokenizer_path: Path, train, run_dir: Path, rank: int, log=print):
        from megaseek.data.tokenizer import load_tokenizer
        from megaseek.eval.live import LiveModel
        self.live = LiveModel(model, pipe)
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.tasks, self.tasks_path = list(train.eval_tasks), train.eval_tasks_path
        self.limit = None if train.eval_limit is None else int(train.eval_limit)
        self.batch_size = int(train.eval_batch_size)
        self.every, self.steps, self.latency_tokens = int(train.eval_interval), int(train.steps), int(train.eval_latency_tokens)
        self.log_samples, self.run_dir, self.rank, self.log = bool(train.eval_log_samples), Path(run_dir), rank, log
        self.metrics = None  # the Metrics callback (set by the job): its hub logs the step-0 record
        self._prompt: Optional[list] = None

    def due(self, step: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or step == self.steps)

    def evaluate(self, step: int) -> dict:
        """Every rank: the tasks, then the latency; flat metrics."""
        from megaseek.eval.downstream import run_tasks
        t0 = time.perf_counter()
        samples = self.run_dir / "eval" / f"step{step}" if self.log_samples and self.rank == 0 else None
        out = run_tasks(self.live.logits_fn, self.tokenizer, self.tasks, self.tasks_path, self.limit,
                        max_length=self.live.max_length, batch_size=self.batch_size,
                        generate_fn=self.live.generate_fn, samples_dir=samples)
        if self.latency_tokens:
            out.update(self._latency())
        out["eval/seconds"] = time.perf_counter() - t0
        shown = {k: round(v, 4) for k, v in out.items() if k.rsplit("/", 1)[-1].startswith(("acc", "exact"))}
        self.log(f"[eval] step {step}: {shown}, {out['eval/seconds']:.1f}s")
        return out

    def _latency(self) -> dict:
        from megaseek.eval.latency import latency_prompt, measure_latency
        n = self.latency_tokens
        if self._prompt is None:
            self._prompt = latency_prompt(self.tokenizer, min(256, self.live.max_length - n))
        return measure_latency(self.live.model, self._prompt, new_tokens=n, pipeline=self.live.pipe)

    def __call__(self, t) -> dict:
        return self.evaluate(t.step) if self.due(t.step) else {}

    def on_fit_start(self, t) -> None:
        if t.step != 0 or not self.every:
            return  # resumed: the baseline was logged by the first run
        rec = {"step": 0, "samples": 0, **self.evaluate(0)}
        if self.metrics is not None and self.metrics.hub is not None:
            self.metrics.hub.log(rec)
            self.metrics.restart_clock()  # the baseline's time is not a training step's
