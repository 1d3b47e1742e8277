"""Causal self-attention with RoPE and grouped-query heads (`model.attention: gqa`), query heads split across
tensor ranks; optional document masks (packed sequences, left padding) and a KV cache.

Shapes: b batch, s query length, S key length (cache + new), h hidden, p tensor degree, nh / nkv query / kv
heads, d head dim. Masks are boolean (b, 1, s, S), True = may attend.

Masks: without documents or a cache the mask is plain causal and SDPA's `is_causal` is used. Otherwise query
i (cache index L + i) may attend key j when j <= L + i and both carry the same document id. Padding gets its
own document id (-1), so pads attend only to pads (no empty softmax row, no NaN) and real tokens never see
them. (`is_causal=True` aligns its triangle top-left, which is wrong when s < S: never used with a cache.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.model.config import ModelConfig
from megaseek.model.layers import apply_rope, fused_dense
from megaseek.tensor_parallel.layers import (ColumnParallelLinear, FusedColumnParallelLinear, RowParallelLinear, TPContext,
                                             expose_unfused_state, mark_sharded, master_normal)
from megaseek.tensor_parallel.gemm import linear
from megaseek.tensor_parallel.random import RNGTracker


def attention_mask(doc_q: torch.Tensor, doc_k: torch.Tensor, offset: int) -> torch.Tensor:
    """(b, 1, s, S) bool: causal in cache index (key j <= offset + query i) and the same document."""
    s, S = doc_q.shape[1], doc_k.shape[1]
    qi = torch.arange(s, device=doc_q.device).view(s, 1) + offset
    kj = torch.arange(S, device=doc_q.device).view(1, S)
    causal = (kj <= qi).unsqueeze(0)  # (1, s, S)
    same = doc_q.unsqueeze(-1) == doc_k.unsqueeze(1)  # (b, s, S)
    return (causal & same).unsqueeze(1)


class KVProjection(nn.Module):
    """K (or V) projection for grouped-query attention under tensor parallelism; its weight is always
    `weight` (nkv d, h) at tp = 1, so its name does not depend on the layout.

    nkv >= p: column-parallel, rank i holds kv heads [i nkv/p, (i+1) nkv/p) (weight (nkv d / p, h)).
    nkv <  p: every rank holds the full (nkv d, h) weight (replicated) and uses the one head its query
              heads need, head (i * nkv) // p; the ranks sharing a head each hold a partial dW, summed by
              `ctx.replicated_weight` (all-reduce of dW).
    """

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int):
        super().__init__()
        d, nkv = cfg.head_dim, cfg.num_kv_heads
        self.ctx, self.d = ctx, d
        self.replicated = nkv < ctx.size
        full = master_normal((nkv * d, cfg.hidden_size), cfg.init_std, seed)  # (nkv d, h)
        if self.replicated:
            self.weight = nn.Parameter(full)
            self.head = (ctx.rank * nkv) // ctx.size
            self.local_heads = 1
        else:
            self.weight = nn.Parameter(full.chunk(ctx.size, dim=0)[ctx.rank].clone())  # (nkv d / p, h)
            mark_sharded(self.weight, 0, ctx)
            self.local_heads = nkv // ctx.size

    def forward(self, x_parallel: torch.Tensor) -> torch.Tensor:
        if self.replicated:
            w = self.ctx.replicated_weight(self.weight)[self.head * self.d:(self.head + 1) * self.d]  # (d, h)
            return linear(x_parallel, w)  # (b, s, d)
        return linear(x_parallel, self.weight)  # (b, s, nkv d / p)


class GQAAttention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads; query heads split across tensor ranks.

    `model.fused` (dense gqa + swiglu models, nkv >= p): q, k and v come from ONE column-parallel GEMM,
    `qkv_proj`, grouped by kv head (FusedColumnParallelLinear, G = nkv): weight ((nh + 2 nkv) d / p, h) on
    rank i = for each of its nkv/p kv heads g, the rows of query heads g r .. g r + r - 1 (r = nh / nkv), of
    k_g and of v_g: rank i's nh/p query heads and its nkv/p kv heads, as the unfused q_proj / KVProjection
    layers hold them, so no extra communication; the gathered tensor is the same at every p. With nkv < p
    the kv heads are replicated (KVProjection) and the layer stays unfused. state_dict() and checkpoints
    hold q_proj / k_proj / v_proj either way.
    """

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        h, d = cfg.hidden_size, cfg.head_dim
        return h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o, k, v (all matmul)

    @staticmethod
    def score_flops(cfg: ModelConfig, seq_len: int) -> int:
        """Forward FLOPs per token of QK^T and AV (not halved for the causal mask)."""
        return 4 * seq_len * cfg.num_heads * cfg.head_dim

    @staticmethod
    def recompute_params(cfg: ModelConfig) -> int:
        """Matmul weights re-run by selective recomputation (the attention sub-layer's q, k, v)."""
        return 2 * cfg.hidden_size * (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int, out_std: float, rng: Optional[RNGTracker]):
        super().__init__()
        self.ctx, self.d, self.rng = ctx, cfg.head_dim, rng
        self.dropout = cfg.dropout
        self.n_local = cfg.num_heads // ctx.size
        h = cfg.hidden_size
        self.fused = fused_dense(cfg) and cfg.num_kv_heads >= ctx.size
        if self.fused:
            nq, nkv = cfg.num_heads * self.d, cfg.num_kv_heads * self.d
            self.qkv_proj = FusedColumnParallelLinear(  # grouped by kv head; the unfused seeds: the same weights
                h, [("q_proj", nq, seed + 1), ("k_proj", nkv, seed + 2), ("v_proj", nkv, seed + 3)],
                cfg.num_kv_heads, ctx, std=cfg.init_std)
            self.kv_local = cfg.num_kv_heads // ctx.size
            expose_unfused_state(self, "qkv_proj")
        else:
            self.q_proj = ColumnParallelLinear(h, cfg.num_heads * self.d, ctx, std=cfg.init_std, seed=seed + 1)
            self.k_proj = KVProjection(cfg, ctx, seed + 2)
            self.v_proj = KVProjection(cfg, ctx, seed + 3)
            self.kv_local = self.k_proj.local_heads
        self.o_proj = RowParallelLinear(cfg.num_heads * self.d, h, ctx, std=out_std, seed=seed + 4)

    def cache_shape(self) -> tuple[int, int]:
        """(kv heads, head dim) this rank caches per token."""
        return self.kv_local, self.d

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        xp = self.ctx.enter(x)  # (b, s, h): one entry shared by q, k, v
        b, s, _ = xp.shape
        if self.fused:  # one GEMM; per local kv group g: (r d) query rows, d key rows, d value rows
            q, k, v = self.qkv_proj(xp)  # (b, s, nkv/p, r d), (b, s, nkv/p, d) x 2: views
            q = q.reshape(b, s, self.n_local, self.d)  # query head g r + j (one copy: rope reads it anyway)
        else:
            q, k, v = self.q_proj(xp), self.k_proj(xp), self.v_proj(xp)
        q = q.view(b, s, self.n_local, self.d).transpose(1, 2)  # (b, nh/p, s, d)
        k = k.view(b, s, self.kv_local, self.d).transpose(1, 2)  # (b, nkv_local, s, d)
        v = v.view(b, s, self.kv_local, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)  # (b, nkv_local, S, d): the cached keys then these
        p = self.dropout if self.training else 0.0
        causal = mask is None
        if p > 0 and self.rng is not None:
            with self.rng.fork():  # heads differ per tensor rank: their dropout masks must too
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p,
                                                   enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=p, enable_gqa=True)
        o = o.transpose(1, 2).reshape(b, s, self.n_local * self.d)  # (b, s, nh d / p)
        return self.o_proj(o)  # (b, s, h), or (b, s/p, h) with SP
