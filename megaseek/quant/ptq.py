"""Post-training weight quantization of a tp = 1 model: RTN or GPTQ, in place.

GPTQ runs "true-sequentially": the target linears are grouped by the input they share (q/k/v, o, gate/up, down
of every block, in execution order); each group's Hessians are collected on the calibration windows with every
earlier group already quantized, so later layers compensate the errors of earlier ones. Every layer reports its
relative output error tr(dW H dW^T) / tr(W H W^T) for the method used and for RTN on the same Hessian.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from megaseek.quant.calib import hessians, input_groups
from megaseek.quant.gptq import gptq, output_error
from megaseek.quant.groupwise import QuantizedWeight, check_bits, rtn
from megaseek.quant.modules import set_weight, target_linears

METHODS = ("rtn", "gptq")


@dataclass
class PTQResult:
    weights: dict          # name -> QuantizedWeight
    layers: list           # [{name, shape, rtn_error, error}] (errors only when calibrated)
    method: str
    bits: int
    group_size: int
    act_order: bool


def quantize_model(model: nn.Module, method: str, bits: int, group_size: int,
                   calib: Optional[torch.Tensor] = None, act_order: bool = True, damp: float = 0.01,
                   batch: int = 8, log: Callable[[str], None] = lambda s: None) -> PTQResult:
    """Quantize every target linear of `model` (weights replaced by their dequantized values, in place).

    calib: (n, s + 1) token windows; needed for GPTQ, optional for RTN (then no error report)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; choose one of {METHODS}")
    check_bits(bits, group_size)
    if method == "gptq" and calib is None:
        raise ValueError("method=gptq needs calibration windows")
    model.eval()
    mods = target_linears(model)
    groups = input_groups(model, mods, calib) if calib is not None else [[n] for n in mods]
    out, report = {}, []
    for group in groups:
        H = hessians(model, {n: mods[n] for n in group}, calib, batch) if calib is not None else {}
        for name in group:
            w = mods[name].weight.detach().float()  # (out, in)
            q_rtn = rtn(w, bits, group_size)
            q = q_rtn if method == "rtn" else gptq(w, H[name], bits, group_size, act_order=act_order, damp=damp)
            entry = {"name": name, "shape": list(w.shape)}
            if name in H:
                entry["rtn_error"] = output_error(w, q_rtn.dequantize(), H[name])
                entry["error"] = output_error(w, q.dequantize(), H[name])
                log(f"[quant] {name} {tuple(w.shape)}: output error {method} {entry['error']:.3e}, "
                    f"rtn {entry['rtn_error']:.3e}")
            set_weight(mods[name], q.dequantize())
            out[name] = q
            report.append(entry)
    return PTQResult(weights=out, layers=report, method=method, bits=int(bits), group_size=int(group_size),
                     act_order=bool(act_order and method == "gptq"))


def apply_quantized(model: nn.Module, weights: dict) -> nn.Module:
    """Set each named target linear to its dequantized QuantizedWeight; names must match exactly."""
    mods = target_linears(model)
    missing, extra = sorted(set(mods) - set(weights)), sorted(set(weights) - set(mods))
    if missing or extra:
        raise ValueError(f"quantized weights do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, q in weights.items():
        w = q.dequantize() if isinstance(q, QuantizedWeight) else q
        if tuple(w.shape) != tuple(mods[name].weight.shape):
            raise ValueError(f"{name}: quantized shape {tuple(w.shape)} != {tuple(mods[name].weight.shape)}")
        set_weight(mods[name], w)
    return model
