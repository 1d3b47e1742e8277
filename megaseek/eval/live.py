"""A model at its training layout as the evaluation sees it: full-vocabulary logits and greedy generation on
every rank, so that every rank runs the same lm-eval requests in lockstep.

    logits_fn(ids (b, s) long) -> logits (b, s, V) float32, identical on every rank
        tp: each tensor rank computes vocab-sharded logits (b, s, V_pad/tp); they are gathered over the tensor
            group (column blocks in rank order) and the padded vocabulary rows dropped.
        pp: the first stage embeds, the hidden states (b, s, h) pass stage to stage (send/recv between the
            stages' global ranks), the last stage computes the logits and broadcasts them (b, s, V) over the
            pipeline group, so every stage returns the same tensor.
        dp: every data-parallel rank evaluates the same requests in the same order: the same forwards, so
            ZeRO-3's collective parameter gathers inside each forward match across ranks.
    generate_fn(prompts, max_new, stop_tokens) -> new tokens per prompt: greedy decoding through the one
        KV-cached generator (megaseek.model.generate.generate, left padding, per-row positions), with the
        world as its lockstep group.

Sequence parallelism is switched off for these forwards (the weights are the same; only the communication
pattern differs). The model is put in eval mode for each call and its mode restored after.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megaseek.model.generate import PipelinePeers, SamplingConfig, generate
from megaseek.tensor_parallel.mappings import gather_from_region


@contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), model.ctx.no_sequence_parallel():
            yield
    finally:
        model.train(was)


def world_group():
    """The lockstep group of a generation: every rank of the job (None in a world of one)."""
    return dist.group.WORLD if dist.is_initialized() and dist.get_world_size() > 1 else None


class LiveModel:
    """`logits_fn` and `generate_fn` over one rank's Decoder (or pipeline stage of it); `pipe` names the
    stages (None or a single stage: no pipeline)."""

    def __init__(self, model, pipe: Optional[PipelinePeers] = None):
        self.model = model
        self.pipe = pipe if pipe is not None and pipe.stages > 1 else None
        self.vocab = model.cfg.vocab_size
        self.max_length = model.cfg.max_seq_len

    def _stage(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """This stage's forward of the whole sequence: vocab-sharded logits (b, s, V_pad/tp) on the last
        stage, None on the others (their hidden states went to the next stage)."""
        model, pipe = self.model, self.pipe
        if pipe is None:
            return model(ids)
        x = ids
        if not pipe.first:
            dtype = next(model.parameters()).dtype
            x = torch.empty(*ids.shape, model.cfg.hidden_size, dtype=dtype, device=ids.device)  # (b, s, h)
            dist.recv(x, pipe.ranks[pipe.stage - 1])
        y = model(x)
        if not pipe.last:
            dist.send(y.contiguous(), pipe.ranks[pipe.stage + 1])
            return None
        return y

    def logits_fn(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.model.rope_cos.device
        ids = ids.to(device)
        with eval_mode(self.model):
            y = self._stage(ids)
            if y is not None:
                z = gather_from_region(y.contiguous(), self.model.ctx.group)[..., :self.vocab].float()  # (b, s, V)
            else:
                z = torch.empty(*ids.shape, self.vocab, dtype=torch.float32, device=device)
            if self.pipe is not None:
                dist.broadcast(z, self.pipe.ranks[-1], group=self.pipe.group)
        return z.cpu()

    def generate_fn(self, prompts: Sequence[Sequence[int]], max_new: int,
                    stop_tokens: Sequence[int] = ()) -> list[list[int]]:
        cfg = SamplingConfig(max_new_tokens=int(max_new), temperature=0.0, stop_tokens=tuple(stop_tokens),
                             use_cache=True)
        return generate(self.model, [list(p) for p in prompts], cfg, pipeline=self.pipe, sync_group=world_group())
