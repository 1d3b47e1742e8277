"""What the trainer asks of the data layer: one call that returns the loaders of this rank.

The trainer knows nothing of tiers, tokenizers or blends: it gets a `DataBundle`. `build_data` checks
the data config (one ConfigError before any work), prepares the tiers once (local rank 0 of each
node; the others wait; a failure there is raised on every rank) and opens the tokenized tier named by
`data.name`: one packed window stream per source, blended by weight.

Preparing a large corpus takes longer than the process-group timeout lets the other ranks wait: run
`launch/prepare_data.py` first; the trainer then only checks the manifests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.distributed as dist

from megaseek.config.schema import ConfigError
from megaseek.data.loader import BatchPlan, BlendedWindows, InterleavedWindows, ResumableLoader, TokenWindows
from megaseek.data.shards import TokenStream
from megaseek.data.spec import DataSpec
from megaseek.data.tiers import read_manifest


@dataclass
class DataBundle:
    train: ResumableLoader          # micro_batches(), state_dict(), load_state_dict()
    valid: Optional[Any]            # held-out windows (__len__, batch(ids)), or None
    tokenizer_path: Path            # tokenizer.json (Hugging Face tokenizers)
    dataset_dir: Path


def _prepare_everywhere(spec: DataSpec, local_rank: int, log) -> None:
    """Local rank 0 prepares; every rank learns whether it worked (object collectives work on gloo and NCCL)."""
    from megaseek.data.pipeline import prepare
    err = None
    if local_rank == 0:
        try:
            prepare(spec, log=log)
        except Exception as e:  # raised below, after the others have been told
            err = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        msgs = [None] * dist.get_world_size()
        dist.all_gather_object(msgs, None if err is None else f"{type(err).__name__}: {err}")
        if err is None and any(msgs):
            failed = next(m for m in msgs if m)
            raise RuntimeError(f"data preparation failed on another rank: {failed}")
    if err is not None:
        raise err


def open_dataset(spec: DataSpec, seq_len: int, plan: BatchPlan, seed: int, log=print):
    """(train loader, valid windows or None, tokenized dir) of a prepared dataset."""
    ds_dir = spec.tier_dir("tokenized")
    manifest = read_manifest(ds_dir)
    if manifest is None:
        raise FileNotFoundError(f"{ds_dir} has no manifest: run launch/prepare_data.py data={spec.name} first")
    index = json.loads((ds_dir / "index.json").read_text())
    train, valid = {}, {}
    for src in spec.sources:
        entry = index["sources"].get(src.name)
        if entry is None:
            raise ConfigError(f"data.sources.{src.name} is not in {ds_dir}; prepare the data again")
        stream = TokenStream([ds_dir / s["path"] for s in entry["shards"]])
        try:
            train[src.name] = TokenWindows(stream, seq_len, spec.valid_fraction, "train")
        except ValueError as e:
            raise ConfigError(f"data.sources.{src.name}: {e}") from None
        if spec.valid_fraction > 0:
            valid[src.name] = TokenWindows(stream, seq_len, spec.valid_fraction, "valid")
    weights = spec.weights()
    blend = BlendedWindows(train, weights, spec.blend_window, seed)
    loader = ResumableLoader(blend, plan, seed, data_id=manifest["digest"])
    if len(train) > 1:
        per = blend.schedule.epochs_per_sample()
        log("[data] blend (window %d): " % blend.schedule.window + ", ".join(
            f"{n} {c}/{blend.schedule.window} ({len(train[n])} windows, an epoch every {per[n]:,.0f} samples)"
            for n, c in zip(blend.names, blend.schedule.counts)))
    val = None
    if valid:
        val = InterleavedWindows(valid, weights) if len(valid) > 1 else next(iter(valid.values()))
        if len(val) == 0:
            val = None
    return loader, val, ds_dir


def build_data(cfg: Any, local_rank: int, plan: BatchPlan, seq_len: int, seed: int, log=print) -> DataBundle:
    """Prepare (once, on local rank 0 of each node; the others wait) and open the training data.

    cfg: the whole run config (reads cfg.data and cfg.model.vocab_size).
    """
    vocab = int(cfg.model.vocab_size)
    spec = DataSpec.from_config(cfg.data, vocab_size=vocab)
    if spec.tokenizer.vocab_size > vocab:
        raise ConfigError(f"data.tokenizer.vocab_size={spec.tokenizer.vocab_size} > model.vocab_size={vocab}: "
                          f"the model could not embed every token; make them equal")
    _prepare_everywhere(spec, local_rank, log)
    train, valid, ds_dir = open_dataset(spec, seq_len, plan, seed, log)
    return DataBundle(train=train, valid=valid, tokenizer_path=ds_dir / "tokenizer.json", dataset_dir=ds_dir)
