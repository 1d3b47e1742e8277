"""KV cache for decoding: per layer, this rank's keys and values of every token seen so far.

Preallocated (b, nkv_local, max_len, d) per layer; `length` tokens are filled. Document ids of the cached
tokens (b, max_len) ride along so new queries are masked against them (padding = -1). One cache per pipeline
stage, holding that stage's layers.
"""
from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, owner: "KVCache", index: int):
        self.owner, self.index = owner, index

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, nkv, s, d) after the cached tokens; return all keys and values (b, nkv, L + s, d)."""
        o = self.owner
        L, s = o.length, k.shape[2]
        if L + s > o.max_len:
            raise ValueError(f"KV cache full: {L} + {s} tokens > max_len {o.max_len}")
        if o.k[self.index] is None:
            b, n, _, d = k.shape
            o.k[self.index] = k.new_zeros(b, n, o.max_len, d)
            o.v[self.index] = v.new_zeros(b, n, o.max_len, d)
        kc, vc = o.k[self.index], o.v[self.index]
        kc[:, :, L:L + s] = k
        vc[:, :, L:L + s] = v
        return kc[:, :, :L + s], vc[:, :, :L + s]


class KVCache:
    def __init__(self, num_layers: int, batch: int, max_len: int, device=None):
        self.max_len, self.length = int(max_len), 0
        self.k: list = [None] * num_layers
        self.v: list = [None] * num_layers
        self.doc = torch.zeros(batch, max_len, dtype=torch.long, device=device)

    def layer(self, i: int) -> LayerCache:
        return LayerCache(self, i)

    def begin(self, doc_new: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Before a forward of s new tokens with document ids (b, s): returns (document ids of all keys
        (b, L + s), offset L)."""
        L, s = self.length, doc_new.shape[1]
        self.doc[:, L:L + s] = doc_new
        return self.doc[:, :L + s], L

    def commit(self, s: int) -> None:
        """After every layer appended its s new tokens."""
        self.length += s

    def values_per_token(self) -> int:
        """Cached values per token per layer on this rank (k and v: 2 nkv_local d)."""
        t = next((k for k in self.k if k is not None), None)
        return 0 if t is None else 2 * t.shape[1] * t.shape[3]
