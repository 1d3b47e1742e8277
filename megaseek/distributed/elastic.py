"""Elastic restarts: what changed between the layout that wrote a checkpoint and the layout resuming from it.

A job started with `torchrun --nnodes=MIN:MAX` (c10d rendezvous) that loses a node is restarted by the
surviving agents with a smaller world; one that gains a node is restarted with a larger one. Every restart
resumes from the newest whole checkpoint, whose format is layout-free, and the global batch is a config
constant, so only the data-parallel degree and the accumulation change:

    global_batch = micro_batch * grad_accum * dp        (fixed)
    dp 2 -> 1:  grad_accum doubles; global batch k holds the same samples (layout independence)

so the losses from the resumed step on equal those of an uninterrupted run, and at most `train.save_interval`
steps are redone. `layout_change` is the pure decision of what to log and record in `metrics.jsonl` when a
run starts from a checkpoint: nothing when the layout is the one that saved it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional

AXES = ("world_size", "dp", "tp", "pp", "ep")


def _layout(d: Mapping, what: str) -> dict:
    missing = [k for k in ("dp", "tp", "pp") if k not in d]
    if missing:
        raise ValueError(f"{what} layout {dict(d)} lacks {', '.join(missing)}")
    out = {k: int(d[k]) for k in ("dp", "tp", "pp")}
    out["world_size"] = int(d.get("world_size", out["dp"] * out["tp"] * out["pp"]))
    out["ep"] = int(d.get("ep") or 1)  # manifests name ep only when > 1
    if out["world_size"] != out["dp"] * out["tp"] * out["pp"]:
        raise ValueError(f"{what} layout {dict(d)}: world_size is not dp * tp * pp")
    for k in ("grad_accum", "micro_batch", "global_batch"):
        if k in d and d[k] is not None:
            out[k] = int(d[k])
    return out


def layout_change(previous: Optional[Mapping], current: Mapping, step: int) -> Optional[dict]:
    """The record to log when a run resumes at `step` from a checkpoint saved at layout `previous` (its
    manifest's `layout`: dp, tp, pp, world_size, ep when > 1; None for a fresh start) with this run's layout
    `current` (dp, tp, pp, world_size, optionally ep, grad_accum, micro_batch, global_batch). None when nothing
    changed. The training job logs the message and puts the record, under the key `layout_change`, into the
    first metrics.jsonl record after the resume (every line stays a step record).

    reason: `shrink` (fewer ranks: nodes were lost), `grow` (more ranks: nodes came back or were added) or
    `reshape` (same number of ranks, another dp/tp/pp split)."""
    if previous is None:
        return None
    prev, cur = _layout(previous, "checkpoint"), _layout(current, "current")
    if all(prev[k] == cur[k] for k in AXES):
        return None
    if cur["world_size"] < prev["world_size"]:
        reason = "shrink"
    elif cur["world_size"] > prev["world_size"]:
        reason = "grow"
    else:
        reason = "reshape"
    if "global_batch" in prev and "global_batch" in cur and prev["global_batch"] != cur["global_batch"]:
        raise ValueError(f"elastic restart at step {step} changes the global batch "
                         f"{prev['global_batch']} -> {cur['global_batch']}: train.global_batch_size must stay "
                         f"fixed across restarts, or the samples of each step change")
    desc = " ".join(f"{k}={prev[k]}->{cur[k]}" for k in AXES if prev[k] != cur[k])
    if "grad_accum" in cur:
        before = prev.get("grad_accum")
        if before is None and "global_batch" in cur and "micro_batch" in cur:  # the manifest has no batch
            before = cur["global_batch"] // (cur["micro_batch"] * prev["dp"])
        desc += f", grad_accum {before if before is not None else '?'}->{cur['grad_accum']} (same global batch)"
    return {"step": int(step), "event": "layout_change", "reason": reason,
            "layout": {k: cur[k] for k in AXES}, "previous_layout": {k: prev[k] for k in AXES},
            "message": f"[elastic] {reason} at step {step}: {desc}"}


def checkpoint_layout(ckpt: Path) -> dict:
    """The layout recorded in a checkpoint's manifest (dp, tp, pp, world_size, ep when > 1)."""
    from megaseek.ckpt.checkpoint import read_manifest
    return dict(read_manifest(Path(ckpt))["layout"])
