"""Resumable, layout-independent batches from token shards, blended over named sources.

Samples: packed windows of seq_len + 1 tokens over each source's token stream (documents back to back,
each ending in EOS; input = w[:-1], label = w[1:]). Split: the last `valid_fraction` of each source's
windows are held out for validation.

The global sample stream (megaseek.data.blend) fixes the sample at every position from the seed, the
weights and the data. Global batch k is positions [kG, (k+1)G) when started from 0; in general a batch
is the next G positions after `consumed_samples`, the loader's whole state (saved in checkpoints), so
a resumed run (even with another layout) sees exactly the samples it would have seen. Data-parallel
rank r takes the contiguous slice [r G/dp, (r+1) G/dp), micro-batch m of that slice is
[m mb, (m+1) mb). Tensor ranks of one group have the same dp rank and so the same batches. In a
pipeline, the first stage reads only inputs and the last only labels; stages between read nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from megaseek.data.blend import BlendSchedule


class TokenWindows:
    """Fixed-length windows over a flat token array (a memmap or TokenStream: only touched windows are read)."""

    def __init__(self, tokens, seq_len: int, valid_fraction: float = 0.0, split: str = "train"):
        self.tokens, self.seq_len = tokens, seq_len
        total = (len(tokens) - 1) // seq_len
        n_valid = int(round(total * valid_fraction)) if valid_fraction > 0 else 0
        if split == "train":
            self.offset, self.n = 0, total - n_valid
        elif split == "valid":
            self.offset, self.n = total - n_valid, n_valid
        else:
            raise ValueError(f"split must be train or valid, got {split!r}")
        if self.n < 1 and split == "train":
            raise ValueError(f"the {split} split has no samples of {seq_len + 1} tokens "
                             f"({len(tokens)} tokens in all): use more data or a shorter train.seq_len")

    def __len__(self) -> int:
        return self.n

    def window(self, i: int) -> np.ndarray:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range [0, {self.n})")
        start = (self.offset + i) * self.seq_len
        return np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64)

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.window(int(i)) for i in ids]))  # (b, s+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()  # inputs, labels: (b, s) each


class BlendedWindows:
    """Named sources' windows read through one index space: sample i of the blend is (source, window)."""

    def __init__(self, sources: dict, weights: dict, window: int, seed: int):
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.weights = [float(weights[n]) for n in self.names]
        self.schedule = BlendSchedule(self.names, self.weights, [len(s) for s in self.sources], window, seed)

    def windows(self, positions) -> tuple[np.ndarray, np.ndarray]:
        return self.schedule.locate(positions)

    def batch(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        src, idx = self.windows(positions)
        w = torch.from_numpy(np.stack([self.sources[s].window(int(i)) for s, i in zip(src, idx)]))  # (b, s+1)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


class InterleavedWindows:
    """Held-out windows of several sources as one list, interleaved by weight (any prefix is a mix)."""

    def __init__(self, sources: dict, weights: dict):
        parts = [(n, s) for n, s in sources.items() if len(s) > 0]
        self.sources = [s for _, s in parts]
        keys, src, idx = [], [], []
        for k, (n, s) in enumerate(parts):
            j = np.arange(len(s))
            keys.append((j + 0.5) / float(weights[n]))
            src.append(np.full(len(s), k))
            idx.append(j)
        if not parts:
            self.src = self.idx = np.zeros(0, dtype=np.int64)
            return
        order = np.lexsort((np.concatenate(src), np.concatenate(keys)))
        self.src, self.idx = np.concatenate(src)[order], np.concatenate(idx)[order]

    def __len__(self) -> int:
        return len(self.src)

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.stack([self.sources[self.src[i]].window(int(self.idx[i])) for i in ids]))
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _seq_len_of(data) -> int:
    src = data.sources[0] if getattr(data, "sources", None) else data
    return int(getattr(src, "seq_len", 0))


@dataclass
class BatchPlan:
    global_batch: int
    micro_batch: int
    dp: int
    dp_rank: int
    pp: int = 1           # pipeline stages, and this rank's stage: only the first reads inputs,
    pp_rank: int = 0      # only the last reads labels

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.dp

    @property
    def grad_accum(self) -> int:
        return self.per_rank // self.micro_batch

    @property
    def reads_inputs(self) -> bool:
        return self.pp_rank == 0

    @property
    def reads_labels(self) -> bool:
        return self.pp_rank == self.pp - 1


class GlobalBatchSampler:
    """Global positions of the batch that starts at `start`, and of this rank's micro-batches of it."""

    def __init__(self, plan: BatchPlan):
        self.plan = plan

    def global_batch(self, start: int) -> np.ndarray:
        return np.arange(start, start + self.plan.global_batch, dtype=np.int64)

    def micro_batch(self, start: int, m: int) -> np.ndarray:
        p = self.plan
        first = start + p.dp_rank * p.per_rank + m * p.micro_batch
        return np.arange(first, first + p.micro_batch, dtype=np.int64)


def window_batch(ids: Optional[torch.Tensor], labels: Optional[torch.Tensor], batch: int, seq_len: int) -> dict:
    """The batch dict of packed pretraining windows (the contract of megaseek/tasks): `input_ids` (b, s) on
    stages that embed, `labels` and `loss_mask` (b, s) on the stage that computes the loss, `position_ids`
    (b, s) everywhere. Windows are plain causal streams: positions 0..s-1, no document ids, every label valid."""
    out = {"position_ids": torch.arange(seq_len).expand(batch, seq_len)}
    if ids is not None:
        out["input_ids"] = ids
    if labels is not None:
        out["labels"] = labels
        out["loss_mask"] = torch.ones_like(labels, dtype=torch.bool)
    return out


class ResumableLoader:
    """Micro-batches of consecutive global batches; `state_dict()` holds the samples consumed so far."""

    def __init__(self, data, plan: BatchPlan, seed: int, blend_window: int = 1000, data_id: Optional[str] = None,
                 seq_len: Optional[int] = None):
        if isinstance(data, TokenWindows):
            data = BlendedWindows({"data": data}, {"data": 1.0}, blend_window, seed)
        self.data, self.plan, self.seed, self.data_id = data, plan, int(seed), data_id
        n = sum(len(s) for s in data.sources)
        if n < plan.global_batch:
            raise ValueError(f"{n} training samples cannot fill one global batch of {plan.global_batch}: "
                             f"use more data or a smaller train.global_batch_size")
        self.sampler = GlobalBatchSampler(plan)
        self.consumed = 0
        self.seq_len = seq_len if seq_len is not None else _seq_len_of(data)

    @property
    def next_batch(self) -> int:
        return self.consumed // self.plan.global_batch

    def micro_batches(self) -> list:
        """This rank's micro-batches of the next global batch, as (inputs, labels) (b, s) LongTensors
        (None for the part a pipeline stage does not read); advances the position."""
        start = self.consumed
        self.consumed += self.plan.global_batch
        p = self.plan
        out = []
        for m in range(p.grad_accum):
            if not (p.reads_inputs or p.reads_labels):
                out.append((None, None))
                continue
            ids, labels = self.data.batch(self.sampler.micro_batch(start, m))
            out.append((ids if p.reads_inputs else None, labels if p.reads_labels else None))
        return out

    def batches(self) -> list[dict]:
        """`micro_batches()` as batch dicts (see `window_batch`), the form the training step takes."""
        return [window_batch(ids, labels, self.plan.micro_batch, self.seq_len) for ids, labels in self.micro_batches()]

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed, "next_batch": self.next_batch, "seed": self.seed,
                "global_batch": self.plan.global_batch, "data_id": self.data_id,
                "sources": dict(zip(self.data.names, self.data.weights))}

    def load_state_dict(self, sd: dict) -> None:
        if "seed" in sd and int(sd["seed"]) != self.seed:
            raise ValueError(f"cannot resume the data loader: the checkpoint's sample order used seed={sd['seed']}, "
                             f"this run seed={self.seed}; resume with the same seed")
        if sd.get("data_id") and self.data_id and sd["data_id"] != self.data_id:
            raise ValueError(f"cannot resume the data loader: the checkpoint was trained on dataset {sd['data_id']}, "
                             f"this run reads {self.data_id} (data.name, data.sources or their files changed); "
                             f"resume with the same data")
        if sd.get("sources") and sd["sources"] != dict(zip(self.data.names, self.data.weights)):
            raise ValueError(f"cannot resume the data loader: the checkpoint blended {sd['sources']}, this run "
                             f"{dict(zip(self.data.names, self.data.weights))}; resume with the same data.sources")
        if "consumed_samples" in sd:
            self.consumed = int(sd["consumed_samples"])
        else:  # the first format: next batch index at the saved global batch size
            self.consumed = int(sd["next_batch"]) * int(sd.get("global_batch", self.plan.global_batch))
