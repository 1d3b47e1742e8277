"""Decoder building blocks: RMSNorm, rotary embeddings, the SwiGLU MLP (attention: attention.py).

Shapes: b = batch, s = sequence, h = hidden, p = tensor degree, nh / nkv = query / kv heads, d = head dim.
With sequence parallelism the residual stream is (b, s/p, h); otherwise (b, s, h) on every tensor rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.tensor_parallel.layers import (ColumnParallelLinear, FusedColumnParallelLinear, RowParallelLinear, TPContext,
                                             expose_unfused_state)
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


def rope_tables(seq_len: int, head_dim: int, theta: float, inv_freq: Optional[torch.Tensor] = None,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (s, d) in the Llama (rotate-half) layout: frequencies repeated over both halves, times
    `scale`. `inv_freq` (d/2,) float64: other frequencies than theta^(-2j/d) (YaRN: megaseek/model/rope.py)."""
    inv = inv_freq if inv_freq is not None else \
        1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (d/2,)
    ang = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)  # (s, d/2)
    emb = torch.cat([ang, ang], dim=-1)  # (s, d)
    return (emb.cos() * scale).float(), (emb.sin() * scale).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (b, n, s, d) rotated by position: x*cos + rotate_half(x)*sin; q.k then depends on positions only
    through their difference. cos/sin: (s, d) for positions 0..s-1, or (b, 1, s, d) for given position ids."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rot * sin.to(x.dtype)


def rope_at(cos: torch.Tensor, sin: torch.Tensor, s: int, position_ids: Optional[torch.Tensor]):
    """The tables for a sequence: positions 0..s-1 -> (s, d); position ids (b, s) -> (b, 1, s, d)."""
    if position_ids is None:
        return cos[:s], sin[:s]
    return cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)


def fused_dense(cfg) -> bool:
    """`model.fused` applies to the dense Llama spec (attention gqa, mlp swiglu); MLA and MoE stay unfused."""
    return bool(getattr(cfg, "fused", False)) and cfg.attention == "gqa" and cfg.mlp == "swiglu"


class _SwiGLUInterleaved(torch.autograd.Function):
    """a = silu(g) * u on the fused gate/up GEMM's output y (..., 2 n), whose columns alternate g_c, u_c.

    The same arithmetic as `F.silu(g) * u` on the two strided views (da/dg = da u silu'(g), da/du = da silu(g)),
    without their cost on CPU: elementwise kernels on stride-2 views run scalar (silu's exp ~8x slower), and
    the autograd of `split` re-interleaves dg and du with a cat of size-1 pieces. Here g is copied once to a
    contiguous tensor, and dy is written into its two interleaved halves directly."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        yv = y.view(*y.shape[:-1], -1, 2)  # (..., n, 2): [..., c, 0] = g_c, [..., c, 1] = u_c
        g, u = yv[..., 0].contiguous(), yv[..., 1]  # (..., n) contiguous, (..., n) stride 2
        sg = F.silu(g)
        ctx.save_for_backward(g, u, sg)
        return sg * u  # (..., n)

    @staticmethod
    def backward(ctx, da: torch.Tensor) -> torch.Tensor:
        g, u, sg = ctx.saved_tensors
        dy = torch.empty(*g.shape, 2, dtype=da.dtype, device=da.device)  # (..., n, 2)
        dy[..., 0] = torch.ops.aten.silu_backward(da * u, g)  # da u silu'(g): contiguous, then one strided copy
        torch.mul(da, sg, out=dy[..., 1])  # da silu(g) (silu_backward into a strided out= runs scalar: 2x slower)
        return dy.view(*g.shape[:-1], -1)  # (..., 2 n)


def swiglu_interleaved(y: torch.Tensor) -> torch.Tensor:
    """(..., 2 n) with columns g_0, u_0, g_1, u_1, .. -> silu(g) * u (..., n) (eager; SwiGLU.forward does
    otherwise under torch.compile)."""
    return _SwiGLUInterleaved.apply(y)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up column-parallel (i/p each), down row-parallel.

    `model.fused` (dense gqa + swiglu models): gate and up are ONE column-parallel GEMM, `gate_up_proj`,
    grouped by column (FusedColumnParallelLinear, G = i): weight (2 i/p, h) on rank i = rows g_c, u_c for
    each of its own i/p columns c, so silu(g) * u pairs the same columns as unfused and needs no extra
    communication; the gathered tensor is the same at every p. state_dict() and checkpoints hold gate_proj /
    up_proj.
    """

    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        return 3 * cfg.hidden_size * cfg.intermediate_size  # all matmul weights

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int, out_std: float):
        super().__init__()
        self.ctx = ctx
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.fused = fused_dense(cfg)
        if self.fused:
            self.gate_up_proj = FusedColumnParallelLinear(h, [("gate_proj", i, seed + 5), ("up_proj", i, seed + 6)],
                                                          i, ctx, std=cfg.init_std)  # grouped by column
            expose_unfused_state(self, "gate_up_proj")
        else:
            self.gate_proj = ColumnParallelLinear(h, i, ctx, std=cfg.init_std, seed=seed + 5)
            self.up_proj = ColumnParallelLinear(h, i, ctx, std=cfg.init_std, seed=seed + 6)
        self.down_proj = RowParallelLinear(i, h, ctx, std=out_std, seed=seed + 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xp = self.ctx.enter(x)  # (b, s, h)
        if self.fused and torch.compiler.is_compiling():  # the compiler fuses silu * up on contiguous halves
            g, u = self.gate_up_proj(xp, layout="part_major")  # (b, s, i/p) each
            a = F.silu(g) * u  # (b, s, i/p)
        elif self.fused:
            a = swiglu_interleaved(self.gate_up_proj(xp, layout="flat"))  # (b, s, 2 i/p): g_c, u_c -> (b, s, i/p)
        else:
            a = F.silu(self.gate_proj(xp)) * self.up_proj(xp)  # (b, s, i/p)
        return self.down_proj(a)  # (b, s, i/p) -> (b, s|s/p, h)


def scaled_out_std(cfg: ModelConfig) -> float:
    """GPT-2 / Megatron scaled init: residual-branch outputs get std / sqrt(2 L)."""
    return cfg.init_std / math.sqrt(2.0 * cfg.num_layers)
