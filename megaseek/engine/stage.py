"""This rank's model: the pipeline stage of the decoder it holds, with its tied-embedding copy and the
norm-ownership marks DeepSpeed reads.

Tied embeddings across stages: the first stage holds E for the lookup and the last stage a copy of E as
its head; both start equal (same seed) and stay equal because their gradients are summed over the
`embed` group (first + last stage) before every optimizer step. Only stage 0 counts E in the norm and in
checkpoints (the copy is `ds_pipe_replicated`, skipped by the checkpoint writer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megaseek.distributed.groups import ParallelGroups
from megaseek.model.config import ModelConfig
from megaseek.model.decoder import Decoder
from megaseek.model.moe.dispatch import EPContext
from megaseek.pipeline.partition import partition
from megaseek.tensor_parallel.layers import TPContext, mark_norm_ownership
from megaseek.tensor_parallel.random import RNGTracker


@dataclass
class Stage:
    model: Decoder
    ctx: TPContext
    rng: RNGTracker
    index: int
    stages: int
    layers: tuple            # [first, last) global layer indices of this stage
    tied_copy: Optional[torch.nn.Parameter]    # the last stage's copy of a tied embedding (pp > 1)
    tied_weight: Optional[torch.nn.Parameter]  # the tied embedding this stage holds (pp > 1), else None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.stages - 1


def build_stage(mcfg: ModelConfig, groups: ParallelGroups, *, seed: int, sequence_parallel: bool,
                checkpointing: str, partition_method: str) -> Stage:
    ctx = TPContext.from_axis(groups.tp, sequence_parallel)
    torch.manual_seed(seed)
    rng = RNGTracker(seed, ctx.rank)
    index, stages = groups.pp.rank, groups.pp.size
    lo, hi = partition(mcfg, stages, partition_method)[index]
    first, last = index == 0, index == stages - 1
    model = Decoder(mcfg, ctx, seed=seed, rng=rng, checkpointing=checkpointing,
                    first_layer=lo, last_layer=hi, pre=first, post=last, ep=EPContext.from_axis(groups.ep))
    tied = stages > 1 and (mcfg.tie_embeddings or mcfg.mtp_depth > 0)  # the last stage's head or MTP input
    tied_copy = model.embed.weight if (tied and last) else None
    tied_weight = model.embed.weight if tied and (first or last) else None
    mark_norm_ownership(model, ctx.rank, [tied_copy] if tied_copy is not None else [])
    return Stage(model=model, ctx=ctx, rng=rng, index=index, stages=stages, layers=(lo, hi),
                 tied_copy=tied_copy, tied_weight=tied_weight)
