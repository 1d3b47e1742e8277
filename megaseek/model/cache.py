"""KV cache for decoding: per layer, this rank's keys and values of every token seen so far.

Preallocated (b, nkv_local, max_len, d) per layer; `length` tokens are filled. Multi-head latent attention
(megaseek/model/mla.py) stores its latent instead: c_kv (b, 1, max_len, r) in the key slot and the shared
rotated key k_r (b, 1, max_len, d_r) in the value slot, r + d_r values per token per layer. Document ids of the cached
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
            o.k[self.index] = k.new_zeros(k.shape[0], k.shape[1], o.max_len, k.shape[3])
            o.v[self.index] = v.new_zeros(v.shape[0], v.shape[1], o.max_len, v.shape[3])
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
        """Cached values per token per layer on this rank (k and v: 2 nkv_local d; MLA's latent: r + d_r)."""
        i = next((i for i, k in enumerate(self.k) if k is not None), None)
        if i is None:
            return 0
        return self.k[i].shape[1] * self.k[i].shape[3] + self.v[i].shape[1] * self.v[i].shape[3]
