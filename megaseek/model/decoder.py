"""A DeepSeek/Llama-style decoder-only transformer, read top to bottom.

    ids (b, s) -> VocabParallelEmbedding -> L x Block -> RMSNorm -> LM head (vocab-parallel) -> logits

Block (pre-norm):  x = x + Attention(RMSNorm(x));  x = x + MLP(RMSNorm(x)), the attention and MLP chosen by
the model spec (megaseek/model/spec.py) from `model.attention` / `model.mlp`.

Inputs besides the tokens: `position_ids` (b, s) for RoPE (default 0..s-1), `document_ids` (b, s) so that packed
documents do not attend to each other and left padding (id -1) is invisible, and a KV cache for decoding.
The loss is not the model's: an objective (megaseek/tasks/) turns the vocab-sharded logits into a loss.

Every weight is drawn from its own seed (layer index, sub-layer), so the same seed gives the same full
weights at any tensor or pipeline layout; a pipeline stage builds only its slice of the layers.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megaseek.model.attention import attention_mask
from megaseek.model.cache import KVCache
from megaseek.model.config import ModelConfig
from megaseek.model.layers import RMSNorm, rope_at, scaled_out_std
from megaseek.model.rope import model_rope_tables
from megaseek.model.spec import attention_cls, build_mlp, check
from megaseek.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megaseek.tensor_parallel.layers import (ColumnParallelLinear, TPContext, VocabParallelEmbedding,
                                             mask_padded_logits, padded_vocab_size)
from megaseek.tensor_parallel.gemm import linear
from megaseek.tensor_parallel.random import RNGTracker

CHECKPOINT_MODES = ("none", "full", "selective")


def layer_seed(seed: int, layer: int) -> int:
    return seed + 1000 * (layer + 1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: TPContext, layer: int, seed: int, rng: Optional[RNGTracker],
                 checkpointing: str = "none", ep=None):
        super().__init__()
        s = layer_seed(seed, layer)
        self.checkpointing = checkpointing
        self.dropout = cfg.dropout
        self.rng, self.ctx = rng, ctx
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx)
        self.attn = attention_cls(cfg)(cfg, ctx, s, scaled_out_std(cfg), rng)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx)
        self.mlp = build_mlp(cfg, ctx, layer, s, scaled_out_std(cfg), ep)  # ep: EPContext for MoE layers

    def _attn(self, x, cos, sin, mask=None, cache=None):
        return self.attn(self.attn_norm(x), cos, sin, mask, cache)

    def _drop(self, y):
        if self.dropout == 0.0 or not self.training:
            return y
        if self.ctx.sequence_parallel and self.rng is not None:  # sharded residual: per-rank masks
            with self.rng.fork():
                return F.dropout(y, self.dropout, True)
        return F.dropout(y, self.dropout, True)  # replicated residual: same mask on every tensor rank

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor] = None,
                cache=None) -> torch.Tensor:
        # x: (b, s, h), or (b, s/p, h) with sequence parallelism
        if self.checkpointing == "selective" and self.training:  # recompute attention only
            a = checkpoint(self._attn, x, cos, sin, mask, cache, use_reentrant=False)
        else:
            a = self._attn(x, cos, sin, mask, cache)
        x = x + self._drop(a)
        x = x + self._drop(self.mlp(self.mlp_norm(x)))
        return x


class Decoder(nn.Module):
    """The model, or one pipeline stage of it: layers [first_layer, last_layer), with the embedding when
    `pre` and the final norm + head when `post`.

    forward(x, position_ids=None, document_ids=None, cache=None) -> vocab-sharded logits (b, s, V_pad/p) on a
    stage with `post`, else the hidden states (b, s|s/p, h). x: token ids (b, s) on a stage with `pre`, else the
    previous stage's hidden states.
    """

    def __init__(self, cfg: ModelConfig, ctx: Optional[TPContext] = None, seed: int = 1234,
                 rng: Optional[RNGTracker] = None, checkpointing: str = "none",
                 first_layer: int = 0, last_layer: Optional[int] = None, pre: bool = True, post: bool = True,
                 ep=None):
        super().__init__()
        ctx = ctx or TPContext()
        check(cfg)
        cfg.validate(ctx.size)
        if checkpointing not in CHECKPOINT_MODES:
            raise ValueError(f"train.activation_checkpointing={checkpointing!r}; choose one of {CHECKPOINT_MODES}")
        self.cfg, self.ctx, self.checkpointing = cfg, ctx, checkpointing
        self.pre, self.post = pre, post
        last_layer = cfg.num_layers if last_layer is None else last_layer
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, ctx.size, cfg.pad_vocab_multiple)
        self.vocab_start = ctx.rank * (self.padded_vocab // ctx.size)
        self.embed = None
        if pre or (post and (cfg.tie_embeddings or cfg.mtp_depth > 0)):  # MTP embeds its input tokens
            self.embed = VocabParallelEmbedding(cfg.vocab_size, self.padded_vocab, cfg.hidden_size, ctx,
                                                std=cfg.init_std, seed=seed)
        self.layers = nn.ModuleList(Block(cfg, ctx, i, seed, rng, checkpointing, ep)
                                    for i in range(first_layer, last_layer))
        self.first_layer = first_layer
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, ctx) if post else None
        self.lm_head = None
        if post and not cfg.tie_embeddings:
            self.lm_head = ColumnParallelLinear(cfg.hidden_size, self.padded_vocab, ctx, std=cfg.init_std,
                                                seed=seed + 7, valid_out=cfg.vocab_size)
        self.mtp, self._mtp_hidden = None, None  # multi-token prediction (megaseek/model/mtp.py)
        if post and cfg.mtp_depth > 0:
            if ctx.sequence_parallel:
                raise ValueError(f"model.mtp_depth={cfg.mtp_depth} with parallel.sequence_parallel=true: the MTP "
                                 f"modules need whole sequences; set one of them off")
            from megaseek.model.mtp import MTPModule
            self.mtp = nn.ModuleList(MTPModule(cfg, ctx, k, seed, rng, Block, ep=ep)
                                     for k in range(1, cfg.mtp_depth + 1))
        cos, sin = model_rope_tables(cfg)  # plain RoPE or YaRN (megaseek/model/rope.py)
        self.register_buffer("rope_cos", cos, persistent=False)  # (s_max, d)
        self.register_buffer("rope_sin", sin, persistent=False)

    # --- pieces, used by the pipeline stages too ---
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)  # (b, s, h), or (b, s/p, h) with SP

    def run_layers(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                   document_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        s = x.shape[1] * (self.ctx.size if self.ctx.sequence_parallel else 1)  # the full sequence length
        mask = None
        if cache is not None:
            doc_new = document_ids if document_ids is not None else torch.zeros(
                x.shape[0], s, dtype=torch.long, device=x.device)
            doc_all, offset = cache.begin(doc_new)
            mask = attention_mask(doc_new, doc_all, offset)  # (b, 1, s, L + s)
            if position_ids is None:
                position_ids = torch.arange(offset, offset + s, device=x.device).expand(x.shape[0], s)
        elif document_ids is not None:
            mask = attention_mask(document_ids, document_ids, 0)  # (b, 1, s, s)
        cos, sin = rope_at(self.rope_cos, self.rope_sin, s, position_ids)
        for i, blk in enumerate(self.layers):
            lc = cache.layer(i) if cache is not None else None
            if self.checkpointing == "full" and self.training:
                x = checkpoint(blk, x, cos, sin, mask, lc, use_reentrant=False)
            else:
                x = blk(x, cos, sin, mask, lc)
        if cache is not None:
            cache.commit(s)
        return x

    def head_weight(self) -> torch.Tensor:
        return self.embed.weight if self.cfg.tie_embeddings else self.lm_head.weight  # (V_pad/p, h)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ctx.enter(self.norm(x))  # (b, s, h) on every tensor rank
        z = linear(x, self.head_weight())  # (b, s, V_pad/p)
        return mask_padded_logits(z, self.cfg.vocab_size, self.vocab_start)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy (b, s) from vocab-sharded logits; 0 where labels < 0."""
        return vocab_parallel_cross_entropy(logits, labels, self.ctx, self.vocab_start)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean token loss (a convenience for tests and tools; training uses an objective)."""
        return self.token_losses(logits, labels).mean()

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache(len(self.layers), batch, max_len, device=self.rope_cos.device)

    def forward(self, x: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        h = self.embed_tokens(x) if self.pre else x
        h = self.run_layers(h, position_ids, document_ids, cache)
        if self.mtp is not None and self.training and cache is None and torch.is_grad_enabled():
            self._mtp_hidden = h  # (b, s, h): the objective's step adds the MTP loss (add_model_losses)
        return self.logits(h) if self.post else h


def compile_blocks(model: nn.Module) -> nn.Module:
    """Regional compilation (`train.compile=true`): torch.compile each decoder block in place
    (`nn.Module.compile`), so parameter names, state_dict and checkpoints do not change; identical blocks
    share one compiled graph (parameters are graph inputs). Embedding, head, loss, communication between
    stages and the optimizer stay eager."""
    for blk in model.layers:
        blk.compile()
    return model
