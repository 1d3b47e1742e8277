"""Reused CPU scratch tensors for the step's largest temporaries (the loss's (b, s, V/p) buffer).

On CPU torch has no caching allocator: a tensor above glibc's mmap threshold (32 MiB at most) is mapped
fresh at each allocation and unmapped at its free, so every step pays its page faults (one per 4 KiB,
the kernel zeroing each page) before the first pass over it: for the tiny model's 64 MiB loss buffer
~16k faults and ~10 ms a step. `scratch` keeps the last `SLOTS` such tensors (for the training step:
`keep`) and hands one out again only when nothing else holds its storage (the use count of the
kept tensor's storage is back to what it was when nothing but the pool held it), so a buffer still saved
for a backward, or kept by a caller (a view, a .grad that took the returned gradient), is never handed out
twice: the caller then gets a fresh tensor. (Holding only `t.untyped_storage()`, no tensor, is not seen:
nothing here does that.) CUDA's caching allocator does this already:
`scratch` is a plain `torch.empty` off CPU.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

SLOTS = 4                     # distinct (shape, dtype) kept: the main loss and up to 3 MTP depths' losses
MIN_BYTES = 1 << 20           # smaller tensors come from malloc's own free lists
_pool: "OrderedDict[tuple, tuple[torch.Tensor, int]]" = OrderedDict()


def _use_count(t: torch.Tensor) -> int:
    """References to t's storage (tensors and views holding it; torch's own count, a private API)."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_COUNTS = hasattr(torch._C, "_storage_Use_Count")  # without it: plain torch.empty, never a shared buffer


def scratch(shape, dtype: torch.dtype, device, keep: bool = True) -> torch.Tensor:
    """An uninitialized tensor (shape, dtype) on device, reused across calls where free (see above).
    keep=False: a plain torch.empty (the caller is not the training step, e.g. an eval under no_grad, whose
    shapes should not take the slots)."""
    device = torch.device(device)
    shape = tuple(shape)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if not keep or device.type != "cpu" or nbytes < MIN_BYTES or not _COUNTS:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (shape, dtype)
    kept = _pool.get(key)
    if kept is not None:
        buf, free_count = kept
        if _use_count(buf) == free_count:  # nothing but the pool holds it
            _pool.move_to_end(key)
            return buf.view(shape)  # a new view: its holder raises the use count while it lives
        return torch.empty(shape, dtype=dtype, device=device)  # in use: a fresh one, not kept
    buf = torch.empty(shape, dtype=dtype, device=device)
    _pool[key] = (buf, _use_count(buf))
    while len(_pool) > SLOTS:
        _pool.popitem(last=False)
    return buf.view(shape)


def clear() -> None:
    """Drop the kept tensors (tests; a process that changes shape for good)."""
    _pool.clear()
