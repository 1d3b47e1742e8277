"""Inference latency at batch 1 through the one KV-cached generator (megaseek.model.generate), greedy.

A forward pre-hook on the model stamps the start of each of the generator's forwards; one generation of n
tokens is n forwards (the prefill of the prompt, then one token each with the KV cache):

    t0       = the call of generate()
    f_i      = start of forward i (i = 0 .. n-1); token i is chosen after forward i, before forward i+1
    ttft     = f_1 - t0             (setup + prefill + the first token's choice)
    decode_i = f_{i+1} - f_i        (i = 1 .. n-2), and the return of generate() - f_{n-1} for the last token
    p50/p95  = numpy percentiles ('linear') of ttft over the timed repeats, and of decode over all their steps

Every rank of the job calls in lockstep (tensor ranks, pipeline stages, data-parallel ranks: the generator's
lockstep group is the world); each figure is the maximum over the ranks, so every rank reports the same.
"""
from __future__ import annotations

import time
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megaseek.eval.live import world_group
from megaseek.model.generate import PipelinePeers, SamplingConfig, generate

KEYS = ("eval/latency_ttft_ms_p50", "eval/latency_ttft_ms_p95", "eval/latency_decode_ms_p50",
        "eval/latency_decode_ms_p95")


def _max_over_world(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if world_group() is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def measure_latency(model, prompt_ids: Sequence[int], new_tokens: int = 16, repeats: int = 3, warmup: int = 1,
                    pipeline: Optional[PipelinePeers] = None, use_cache: bool = True,
                    clock: Callable[[], float] = time.perf_counter) -> dict:
    """{"eval/latency_ttft_ms_p50", "_p95", "eval/latency_decode_ms_p50", "_p95" (ms),
    "eval/latency_prompt_tokens", "eval/latency_new_tokens"} of greedy decoding of `new_tokens` tokens after
    `prompt_ids` at batch 1; `warmup` untimed generations first (allocator, kernels)."""
    if new_tokens < 2:
        raise ValueError(f"latency: new_tokens={new_tokens} must be >= 2 (a first token and decode steps)")
    if not prompt_ids:
        raise ValueError("latency: empty prompt")
    if repeats < 1:
        raise ValueError(f"latency: repeats={repeats} must be >= 1")
    if len(prompt_ids) + new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"latency: prompt ({len(prompt_ids)} tokens) + new_tokens ({new_tokens}) exceeds "
                         f"model.max_seq_len ({model.cfg.max_seq_len})")
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0, use_cache=use_cache)  # no stop: n tokens
    pipe = pipeline if pipeline is not None and pipeline.stages > 1 else None
    stamps: list[float] = []
    hook = model.register_forward_pre_hook(lambda m, args: stamps.append(clock()))
    ttft, decode = [], []
    try:
        for run in range(warmup + repeats):
            stamps.clear()
            t0 = clock()
            new = generate(model, [list(prompt_ids)], cfg, pipeline=pipe, sync_group=world_group())
            t_end = clock()
            if len(new[0]) != new_tokens or len(stamps) != new_tokens:
                raise RuntimeError(f"latency: {len(new[0])} tokens from {len(stamps)} forwards, "
                                   f"expected {new_tokens} of each")
            if run >= warmup:
                f = stamps + [t_end]  # (n + 1,)
                ttft.append(f[1] - t0)
                decode += [f[i + 1] - f[i] for i in range(1, new_tokens)]
    finally:
        hook.remove()
    figs = [np.percentile(ttft, 50), np.percentile(ttft, 95), np.percentile(decode, 50), np.percentile(decode, 95)]
    out = dict(zip(KEYS, (1000.0 * float(x) for x in _max_over_world([float(x) for x in figs]))))
    out.update({"eval/latency_prompt_tokens": len(prompt_ids), "eval/latency_new_tokens": new_tokens})
    return out


def latency_prompt(tokenizer, n_tokens: int) -> list[int]:
    """The first `n_tokens` tokens of the held-out functions of the stdlib_held_out_ppl task (text no run trains
    on), joined by blank lines: a fixed, realistic prompt."""
    import json
    from megaseek.eval.build import TASKS_DIR
    ids: list[int] = []
    with open(TASKS_DIR / "held_out_ppl.jsonl") as f:
        for line in f:
            ids += tokenizer.encode(json.loads(line)["text"] + "\n\n").ids
            if len(ids) >= n_tokens:
                break
    if len(ids) < n_tokens:
        raise ValueError(f"latency: the held-out text has {len(ids)} tokens, fewer than the {n_tokens} asked for")
    return ids[:n_tokens]
