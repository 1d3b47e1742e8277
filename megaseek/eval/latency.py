"""Inference latency at batch 1: time to first token and per-token decode time (p50 / p95), greedy.

    ttft     = wall time of prefill(prompt) + the argmax of its last position (the first new token)
    decode_k = wall time of step k (k = 2..new_tokens): one more token from the state left by step k-1
    p50/p95  = nearest-rank-interpolated percentiles of decode_k (numpy's default 'linear' method)

A generator is any object with
    prefill(ids (1, s) long) -> (logits of the last position (1, V), state)
    step(state, token (1, 1) long) -> (logits (1, V), state)
`Recompute(logits_fn)` is the plain one: every step runs the whole prefix again (no KV cache). A KV-cached
generator (megaseek/model/generate.py, when it lands) plugs in through the same two methods.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch


class Recompute:
    """Greedy decoding by full recomputation on `logits_fn(ids (b, s)) -> logits (b, s, V)`."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]):
        self.logits_fn = logits_fn

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor):
        return self.logits_fn(ids)[:, -1], ids  # (1, V), the prefix so far

    @torch.no_grad()
    def step(self, state: torch.Tensor, token: torch.Tensor):
        ids = torch.cat([state, token], dim=1)  # (1, s + 1)
        return self.logits_fn(ids)[:, -1], ids


def measure_latency(prompt_ids: Sequence[int], new_tokens: int = 32, logits_fn=None, generator=None,
                    warmup: int = 1, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Latency figures of greedy decoding of `new_tokens` tokens after `prompt_ids` at batch 1.

    Returns {"eval/latency/ttft_s", "eval/latency/decode_p50_s", "eval/latency/decode_p95_s",
    "eval/latency/decode_tokens_per_s" (1 / mean decode step), "eval/latency/prompt_tokens",
    "eval/latency/new_tokens"}; `warmup` untimed runs first (allocator, kernels)."""
    if (logits_fn is None) == (generator is None):
        raise ValueError("measure_latency: pass exactly one of logits_fn or generator")
    if new_tokens < 2:
        raise ValueError(f"measure_latency: new_tokens={new_tokens} must be >= 2 (one prefill + decode steps)")
    if len(prompt_ids) < 1:
        raise ValueError("measure_latency: empty prompt")
    gen = generator or Recompute(logits_fn)
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)  # (1, s)
    ttft: Optional[float] = None
    steps: list[float] = []
    for run in range(warmup + 1):
        t0 = clock()
        z, state = gen.prefill(ids)
        tok = z.argmax(dim=-1, keepdim=True)  # (1, 1)
        t1 = clock()
        times = []
        for _ in range(new_tokens - 1):
            a = clock()
            z, state = gen.step(state, tok)
            tok = z.argmax(dim=-1, keepdim=True)
            times.append(clock() - a)
        if run == warmup:
            ttft, steps = t1 - t0, times
    d = np.asarray(steps)
    return {"eval/latency/ttft_s": float(ttft), "eval/latency/decode_p50_s": float(np.percentile(d, 50)),
            "eval/latency/decode_p95_s": float(np.percentile(d, 95)),
            "eval/latency/decode_tokens_per_s": float(1.0 / d.mean()),
            "eval/latency/prompt_tokens": len(prompt_ids), "eval/latency/new_tokens": new_tokens}
