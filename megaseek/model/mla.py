"""Multi-head Latent Attention (DeepSeek-V2/V3, `model.attention: mla`), heads split across tensor ranks.

Sizes: h hidden, n heads, p tensor degree, r = kv_lora_rank, r_q = q_lora_rank, d_n = qk_nope_head_dim,
d_r = qk_rope_head_dim, d_v = v_head_dim, d_qk = d_n + d_r.

    query:  c_q = RMSNorm(x W_qa)  (b, s, r_q)      q = c_q W_qb   (b, s, n d_qk)    [or q = x W_q when r_q is null]
    kv:     [c_kv | k_r] = x W_kva  (b, s, r + d_r); c_kv = RMSNorm(c_kv)
            [k_n | v] = c_kv W_kvb  (b, s, n (d_n + d_v))
    per head:  q = [q_n | RoPE(q_r)],  k = [k_n | RoPE(k_r)] (k_r shared by every head),  o = softmax(q k^T * scale) v
    scale = d_qk^-1/2 (DeepSeek's), times mscale(f, m_all)^2 under YaRN (megaseek/model/rope.py)
    y = [o_1 .. o_n] W_o

Tensor parallelism (Megatron-Core's MLA split): the down-projections W_qa, W_kva and their norms are replicated
and computed on the replicated stream, then the latent enters the parallel region (`ctx.enter`: identity
forward, all-reduce of d latent backward), so their gradients are whole on every rank; the up-projections
W_qb (W_q), W_kvb are column-parallel by heads (rank i holds heads [i n/p, (i+1) n/p)); W_o is row-parallel.
With sequence parallelism the down-projections see a sequence slice, their dW is partial and is summed by
`ctx.replicated_weight`, and the latent is all-gathered along the sequence.

Absorbed (inference) form: W_kvb per head = [W_uk (d_n, r); W_uv (d_v, r)], so
    q_n . k_n = (q_n W_uk) . c_kv            and  o = softmax(.) (c_kv W_uv^T) = (softmax(.) c_kv) W_uv^T,
attention runs over the latent itself (a single shared "kv head" of width r + d_r), and the KV cache holds only
c_kv and RoPE(k_r): r + d_r values per token per layer, whatever n.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from megaseek.model.config import ModelConfig
from megaseek.model.layers import RMSNorm, apply_rope
from megaseek.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, TPContext, master_normal
from megaseek.tensor_parallel.gemm import linear
from megaseek.tensor_parallel.random import RNGTracker


LATENT_NORM_EPS = 1e-6  # the latent RMSNorms' eps: fixed in DeepSeek's code and in transformers (not rms_norm_eps)


def softmax_scale(cfg: ModelConfig) -> float:
    """1 / sqrt(d_n + d_r): the query/key width including the rope part (DeepSeek-V2/V3); under YaRN times
    mscale(f, rope_mscale_all_dim)^2 (megaseek/model/rope.py)."""
    from megaseek.model.rope import softmax_mscale
    return (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5 * softmax_mscale(cfg)


class ReplicatedLinear(nn.Module):
    """y = x W^T with W (out, in) whole on every tensor rank (the MLA down-projections).

    Without sequence parallelism every rank sees the same x and the same dy (the latent enters the parallel
    region after this layer), so dW is whole and identical. With SP x is a sequence slice: dW is partial and
    `ctx.replicated_weight` all-reduces it."""

    def __init__(self, in_features: int, out_features: int, ctx: TPContext, *, std: float, seed: int):
        super().__init__()
        self.ctx = ctx
        self.weight = nn.Parameter(master_normal((out_features, in_features), std, seed))  # (out, in)
        if ctx.sequence_parallel:
            self.weight.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.ctx.replicated_weight(self.weight) if self.ctx.sequence_parallel else self.weight
        return linear(x, w)


class MLAttention(nn.Module):
    """Multi-head latent attention (see the module docstring); naive form for training, absorbed form with a
    cache (decoding) or when `absorb` is set."""

    # --- counts from the config alone (megaseek/model/spec.py) ---
    @staticmethod
    def num_params(cfg: ModelConfig) -> int:
        """Matmul weights: W_qa + W_qb (or W_q), W_kva, W_kvb, W_o."""
        h, n = cfg.hidden_size, cfg.num_heads
        d_qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        r, rq = cfg.kv_lora_rank, cfg.q_lora_rank
        q = h * n * d_qk if rq is None else h * rq + rq * n * d_qk
        return q + h * (r + cfg.qk_rope_head_dim) + r * n * (cfg.qk_nope_head_dim + cfg.v_head_dim) + n * cfg.v_head_dim * h

    @staticmethod
    def norm_params(cfg: ModelConfig) -> int:
        """The latent RMSNorms' weights (q_a_layernorm, kv_a_layernorm)."""
        return cfg.kv_lora_rank + (cfg.q_lora_rank or 0)

    @staticmethod
    def score_flops(cfg: ModelConfig, seq_len: int) -> int:
        """Forward FLOPs per token of QK^T (d_qk wide) and AV (d_v wide), naive form, causal mask not halved."""
        return 2 * seq_len * cfg.num_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)

    @staticmethod
    def recompute_params(cfg: ModelConfig) -> int:
        """Matmul weights re-run by selective recomputation: everything but W_o."""
        return MLAttention.num_params(cfg) - cfg.num_heads * cfg.v_head_dim * cfg.hidden_size

    @staticmethod
    def cache_values_per_token(cfg: ModelConfig) -> int:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim

    def __init__(self, cfg: ModelConfig, ctx: TPContext, seed: int, out_std: float, rng: Optional[RNGTracker]):
        super().__init__()
        self.ctx, self.rng, self.dropout = ctx, rng, cfg.dropout
        h, n = cfg.hidden_size, cfg.num_heads
        self.n_local = n // ctx.size
        self.d_n, self.d_r, self.d_v, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        d_qk = self.d_n + self.d_r
        self.scale = softmax_scale(cfg)
        self.absorb = False  # absorbed form without a cache too (tests, inference tools)
        std = cfg.init_std
        if cfg.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(h, n * d_qk, ctx, std=std, seed=seed + 1)
        else:
            self.q_a_proj = ReplicatedLinear(h, cfg.q_lora_rank, ctx, std=std, seed=seed + 11)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, ctx)
            self.q_b_proj = ColumnParallelLinear(cfg.q_lora_rank, n * d_qk, ctx, std=std, seed=seed + 1)
        self.kv_a_proj_with_mqa = ReplicatedLinear(h, self.r + self.d_r, ctx, std=std, seed=seed + 2)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_NORM_EPS, ctx)
        self.kv_b_proj = ColumnParallelLinear(self.r, n * (self.d_n + self.d_v), ctx, std=std, seed=seed + 3)
        self.o_proj = RowParallelLinear(n * self.d_v, h, ctx, std=out_std, seed=seed + 4)
        self.lora_q = cfg.q_lora_rank is not None

    def _latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (b, n/p, s, d_qk) with RoPE applied to its last d_r dims; c_kv (b, 1, s, r); k_r (b, 1, s, d_r) rotated."""
        if self.lora_q:
            cq = self.q_a_layernorm(self.q_a_proj(x))  # (b, s|s/p, r_q) replicated
            q = self.q_b_proj(self.ctx.enter(cq))  # (b, s, n d_qk / p)
        else:
            q = self.q_proj(self.ctx.enter(x))  # (b, s, n d_qk / p)
        kv = self.kv_a_proj_with_mqa(x)  # (b, s|s/p, r + d_r) replicated
        c, kr = kv.split([self.r, self.d_r], dim=-1)
        c = self.kv_a_layernorm(c)  # with SP: a sequence slice, dW summed by the norm
        lat = self.ctx.enter(torch.cat([c, kr], dim=-1))  # (b, s, r + d_r) in the parallel region
        b, s, _ = lat.shape
        c, kr = lat.split([self.r, self.d_r], dim=-1)
        q = q.view(b, s, self.n_local, self.d_n + self.d_r).transpose(1, 2)  # (b, n/p, s, d_qk)
        qn, qr = q.split([self.d_n, self.d_r], dim=-1)
        qr = apply_rope(qr, cos, sin)  # (b, n/p, s, d_r)
        kr = apply_rope(kr.unsqueeze(1), cos, sin)  # (b, 1, s, d_r): one rope key shared by every head
        return qn, qr, c.unsqueeze(1), kr

    def _kvb(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_uk (n/p, d_n, r) and W_uv (n/p, d_v, r): this rank's heads of W_kvb."""
        w = self.kv_b_proj.weight.view(self.n_local, self.d_n + self.d_v, self.r)
        return w[:, :self.d_n], w[:, self.d_n:]

    def _sdpa(self, q, k, v, mask):
        p = self.dropout if self.training else 0.0
        kw = dict(attn_mask=mask, is_causal=mask is None, dropout_p=p, scale=self.scale, enable_gqa=True)
        if p > 0 and self.rng is not None:
            with self.rng.fork():  # heads differ per tensor rank: their dropout masks must too
                return F.scaled_dot_product_attention(q, k, v, **kw)
        return F.scaled_dot_product_attention(q, k, v, **kw)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        qn, qr, c, kr = self._latents(x, cos, sin)
        b, _, s, _ = qn.shape
        if cache is not None:
            c, kr = cache.append(c, kr)  # (b, 1, L + s, r), (b, 1, L + s, d_r): the latent cache
        if cache is not None or self.absorb:
            w_uk, w_uv = self._kvb()
            q_abs = torch.einsum("bnsd,ndr->bnsr", qn, w_uk)  # (b, n/p, s, r): q_n W_uk
            q = torch.cat([q_abs, qr], dim=-1)  # (b, n/p, s, r + d_r)
            k = torch.cat([c, kr], dim=-1)  # (b, 1, S, r + d_r): one key for every head
            o_lat = self._sdpa(q, k, c, mask)  # (b, n/p, s, r)
            o = torch.einsum("bnsr,nvr->bnsv", o_lat, w_uv)  # (b, n/p, s, d_v)
        else:
            S = c.shape[2]
            kv = self.kv_b_proj(c.squeeze(1)).view(b, S, self.n_local, self.d_n + self.d_v).transpose(1, 2)
            kn, v = kv.split([self.d_n, self.d_v], dim=-1)  # (b, n/p, S, d_n), (b, n/p, S, d_v)
            q = torch.cat([qn, qr], dim=-1)  # (b, n/p, s, d_qk)
            k = torch.cat([kn, kr.expand(-1, self.n_local, -1, -1)], dim=-1)  # (b, n/p, S, d_qk)
            o = self._sdpa(q, k, v, mask)  # (b, n/p, s, d_v)
        o = o.transpose(1, 2).reshape(b, s, self.n_local * self.d_v)  # (b, s, n d_v / p)
        return self.o_proj(o)  # (b, s, h), or (b, s/p, h) with SP
