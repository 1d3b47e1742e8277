"""Multi-token prediction (DeepSeek-V3 section 2.2), on the stage that holds the LM head.

Depth k = 1..D predicts token t_{i+k+1} at position i. With h^0 the main model's last hidden states (before the
final norm) and Emb the model's own (vocab-parallel) embedding:

    h'^k_i = W_k [RMSNorm_e(Emb(t_{i+k})); RMSNorm_h(h^{k-1}_i)]  W_k: (h, 2h), replicated on tensor ranks
    h^k    = Block_k(h'^k) over positions i in [0, s - k)          causal, same documents, same RoPE positions
    p^k_i  = softmax(Head(RMSNorm(h^k_i)))                         the main LM head (shared, vocab-sharded)

The embedding half comes first in W_k's columns, as in DeepSeek's released weights (`eh_proj`, read by
Megatron-Core, vLLM and SGLang as eh_proj(cat[enorm(emb), hnorm(h)])); the paper writes the two the other way.
The depth-k input token t_{i+k} is input_ids[:, i+k] (labels[:, i+k-1] on a last pipeline stage, which gets no
token ids: see mtp_targets) and the target t_{i+k+1} is labels[:, i+k] (labels[:, j] = t_{j+1}, -100 where not learned). A position counts
where that label is real and position i+k is in the same document as i; a masked label (an SFT prompt token)
still feeds its real token. The loss added to the objective's sum:

    L_MTP = (lambda / D) * sum_k sum_{valid i} CE(p^k_i, t_{i+k+1})     lambda = model.mtp_loss_weight

divided, like every loss term, by the global count of the objective's units (the main next-token count), and
reported as the metric `mtp_loss` (the unweighted (1 / D) sum_k sum_i CE, so divided by that count it is the
mean depth loss per main token).

Block_k is the block of layer `num_layers + k - 1`: with model.mlp=moe an MoE block (DeepSeek-V3's MTP module:
shared + routed experts, its own router and correction bias, expert-parallel like the main stack's, named
mtp.{k-1}.block.mlp.experts.{e}.* in checkpoints; its loads move its bias and appear as moe/L{num_layers+k-1}),
otherwise the dense SwiGLU. Its weights are drawn from the seed of that layer, so every layout builds the same
full weights. With pp > 1 the last
stage keeps a copy of the embedding whose gradient is summed with the first stage's (engine/stage.py), as for
tied embeddings. Sequence parallelism is refused (the hidden states would be split along the sequence), and
so are objectives other than next-token ones (pretrain, sft): `check_mtp`, before any work.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megaseek.model.attention import attention_mask
from megaseek.model.layers import RMSNorm, rope_at
from megaseek.tensor_parallel.gemm import linear
from megaseek.tensor_parallel.layers import TPContext, mask_padded_logits, master_normal


MTP_OBJECTIVES = ("pretrain", "sft")


def check_mtp(cfg, seq_len: int, sequence_parallel: bool, objective: str) -> Optional[str]:
    """The one message refusing multi-token prediction for this run, or None when it can run."""
    if not cfg.mtp_depth:
        return None
    if objective not in MTP_OBJECTIVES:
        return (f"model.mtp_depth={cfg.mtp_depth}: multi-token prediction trains next-token objectives only "
                f"({', '.join(MTP_OBJECTIVES)}), not {objective}; set model.mtp_depth=0 for this stage")
    if sequence_parallel:
        return (f"model.mtp_depth={cfg.mtp_depth} with parallel.sequence_parallel=true: the MTP modules need whole "
                f"sequences; set one of them off")
    if cfg.mtp_depth > seq_len - 2:
        return f"model.mtp_depth={cfg.mtp_depth} needs train.seq_len >= mtp_depth + 2 (got {seq_len})"
    return None


class MTPModule(nn.Module):
    """One depth k: the two norms, the projection W_k, one block and the norm before the shared head."""

    def __init__(self, cfg, ctx: TPContext, k: int, seed: int, rng, block_cls, ep=None):
        super().__init__()
        h = cfg.hidden_size
        layer = cfg.num_layers + k - 1
        self.hnorm = RMSNorm(h, cfg.norm_eps, ctx)
        self.enorm = RMSNorm(h, cfg.norm_eps, ctx)
        self.eh_proj = nn.Parameter(master_normal((h, 2 * h), cfg.init_std, seed + 1000 * (layer + 1) + 21))  # unused offset
        self.block = block_cls(cfg, ctx, layer, seed, rng, ep=ep)  # MoE when mlp=moe (layer >= first_k_dense_replace)
        self.norm = RMSNorm(h, cfg.norm_eps, ctx)

    def project(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """h'^k = W_k [enorm(emb); hnorm(h_prev)]: (b, n, h) x 2 -> (b, n, h), embedding half first."""
        return linear(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1), self.eh_proj)  # (b, n, 2h) -> (b, n, h)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor, cos, sin, mask) -> torch.Tensor:
        # h_prev, emb: (b, n, h) -> (b, n, h)
        return self.block(self.project(h_prev, emb), cos, sin, mask)


def mtp_targets(input_ids: Optional[torch.Tensor], labels: torch.Tensor, document_ids: Optional[torch.Tensor],
                k: int, loss_mask: Optional[torch.Tensor] = None):
    """For depth k over n = s - k positions: input tokens (b, n), targets (b, n) with -100 where invalid.
    Without `input_ids` (the last stage of a pipeline gets labels only) the input t_{i+k} is labels[:, i+k-1]:
    exact for pretraining windows, where every label is the next token; a position whose input label is masked
    is then not counted (its token is unknown there). `loss_mask` (b, s), where the batch has one, masks targets
    as it masks the main loss (an SFT row learns its assistant tokens only)."""
    n = labels.shape[1] - k
    tgt = labels[:, k:k + n]  # t_{i+k+1}
    valid = tgt >= 0
    if loss_mask is not None:
        valid &= loss_mask[:, k:k + n].bool()
    if input_ids is not None:
        inp = input_ids[:, k:k + n]  # t_{i+k}
    else:
        inp = labels[:, k - 1:k - 1 + n]
        valid &= inp >= 0
        inp = inp.clamp(min=0)
    if document_ids is not None:
        valid &= document_ids[:, :n] == document_ids[:, k:k + n]
    return inp, tgt.masked_fill(~valid, -100)


def mtp_token_losses(model, hidden: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Per-token cross-entropy of each depth (a list of D (b, s - k) tensors, 0 where invalid), from the main
    model's last hidden states `hidden` (b, s, h) and the batch's input_ids / labels / document_ids /
    position_ids."""
    labels = batch["labels"].to(hidden.device)
    ids = batch["input_ids"].to(hidden.device) if "input_ids" in batch else None
    docs = batch.get("document_ids")
    pos = batch.get("position_ids")
    mask = batch["loss_mask"].to(hidden.device) if batch.get("loss_mask") is not None else None
    s = labels.shape[1]
    out, h_prev = [], hidden
    for k, mod in enumerate(model.mtp, start=1):
        n = s - k
        inp, tgt = mtp_targets(ids, labels, docs, k, mask)
        d = docs[:, :n].to(hidden.device) if docs is not None else None
        attn = attention_mask(d, d, 0) if d is not None else None  # (b, 1, n, n), or causal by default
        cos, sin = rope_at(model.rope_cos, model.rope_sin, n, pos[:, :n].to(hidden.device) if pos is not None else None)
        h_k = mod(h_prev[:, :n], model.embed_tokens(inp), cos, sin, attn)  # (b, n, h)
        z = linear(model.ctx.enter(mod.norm(h_k)), model.head_weight())  # (b, n, V_pad/p)
        z = mask_padded_logits(z, model.cfg.vocab_size, model.vocab_start)
        out.append(model.token_losses(z, tgt))
        h_prev = h_k
    return out


def take_mtp_loss(model: nn.Module, batch: dict):
    """(loss term, metric) of this micro-batch from the hidden states the last forward kept, or None when the
    model has no MTP module or did not run one (evaluation, another stage)."""
    for m in model.modules():
        hidden = getattr(m, "_mtp_hidden", None)
        if hidden is None:
            continue
        m._mtp_hidden = None
        losses = mtp_token_losses(m, hidden, batch)
        total = torch.stack([t.sum() for t in losses]).sum() / len(losses)
        return m.cfg.mtp_loss_weight * total, total.detach()
    return None
