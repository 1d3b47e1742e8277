"""A DeepSeek/Llama-style decoder-only transformer, read top to bottom.

    ids (b, s) -> VocabParallelEmbedding -> L x Block -> RMSNorm -> LM head (vocab-parallel) -> loss

Block (pre-norm):  x = x + Attention(RMSNorm(x));  x = x + SwiGLU(RMSNorm(x))

Every weight is drawn from its own seed (layer index, sub-layer), so the same seed gives the same full
weights at any tensor or pipeline layout; a pipeline stage builds only its slice of the layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megaseek.tensor_parallel.layers import (ColumnParallelLinear, RNGTracker, TPContext, VocabParallelEmbedding,
                                     mask_padded_logits, padded_vocab_size, vocab_parallel_cross_entropy)
from megaseek.model.config import ModelConfig
from megaseek.model.layers import Attention, RMSNorm, SwiGLU, rope_tables, scaled_out_std

CHECKPOINT_MODES = ("none", "full", "selective")


def layer_seed(seed: int, layer: int) -> int:
    return seed + 1000 * (layer + 1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: TPContext, layer: int, seed: int, rng: Optional[RNGTracker],
                 checkpointing: str = "none"):
        super().__init__()
        s = layer_seed(seed, layer)
        self.checkpointing = checkpointing
        self.dropout = cfg.dropout
        self.rng, self.ctx = rng, ctx
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx)
        self.attn = Attention(cfg, ctx, s, scaled_out_std(cfg), rng)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx)
        self.mlp = SwiGLU(cfg, ctx, s, scaled_out_std(cfg))

    def _attn(self, x, cos, sin):
        return self.attn(self.attn_norm(x), cos, sin)

    def _drop(self, y):
        if self.dropout == 0.0 or not self.training:
            return y
        if self.ctx.sequence_parallel and self.rng is not None:  # sharded residual: per-rank masks
            with self.rng.fork():
                return F.dropout(y, self.dropout, True)
        return F.dropout(y, self.dropout, True)  # replicated residual: same mask on every tensor rank

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (b, s, h), or (b, s/p, h) with sequence parallelism
        if self.checkpointing == "selective" and self.training:  # recompute attention only
            a = checkpoint(self._attn, x, cos, sin, use_reentrant=False)
        else:
            a = self._attn(x, cos, sin)
        x = x + self._drop(a)
        x = x + self._drop(self.mlp(self.mlp_norm(x)))
        return x


class Decoder(nn.Module):
    """The model, or one pipeline stage of it: layers [first_layer, last_layer), with the embedding when
    `pre` and the final norm + head + loss when `post`.

    forward(ids, labels=None) -> vocab-sharded logits (b, s, V_pad/p), or the mean token loss when
    labels are given (on a stage without `post`, the hidden states (b, s|s/p, h)).
    """

    def __init__(self, cfg: ModelConfig, ctx: Optional[TPContext] = None, seed: int = 1234,
                 rng: Optional[RNGTracker] = None, checkpointing: str = "none",
                 first_layer: int = 0, last_layer: Optional[int] = None, pre: bool = True, post: bool = True):
        super().__init__()
        ctx = ctx or TPContext()
        cfg.validate(ctx.size)
        if checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"train.activation_checkpointing={checkpointing!r}; choose one of {CHECKPOINT_MODES}")
        self.cfg, self.ctx, self.checkpointing = cfg, ctx, checkpointing
        self.pre, self.post = pre, post
        last_layer = cfg.num_layers if last_layer is None else last_layer
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, ctx.size, cfg.pad_vocab_multiple)
        self.vocab_start = ctx.rank * (self.padded_vocab // ctx.size)
        self.embed = None
        if pre or (post and cfg.tie_embeddings):
            self.embed = VocabParallelEmbedding(cfg.vocab_size, self.padded_vocab, cfg.hidden_size, ctx,
                                                std=cfg.init_std, seed=seed)
        self.layers = nn.ModuleList(Block(cfg, ctx, i, seed, rng, checkpointing)
                                    for i in range(first_layer, last_layer))
        self.first_layer = first_layer
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx) if post else None
        self.lm_head = None
        if post and not cfg.tie_embeddings:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab, ctx, std=cfg.init_std,
                                                seed=seed + 7, valid_out=cfg.vocab_size)
        cos, sin = rope_tables(cfg.max_seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (s_max, d)
        self.register_buffer("rope_sin", sin, persistent=False)

    # --- pieces, used by the pipeline stages too ---
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)  # (b, s, h), or (b, s/p, h) with SP

    def run_layers(self, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope_cos, self.rope_sin
        for blk in self.layers:
            if self.checkpointing == "full" and self.training:
                x = checkpoint(blk, x, cos, sin, use_reentrant=False)
            else:
                x = blk(x, cos, sin)
        return x

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight  # (V_pad/p, h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ctx.enter(self.norm(x))  # (b, s, h) on every tensor rank
        z = F.linear(x, self.head_weight())  # (b, s, V_pad/p)
        return mask_padded_logits(z, self.cfg.vocab_size, self.vocab_start)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_cross_entropy(logits, labels, self.ctx, self.vocab_start).mean()

    def forward(self, ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed_tokens(ids) if self.pre else ids
        x = self.run_layers(x)
        if not self.post:
            return x
        z = self.logits(x)
        return z if labels is None else self.loss(z, labels)


@torch.no_grad()
def greedy_generate(model: Decoder, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding without a cache (fine for samples from small models). All tensor ranks call it in
    lockstep; the arg-max over the vocab-sharded logits is taken across ranks by gathering one column."""
    from megaseek.tensor_parallel.mappings import gather_from_region
    was = model.training
    model.eval()
    p = model.ctx.size if model.ctx.sequence_parallel else 1
    limit = (model.cfg.max_seq_len // p) * p
    for _ in range(new_tokens):
        window = ids[:, -limit:]
        n = window.shape[1]
        if n % p:  # sequence parallelism needs s % p == 0: pad on the right (causal: no effect on t < n)
            window = torch.cat([window, window.new_zeros(window.shape[0], p - n % p)], dim=1)
        z = model(window)[:, n - 1:n, :]  # (b, 1, V_pad/p)
        z = gather_from_region(z, model.ctx.group)[:, 0, :model.cfg.vocab_size]  # (b, V)
        ids = torch.cat([ids, z.argmax(-1, keepdim=True)], dim=1)
    model.train(was)
    return ids
