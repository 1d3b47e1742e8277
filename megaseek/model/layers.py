"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

Shapes: b = batch, s = sequence, h = hidden, p = tensor degree, nh / nkv = query / kv heads, d = head dim.
With sequence parallelism the residual stream is (b, s/p, h); otherwise (b, s, h) on every tensor rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.tensor_parallel.layers import ColumnParallelLinear, RNGTracker, RowParallelLinear, TPContext, master_normal
from megaseek.model.config import ModelConfig


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w. With SP each rank normalizes its sequence slice, so dW is partial
    and the weight passes through `ctx.replicated_weight` (all-reduce of dW)."""

    def __init__(self, dim: int, eps: float, ctx: Optional[TPContext] = None):
        super().__init__()
        self.eps, self.ctx = eps, ctx
        self.weight = nn.Parameter(torch.ones(dim))
        if ctx is not None and ctx.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.ctx is not None and self.ctx.sequence_parallel:
            w = self.ctx.replicated_weight(w)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * w


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (s, d) in the Llama (rotate-half) layout: frequencies repeated over both halves."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (d/2,)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)  # (s, d/2)
    emb = torch.cat([ang, ang], dim=-1)  # (s, d)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, n, s, d) rotated by position: x*cos + rotate_half(x)*sin; q.k then depends on positions only
    through their difference."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


class KVProjection(nn.Module):
    """K (or V) projection for grouped-query attention under tensor parallelism.

    nkv >= p: column-parallel, rank i holds kv heads [i nkv/p, (i+1) nkv/p).
    nkv <  p: every rank holds the full (nkv d, h) weight (replicated) and uses the one head its query
              heads need, head (i * nkv) // p; the ranks sharing a head each hold a partial dW, summed by
              `ctx.replicated_weight` (all-reduce of dW).
    """

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int):
        super().__init__()
        d, nkv = cfg.head_dim, cfg.num_kv_heads
        self.ctx, self.d = ctx, d
        self.replicated = nkv < ctx.size
        if self.replicated:
            self.weight = nn.Parameter(master_normal((nkv * d, cfg.hidden_size), cfg.init_std, seed))  # (nkv d, h)
            self.head = (ctx.rank * nkv) // ctx.size
            self.local_heads = 1
        else:
            self.proj = ColumnParallelLinear(cfg.hidden_size, nkv * d, ctx, std=cfg.init_std, seed=seed)
            self.local_heads = nkv // ctx.size

    def forward(self, x_parallel: torch.Tensor) -> torch.Tensor:
        if self.replicated:
            w = self.ctx.replicated_weight(self.weight)[self.head * self.d:(self.head + 1) * self.d]  # (d, h)
            return F.linear(x_parallel, w)  # (b, s, d)
        return self.proj(x_parallel)  # (b, s, nkv d / p)


class Attention(nn.Module):
    """Causal self-attention with RoPE and grouped-query heads; query heads split across tensor ranks."""

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int, out_std: float, rng: Optional[RNGTracker]):
        super().__init__()
        self.ctx, self.d, self.rng = ctx, cfg.head_dim, rng
        self.dropout = cfg.dropout
        self.n_local = cfg.num_heads // ctx.size
        h = cfg.hidden_size
        self.q_proj = ColumnParallelLinear(h, cfg.num_heads * self.d, ctx, std=cfg.init_std, seed=seed + 1)
        self.k_proj = KVProjection(cfg, ctx, seed + 2)
        self.v_proj = KVProjection(cfg, ctx, seed + 3)
        self.o_proj = RowParallelLinear(cfg.num_heads * self.d, h, ctx, std=out_std, seed=seed + 4)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xp = self.ctx.enter(x)  # (b, s, h): one entry shared by q, k, v
        b, s, _ = xp.shape
        q = self.q_proj(xp).view(b, s, self.n_local, self.d).transpose(1, 2)  # (b, nh/p, s, d)
        k = self.k_proj(xp).view(b, s, self.k_proj.local_heads, self.d).transpose(1, 2)  # (b, nkv_local, s, d)
        v = self.v_proj(xp).view(b, s, self.v_proj.local_heads, self.d).transpose(1, 2)
        q, k = apply_rope(q, cos[:s], sin[:s]), apply_rope(k, cos[:s], sin[:s])
        p = self.dropout if self.training else 0.0
        if p > 0 and self.rng is not None:
            with self.rng.fork():  # heads differ per tensor rank: their dropout masks must too
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=True)
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, enable_gqa=True)
        o = o.transpose(1, 2).reshape(b, s, self.n_local * self.d)  # (b, s, nh d / p)
        return self.o_proj(o)  # (b, s, h), or (b, s/p, h) with SP


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up column-parallel (i/p each), down row-parallel."""

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int, out_std: float):
        super().__init__()
        self.ctx = ctx
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = ColumnParallelLinear(h, i, ctx, std=cfg.init_std, seed=seed + 5)
        self.up_proj = ColumnParallelLinear(h, i, ctx, std=cfg.init_std, seed=seed + 6)
        self.down_proj = RowParallelLinear(i, h, ctx, std=out_std, seed=seed + 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = self.ctx.enter(x)  # (b, s, h)
        return self.down_proj(F.silu(self.gate_proj(xp)) * self.up_proj(xp))  # (b, s, i/p) -> (b, s|s/p, h)


def scaled_out_std(cfg: ModelConfig) -> float:
    """GPT-2 / Megatron scaled init: residual-branch outputs get std / sqrt(2 L)."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
