"""2:4 structured sparsity: in every group of 4 consecutive input weights of a row, 2 are zero.

One-shot pruning keeps, per group, the 2 weights of largest score:

    magnitude:  score_ij = |W_ij|
    Wanda:      score_ij = |W_ij| * ||X_j||_2      (Sun et al., 2023; X_j the j-th input feature over the
                                                    calibration tokens, ||X_j||^2 = H_jj with H = X^T X)

`masks` are bool tensors shaped like each weight (True = kept). `apply_masks(model, masks)` zeroes the pruned
weights again; call it after every optimizer step of a fine-tune so the pattern survives training.
The 2:4 kernels (cuSPARSELt) are CUDA-only; the masks and the pattern work anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from megaseek.quant.modules import target_linears

METHODS = ("magnitude", "wanda")


def mask_2of4(score: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """bool mask (out, in) keeping the n largest scores of every m consecutive columns of each row."""
    out, cols = score.shape
    if cols % m:
        raise ValueError(f"input size {cols} is not a multiple of {m}: no {n}:{m} pattern")
    g = score.reshape(out, cols // m, m)  # (out, in/m, m)
    keep = torch.zeros_like(g, dtype=torch.bool)
    keep.scatter_(2, g.topk(n, dim=2).indices, True)
    return keep.reshape(out, cols)


def prune_2of4(model: nn.Module, method: str = "magnitude", hessian: Optional[dict] = None) -> dict:
    """Prune every target linear of the model in place; returns name -> mask. Wanda needs `hessian`
    (name -> X^T X, see megaseek.quant.calib.hessians)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    masks = {}
    for name, mod in target_linears(model).items():
        w = mod.weight.detach()
        score = w.abs()
        if method == "wanda":
            if hessian is None or name not in hessian:
                raise ValueError(f"method=wanda needs calibration statistics for {name}")
            score = score * torch.diag(hessian[name]).clamp(min=0).sqrt().to(w.dtype)[None, :]
        masks[name] = mask_2of4(score)
    apply_masks(model, masks)
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict) -> None:
    """W <- W * mask for every masked linear (call after each optimizer step to keep the sparsity)."""
    mods = target_linears(model)
    for name, mask in masks.items():
        mods[name].weight.mul_(mask.to(mods[name].weight.dtype))


def check_2of4(w: torch.Tensor) -> int:
    """Number of groups of 4 consecutive columns with more than 2 non-zeros (0 means the pattern holds)."""
    nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)  # (out, in/4)
    return int((nz > 2).sum())


def density_report(model: nn.Module) -> dict:
    """{name: density} of every target linear plus `total` (non-zeros / elements over all of them)."""
    rep, nz, tot = {}, 0, 0
    for name, mod in target_linears(model).items():
        w = mod.weight.detach()
        k = int((w != 0).sum())
        rep[name] = k / w.numel()
        nz, tot = nz + k, tot + w.numel()
    rep["total"] = nz / tot
    return rep
