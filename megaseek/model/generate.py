"""One generator: KV-cached (or uncached) decoding, greedy or seeded sampling, batched with per-row lengths, at
any tensor degree and through pipeline stages, in lockstep across data-parallel ranks (ZeRO-3 safe).

Batching: prompts of different lengths are LEFT-padded to the longest; pads carry document id -1 (invisible
to real tokens, see megaseek/model/attention.py) and real tokens get positions 0, 1, ... from their own first
token, so a row's tokens do not depend on its batch-mates or its padding.

Sampling (temperature > 0): logits / T, then top-k, then top-p (nucleus) filtering, then one uniform draw per
row and step from a generator seeded by (seed, row id) and inverse-CDF selection over the vocabulary in id
order. Rows are keyed by their id, never by the layout: the same seed and row id give the same tokens at any
tensor degree, batch composition or data-parallel split. temperature == 0 is greedy (arg-max).

Tensor parallelism: every tensor rank calls in lockstep; the vocab-sharded logits of the last position are
gathered (b, V) on every rank, so every rank picks the same token. Pipeline: every stage calls with the same
prompts; the first stage embeds, hidden states pass stage to stage (point-to-point), the last stage picks the
tokens and broadcasts them to the other stages. Lockstep (`sync_group`): ranks whose rows have all finished
keep taking part in forwards until every rank of the group is done, since ZeRO-3 gathers parameters
collectively inside each forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megaseek.tensor_parallel.mappings import gather_from_region


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0      # 0: greedy
    top_k: int = 0                # 0: off
    top_p: float = 1.0            # 1: off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the row (CTRL / HF rule)
    seed: int = 0
    stop_tokens: Sequence[int] = field(default_factory=tuple)
    use_cache: bool = True

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0")


@dataclass
class PipelinePeers:
    """This rank's place in its pipeline (the process-group ranks of its stages, and its stage)."""
    ranks: list
    stage: int
    group: object = None

    @property
    def stages(self) -> int:
        return len(self.ranks)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def filter_logits(z: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p filtering of (b, V) logits: removed entries get -inf (at least one token stays)."""
    if top_k and top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]  # (b, 1)
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def apply_repetition_penalty(z: torch.Tensor, seen: list, penalty: float) -> torch.Tensor:
    if penalty == 1.0:
        return z
    z = z.clone()
    for r, toks in enumerate(seen):
        if not toks:
            continue
        idx = torch.tensor(sorted(set(toks)), dtype=torch.long, device=z.device)
        v = z[r, idx]
        z[r, idx] = torch.where(v > 0, v / penalty, v * penalty)
    return z


def row_generator(seed: int, row_id: int) -> torch.Generator:
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(row_id)) % (2 ** 63))


def choose_tokens(z: torch.Tensor, cfg: SamplingConfig, gens: list, seen: list) -> torch.Tensor:
    """(b,) next tokens from full-vocabulary logits (b, V).

    Sampling runs in float64 on the upcast logits: token v is drawn iff F_{v-1} <= u F_V < F_v (F the cumulative
    sum of softmax(z / T) in id order), so two layouts whose logits differ by |dz| <= eps (tensor-parallel
    reduction order, ZeRO's averaged gradients) pick different tokens only when u lands in the gap between their
    boundaries: P(differ) <= sum_v |dF_v| <= 2 eps sum_v min(F_v, 1 - F_v) per draw. In float32 the cumulative
    sum itself would add rounding of ~sqrt(V) ulp to every boundary, more than eps for a large vocabulary."""
    z = apply_repetition_penalty(z.float(), seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return z.argmax(-1)
    z = filter_logits(z.double() / cfg.temperature, cfg.top_k, cfg.top_p)  # (b, V) float64
    cdf = torch.softmax(z, dim=-1).cumsum(-1)  # (b, V)
    u = torch.stack([torch.rand((), generator=g) for g in gens]).to(z.device, torch.float64)  # (b,) the float32 draws
    tok = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return tok.clamp(max=z.shape[-1] - 1)


def _stage_forward(model, pipe: Optional[PipelinePeers], x, pos, doc, cache):
    """One forward through this rank's stage; returns full-vocab logits of the last position (b, V) on the
    last stage, None elsewhere."""
    if pipe is not None and pipe.stages > 1:
        b, s = pos.shape
        if not pipe.first:
            dtype = next(model.parameters()).dtype
            x = torch.empty(b, s, model.cfg.hidden_size, dtype=dtype, device=pos.device)
            dist.recv(x, pipe.ranks[pipe.stage - 1])
        y = model(x, position_ids=pos, document_ids=doc, cache=cache)
        if not pipe.last:
            dist.send(y.contiguous(), pipe.ranks[pipe.stage + 1])
            return None
    else:
        y = model(x, position_ids=pos, document_ids=doc, cache=cache)
    z = gather_from_region(y[:, -1:, :].contiguous(), model.ctx.group)[:, 0, :model.cfg.vocab_size]  # (b, V)
    return z


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], cfg: SamplingConfig, *, pipeline: Optional[PipelinePeers] = None,
             sync_group=None, row_ids: Optional[Sequence[int]] = None, pad_id: int = 0) -> list[list[int]]:
    """New tokens for each prompt (a stop token, when produced, ends its row and is included).

    `model`: a Decoder (or pipeline stage); every tensor rank (and stage) calls with the same prompts.
    `sync_group`: decode in lockstep with every rank of this group (ZeRO-3: the data-parallel world);
    `row_ids`: the global ids of the rows (sampling streams), default 0..b-1."""
    cfg.validate()
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    device = model.rope_cos.device
    b, P = len(prompts), max(len(p) for p in prompts)
    total = P + cfg.max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ValueError(f"prompt ({P} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds model.max_seq_len "
                         f"({model.cfg.max_seq_len})")
    ids = torch.full((b, total), pad_id, dtype=torch.long, device=device)
    doc = torch.full((b, total), -1, dtype=torch.long, device=device)
    pos = torch.zeros((b, total), dtype=torch.long, device=device)
    for r, p in enumerate(prompts):
        n = len(p)
        ids[r, P - n:P] = torch.tensor(list(p), dtype=torch.long)
        doc[r, P - n:] = 0
        pos[r, P - n:] = torch.arange(total - (P - n))
    rows = list(row_ids) if row_ids is not None else list(range(b))
    gens = [row_generator(cfg.seed, r) for r in rows]
    seen = [list(p) for p in prompts]
    stop = set(int(t) for t in cfg.stop_tokens)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool, device=device)
    decides = pipeline is None or pipeline.last
    was = model.training
    model.eval()
    ctx = model.ctx
    cache = model.new_cache(b, total) if cfg.use_cache else None
    try:
        with ctx.no_sequence_parallel():
            cur = P
            for t in range(cfg.max_new_tokens):
                if cache is not None:
                    a = 0 if t == 0 else cur - 1
                    z = _stage_forward(model, pipeline, ids[:, a:cur], pos[:, a:cur], doc[:, a:cur], cache)
                else:
                    z = _stage_forward(model, pipeline, ids[:, :cur], pos[:, :cur], doc[:, :cur], None)
                tok = choose_tokens(z, cfg, gens, seen) if decides else torch.zeros(b, dtype=torch.long, device=device)
                if pipeline is not None and pipeline.stages > 1:
                    dist.broadcast(tok, pipeline.ranks[-1], group=pipeline.group)
                tok = torch.where(done, torch.full_like(tok, pad_id), tok)
                ids[:, cur] = tok
                for r in range(b):
                    if not done[r]:
                        out[r].append(int(tok[r]))
                        seen[r].append(int(tok[r]))
                        if int(tok[r]) in stop:
                            done[r] = True
                cur += 1
                alive = torch.tensor([0.0 if bool(done.all()) else 1.0], device=device)
                if sync_group is not None and dist.is_initialized():
                    dist.all_reduce(alive, op=dist.ReduceOp.MAX, group=sync_group)
                if alive.item() == 0 or t == cfg.max_new_tokens - 1:
                    break
    finally:
        model.train(was)
    return out

