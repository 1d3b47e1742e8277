"""The KV-cache ONNX graph: one decoding step with the keys and values of the past as graph inputs.

    input_ids (batch, seq), past_keys / past_values (layers, batch, kv_heads, past, head_dim)
      -> logits (batch, seq, V), present_keys / present_values (layers, batch, kv_heads, past + seq, head_dim)

The model runs unchanged with a functional stand-in for its KV cache (same `begin` / `layer(i).append` /
`commit` interface as megaseek/model/cache.py) whose past length is the symbolic `past` axis: new tokens take
positions past, past + 1, ... and an explicit causal mask in cache index (never `is_causal`, which aligns
top-left and would be wrong for q_len < kv_len). Prefill is the same graph with past = 0.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

NAMES_IN = ("input_ids", "past_keys", "past_values")
NAMES_OUT = ("logits", "present_keys", "present_values")


class _Layer:
    def __init__(self, owner, i):
        self.owner, self.i = owner, i

    def append(self, k, v):
        o = self.owner
        kk = torch.cat([o.past_k[self.i], k], dim=2)  # (b, nkv, P + s, d)
        vv = torch.cat([o.past_v[self.i], v], dim=2)
        o.present_k.append(kk)
        o.present_v.append(vv)
        return kk, vv


class FunctionalCache:
    """past_k / past_v (L, b, nkv, P, d); every layer's keys then the new ones collected as presents."""

    def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor):
        self.past_k, self.past_v = past_k, past_v
        self.present_k, self.present_v = [], []

    def begin(self, doc_new: torch.Tensor):
        P = self.past_k.shape[3]
        doc_all = torch.zeros(doc_new.shape[0], P + doc_new.shape[1], dtype=doc_new.dtype, device=doc_new.device)
        return doc_all, P

    def layer(self, i: int) -> _Layer:
        return _Layer(self, i)

    def commit(self, s: int) -> None:
        pass


class KVStep(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.vocab = model, int(model.cfg.vocab_size)

    def forward(self, input_ids, past_keys, past_values):
        cache = FunctionalCache(past_keys, past_values)
        z = self.model(input_ids, cache=cache)[..., :self.vocab]  # (b, s, V)
        return z, torch.stack(cache.present_k), torch.stack(cache.present_v)


def cache_shape(model: nn.Module, batch: int, past: int) -> tuple:
    attn = model.layers[0].attn
    nkv, d = attn.cache_shape() if hasattr(attn, "cache_shape") else (attn.k_proj.local_heads, attn.d)
    return (len(model.layers), batch, nkv, past, d)


def export_kv_onnx(model: nn.Module, out: str | Path, opset: int = 18) -> Path:
    model = model.eval()
    S = int(model.cfg.max_seq_len)
    b, s, P = 2, 3, 5
    batch, seq = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("seq", min=1, max=S)
    past = torch.export.Dim("past", min=0, max=S)
    ids = torch.randint(0, model.cfg.vocab_size, (b, s))
    pk, pv = torch.randn(cache_shape(model, b, P)), torch.randn(cache_shape(model, b, P))
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(KVStep(model), (ids, pk, pv), str(out), dynamo=True, opset_version=opset,
                          input_names=list(NAMES_IN), output_names=list(NAMES_OUT), external_data=False,
                          verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "past_keys": {1: batch, 3: past},
                                          "past_values": {1: batch, 3: past}})
    return Path(out)


def ort_greedy(sess, model: nn.Module, prompt: np.ndarray, new: int) -> np.ndarray:
    """Greedy tokens (b, new) decoded with the KV-cache graph: prefill at past = 0, then one token per step."""
    b = prompt.shape[0]
    pk = np.zeros(cache_shape(model, b, 0), dtype=np.float32)
    pv = pk.copy()
    ids, out = prompt, []
    for _ in range(new):
        z, pk, pv = sess.run(list(NAMES_OUT), {"input_ids": ids, "past_keys": pk, "past_values": pv})
        ids = z[:, -1].argmax(-1)[:, None].astype(np.int64)
        out.append(ids)
    return np.concatenate(out, 1)


@torch.no_grad()
def validate_kv(sess, model: nn.Module, batch: int = 2, prompt_len: int = 7, new: int = 8, seed: int = 0) -> dict:
    """Greedy decoding through the graph vs PyTorch recomputing the whole prefix each step:
    {tokens_equal, max_abs_diff} (the logits of every step, prefill included)."""
    V = model.cfg.vocab_size
    ids = torch.randint(0, V, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
    pk = np.zeros(cache_shape(model, batch, 0), dtype=np.float32)
    pv, feed, worst, equal = pk.copy(), ids.numpy(), 0.0, True
    for _ in range(new):
        z, pk, pv = sess.run(list(NAMES_OUT), {"input_ids": feed, "past_keys": pk, "past_values": pv})
        ref = model(ids)[:, -z.shape[1]:, :V].numpy()  # (b, s, V): the positions this step computed
        worst = max(worst, float(np.abs(z - ref).max()))
        nxt_ref = ref[:, -1].argmax(-1)
        nxt = z[:, -1].argmax(-1)
        equal = equal and bool((nxt == nxt_ref).all())
        feed = nxt[:, None].astype(np.int64)
        ids = torch.cat([ids, torch.from_numpy(nxt_ref)[:, None]], 1)
    return {"tokens_equal": equal, "max_abs_diff": worst}
