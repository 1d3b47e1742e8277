"""Calibration and evaluation tokens, held-out perplexity, and the input Hessians of linear layers.

Token windows are (n, s + 1) int64 rows: inputs w[:, :-1], targets w[:, 1:]. They come from the run's prepared
dataset (the resolved config in the checkpoint's state.json names it): calibration from the *train* split,
perplexity from the held-out *valid* split, so the quantizer never sees the text it is judged on; or from a
text file tokenized with the checkpoint's tokenizer.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def dataset_windows(data_cfg: Mapping, vocab_size: int, seq_len: int, split: str, n: Optional[int] = None,
                    seed: int = 0) -> torch.Tensor:
    """(n, seq_len + 1) windows of a prepared dataset's `split` (train: n drawn at random by `seed`; valid: the
    first n, all when n is None), taken round-robin over its sources."""
    from megaseek.data.loader import TokenWindows
    from megaseek.data.shards import TokenStream
    from megaseek.data.spec import DataSpec
    spec = DataSpec.from_config(data_cfg, vocab_size=vocab_size)
    ds = spec.tier_dir("tokenized")
    if not (ds / "index.json").is_file():
        raise FileNotFoundError(f"{ds}: no prepared dataset (run launch/prepare_data.py, or pass calib_file= "
                                f"and eval_file= text files)")
    index = json.loads((ds / "index.json").read_text())
    per_source = []
    for src in spec.sources:
        stream = TokenStream([ds / s["path"] for s in index["sources"][src.name]["shards"]])
        tw = TokenWindows(stream, seq_len, spec.valid_fraction, split)
        order = np.random.default_rng(seed).permutation(len(tw)) if split == "train" else np.arange(len(tw))
        per_source.append((tw, order))
    total = sum(len(tw) for tw, _ in per_source)
    if total == 0:
        raise ValueError(f"{ds}: the {split} split has no window of {seq_len + 1} tokens")
    n = total if n is None else min(int(n), total)
    rows, k = [], 0
    while len(rows) < n:
        for tw, order in per_source:
            if k < len(order) and len(rows) < n:
                rows.append(tw.window(int(order[k])))
        k += 1
    return torch.from_numpy(np.stack(rows))


def text_windows(ckpt: Path, path: str | Path, seq_len: int) -> torch.Tensor:
    """(k, seq_len + 1) non-overlapping windows (stride seq_len) of a text file under the checkpoint's tokenizer."""
    from megaseek.ckpt.hf import text_ids
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such text file")
    ids = torch.tensor(text_ids(Path(ckpt), p.read_text(encoding="utf-8")), dtype=torch.long)
    k = (ids.numel() - 1) // seq_len
    if k < 1:
        raise ValueError(f"{p}: fewer than {seq_len + 1} tokens")
    return torch.stack([ids[i * seq_len:i * seq_len + seq_len + 1] for i in range(k)])


def run_windows(ckpt: Path, seq_len: int, split: str, n: Optional[int], seed: int = 0) -> torch.Tensor:
    """dataset_windows of the run that wrote the checkpoint (its resolved config in state.json)."""
    from megaseek.ckpt import checkpoint as C
    try:
        cfg = C.read_state(ckpt)["config"]
        data, vocab = cfg["data"], int(cfg["model"]["vocab_size"])
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise FileNotFoundError(f"{ckpt}: state.json names no dataset ({e}); pass calib_file= and eval_file=") from e
    return dataset_windows(data, vocab, seq_len, split, n, seed)


@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats) over every target of the windows."""
    V = model.cfg.vocab_size
    total, count = 0.0, 0
    for a in range(0, windows.shape[0], batch):
        w = windows[a:a + batch]
        z = model(w[:, :-1])[..., :V]  # (b, s, V)
        total += float(F.cross_entropy(z.reshape(-1, V).double(), w[:, 1:].reshape(-1), reduction="sum"))
        count += w[:, 1:].numel()
    return total / count


def perplexity(model: nn.Module, windows: torch.Tensor, batch: int = 8) -> float:
    return math.exp(mean_loss(model, windows, batch))


@torch.no_grad()
def input_groups(model: nn.Module, modules: Mapping[str, nn.Module], sample: torch.Tensor) -> list[list[str]]:
    """The target modules in execution order, grouped by the input tensor they share (q/k/v; gate/up)."""
    seen: list[tuple[str, int]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: seen.append((n, id(inp[0]))))
             for n, m in modules.items()]
    try:
        model(sample[:1, :-1])
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, key in seen:
        if any(name in g for g in groups):
            continue
        if groups and key == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = key
    missing = [n for n in modules if not any(n in g for g in groups)]
    if missing:
        raise ValueError(f"modules never called in a forward pass: {missing[:5]}")
    return groups


@torch.no_grad()
def hessians(model: nn.Module, modules: Mapping[str, nn.Module], windows: torch.Tensor,
             batch: int = 8) -> dict[str, torch.Tensor]:
    """name -> H = X^T X (in, in), float64, X (tokens, in) every input row the module saw on the windows."""
    H: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()  # (b s, in)
            H[name] = H.get(name, 0) + x.T @ x
        return f
    hooks = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for a in range(0, windows.shape[0], batch):
            model(windows[a:a + batch, :-1])
    finally:
        for h in hooks:
            h.remove()
    return H
