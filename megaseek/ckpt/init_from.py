"""`train.init_from=DIR`: start a run from another run's weights (weights only: step 0, a fresh optimizer).

DIR is a run directory (its newest valid checkpoint) or a checkpoint directory. Checkpoints are layout-free
(full fp32 tensors under canonical tp = 1 names, see checkpoint.py), so the weights load at any tp / dp /
ZeRO stage of the new run: every rank reads the full tensors and keeps its own shard.

Vocabulary growth: when the new run's model has MORE vocabulary rows than the checkpoint (special tokens
added for chat, a reward token) and every other model key is equal, the embedding and an untied head are
grown with each new row set to the mean of the old rows,

    E_new[v] = (1 / V_old) * sum_{u < V_old} E_old[u]      for V_old <= v < V_new,

so a new token starts as the "average token". Any other difference in the model config is refused, naming
the keys. `init_model_config` gives the config a stage should run with (the checkpoint's, grown).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

VOCAB_TENSORS = ("embed.weight", "lm_head.weight")  # canonical names with a vocabulary dimension 0


class InitFromError(ValueError):
    """A `train.init_from` that cannot be used; the message names the path and the fix."""


def resolve_init(path: str | Path) -> Path:
    """The checkpoint directory `train.init_from` names (a run directory -> its newest valid checkpoint)."""
    from megaseek.ckpt.hf import CheckpointError, resolve_checkpoint
    try:
        return resolve_checkpoint(path)
    except CheckpointError as e:
        raise InitFromError(f"train.init_from={path}: {e}") from None


def init_model_config(ckpt: Path, vocab_size: Optional[int] = None):
    """The checkpoint's ModelConfig, with vocab_size raised to `vocab_size` when given (never lowered)."""
    import dataclasses

    from megaseek.ckpt.hf import model_config
    cfg = model_config(ckpt)
    if vocab_size is not None and vocab_size != cfg.vocab_size:
        if vocab_size < cfg.vocab_size:
            raise InitFromError(f"train.init_from={ckpt}: the tokenizer has {vocab_size} tokens, fewer than the "
                                f"checkpoint's vocabulary {cfg.vocab_size}")
        cfg = dataclasses.replace(cfg, vocab_size=int(vocab_size))
    return cfg


def grow_rows(weights: dict, old_vocab: int, new_vocab: int) -> dict:
    """Canonical full weights with the vocabulary tensors grown from old_vocab to new_vocab rows (mean rows)."""
    import torch
    if new_vocab < old_vocab:
        raise InitFromError(f"cannot shrink the vocabulary from {old_vocab} to {new_vocab}")
    out = dict(weights)
    for name in VOCAB_TENSORS:
        w = weights.get(name)
        if w is None or new_vocab == old_vocab:
            continue
        if w.shape[0] != old_vocab:
            raise InitFromError(f"{name} has {w.shape[0]} rows, expected the checkpoint vocabulary {old_vocab}")
        mean = w.mean(dim=0, keepdim=True)  # (1, h)
        out[name] = torch.cat([w, mean.expand(new_vocab - old_vocab, -1)], dim=0)  # (V_new, h)
    return out


def init_weights(ckpt: Path, model_cfg) -> dict:
    """Full canonical weights of `ckpt` fitted to `model_cfg` (vocabulary grown where it is larger)."""
    from megaseek.ckpt.hf import checked_weights, model_config
    have = model_config(ckpt)
    diff = {k: (v, model_cfg.to_dict().get(k)) for k, v in have.to_dict().items()
            if k not in ("vocab_size", "name", "fused") and model_cfg.to_dict().get(k) != v}
    if diff:
        raise InitFromError(f"train.init_from={ckpt}: the checkpoint holds another model; (checkpoint, run) differ "
                            f"in {diff}: drop the model overrides (a stage takes the checkpoint's model)")
    return grow_rows(checked_weights(ckpt, have), have.vocab_size, model_cfg.vocab_size)


def load_init_weights(init_from: str | Path, engine, groups, model_cfg, log: Callable[[str], None] = print) -> Path:
    """Collective: set the engine's parameters (at this run's layout) from `init_from`'s weights.

    Weights only: the optimizer moments, the step, the loader position and the RNG are not read (the run
    starts at step 0 with a fresh optimizer). Returns the checkpoint directory used."""
    from megaseek.ckpt.state import canonical_name, canonical_names, load_full_state
    ckpt = resolve_init(init_from)
    full = init_weights(ckpt, model_cfg)
    module = engine.module
    local = canonical_names(module)
    lacking = sorted(local - set(full))
    if lacking:
        raise InitFromError(f"train.init_from={ckpt}: no tensor for {lacking[:5]}")
    missing = load_full_state(engine, module, groups, {n: {"fp32": full[n]} for n in local},
                              load_optimizer=False)
    if missing:
        raise InitFromError(f"train.init_from={ckpt}: parameters not set: {missing[:5]}")
    import torch
    with torch.no_grad():  # persistent model state that is not a parameter (the MoE correction bias): as saved
        for n, buf in module.named_buffers():
            c = canonical_name(module, n)
            if c in full:
                buf.copy_(full[c].to(buf.dtype))
    log(f"[init_from] weights of {ckpt} ({len(local)} tensors, vocabulary {model_cfg.vocab_size}); step 0, "
        f"fresh optimizer")
    return ckpt
