"""Decoding with the KV-cache ONNX graph (megaseek/export/onnx_kv.py) in ONNX Runtime: the onnxruntime backend of
launch/generate.py.

The graph takes no padding mask, so rows are batched only with rows of the same prompt length (up to
`batch_size` of them): no row is ever padded, and since a row's tokens never depend on its batch-mates, the
result equals the PyTorch generator's (megaseek/model/generate.py) row for row. Token choice is the PyTorch
generator's own `choose_tokens` (greedy arg-max, or temperature / top-k / top-p sampling from a generator
seeded by (seed, row id)), applied to the graph's last-position logits.

    step t = 0: input_ids (b, P), past (L, b, nkv, 0, d)    -> logits (b, P, V), present (L, b, nkv, P, d)
    step t > 0: input_ids (b, 1), past = the last present    -> logits (b, 1, V), present (..., P + t, d)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from megaseek.export.onnx_kv import NAMES_IN, NAMES_OUT
from megaseek.model.generate import SamplingConfig, choose_tokens, row_generator


def check_kv_graph(sess, where: str | Path) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of a KV-cache graph; ValueError naming the file when it is not one."""
    ins = {i.name: i.shape for i in sess.get_inputs()}
    if tuple(ins) != NAMES_IN:
        raise ValueError(f"{where}: not a KV-cache graph (inputs {list(ins)}, expected {list(NAMES_IN)}); "
                         f"export one with launch/export_onnx.py kv_cache=true")
    L, _, nkv, _, d = ins["past_keys"]
    if not all(isinstance(x, int) for x in (L, nkv, d)):
        raise ValueError(f"{where}: past_keys shape {ins['past_keys']} has no fixed (layers, kv heads, head dim)")
    return L, nkv, d


def _decode_group(sess, dims, prompts: list, cfg: SamplingConfig, rows: list) -> list[list[int]]:
    """New tokens of equal-length prompts decoded together (b, P) with the graph."""
    L, nkv, d = dims
    b = len(prompts)
    ids = np.asarray(prompts, dtype=np.int64)  # (b, P)
    pk = np.zeros((L, b, nkv, 0, d), dtype=np.float32)
    pv = pk.copy()
    gens = [row_generator(cfg.seed, r) for r in rows]
    seen = [list(p) for p in prompts]
    stop = set(int(t) for t in cfg.stop_tokens)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for _ in range(cfg.max_new_tokens):
        z, pk, pv = sess.run(list(NAMES_OUT), {"input_ids": ids, "past_keys": pk, "past_values": pv})
        tok = choose_tokens(torch.from_numpy(z[:, -1]), cfg, gens, seen)  # (b,)
        for r in range(b):
            if not done[r]:
                t = int(tok[r])
                out[r].append(t)
                seen[r].append(t)
                done[r] = t in stop
        if all(done):
            break
        ids = tok.numpy().astype(np.int64)[:, None]  # (b, 1); finished rows keep decoding, their tokens unused
    return out


def ort_generate(sess, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, row_ids: Sequence[int] | None = None,
                 batch_size: int = 16, max_seq_len: int | None = None, where: str = "onnx") -> list[list[int]]:
    """New tokens for each prompt (a stop token, when produced, ends its row and is included), as
    megaseek.model.generate.generate returns them."""
    cfg.validate()
    dims = check_kv_graph(sess, where)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("ort_generate: every prompt needs at least one token")
    if max_seq_len is not None and max(len(p) for p in prompts) + cfg.max_new_tokens > max_seq_len:
        raise ValueError(f"prompt + max_new_tokens ({cfg.max_new_tokens}) exceeds max_seq_len ({max_seq_len})")
    rows = list(row_ids) if row_ids is not None else list(range(len(prompts)))
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list = [None] * len(prompts)
    for idx in by_len.values():
        for k in range(0, len(idx), batch_size):
            part = idx[k:k + batch_size]
            new = _decode_group(sess, dims, [list(prompts[i]) for i in part], cfg, [rows[i] for i in part])
            for i, toks in zip(part, new):
                out[i] = toks
    return out
