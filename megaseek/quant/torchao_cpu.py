"""torchao on CPU: int8 weight-only and dynamic int8 (activations per token, weights per channel) inference,
and quantization-aware training (QAT) through `QATConfig` prepare / convert.

torchao's `quantize_` acts on `nn.Linear`; the target linears (see modules.py) are swapped for `nn.Linear`
first (exact at tp = 1). What runs on CPU with torch 2.13 (measured): `Int8WeightOnlyConfig`,
`Int8DynamicActivationInt8WeightConfig`, `Int8DynamicActivationIntxWeightConfig` (int1..int8 weights in groups),
QAT fake quantizers; `Int4WeightOnlyConfig` needs CUDA.

QAT (Jacob et al., 2018; torchao): during training every target linear computes
    y = fq_a(x) fq_w(W)^T,   fq(t) = (clamp(round(t / s) + z, qmin, qmax) - z) s
with activations int8 asymmetric per token and weights int-b symmetric per group (dynamic scales), and the
straight-through estimator d fq(t)/dt = 1; `convert` then stores the weights as b-bit integers with the same
scales and runs int8 per-token activation quantization, so prepared and converted logits agree.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn as nn

from megaseek.quant.modules import restore_attrs, saved_attrs, target_linears, to_nn_linear

INT8_MODES = ("int8_weight_only", "int8_dynamic")
_DTYPES = {b: getattr(torch, f"int{b}") for b in range(1, 9)}


def _ao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels report their absence
    import torchao.quantization as q
    return q


def _filter(model: nn.Module):
    names = set(target_linears(model))
    return lambda mod, fqn: isinstance(mod, nn.Linear) and fqn in names


def quantize_int8(model: nn.Module, mode: str) -> nn.Module:
    """int8 weight-only (per output channel, symmetric) or dynamic int8 (activations per token too), in place."""
    if mode not in INT8_MODES:
        raise ValueError(f"mode={mode!r}; choose one of {INT8_MODES}")
    q = _ao()
    to_nn_linear(model)
    cfg = q.Int8WeightOnlyConfig() if mode == "int8_weight_only" else q.Int8DynamicActivationInt8WeightConfig()
    keep = saved_attrs(model)
    q.quantize_(model, cfg, filter_fn=_filter(model))
    restore_attrs(model, keep)
    return model


def _weight_dtype(bits: int):
    if int(bits) not in _DTYPES:
        raise ValueError(f"qat weight bits={bits} must be in [1, 8]")
    return _DTYPES[int(bits)]


def qat_prepare(model: nn.Module, weight_bits: int = 4, group_size: int = 32,
                activation_bits: Optional[int] = 8) -> nn.Module:
    """Swap in fake-quantized linears (weights int-b per group, activations int8 per token or none); in place."""
    q = _ao()
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    to_nn_linear(model)
    for name, mod in target_linears(model).items():
        if mod.weight.shape[1] % group_size:
            raise ValueError(f"{name}: input size {mod.weight.shape[1]} is not a multiple of group_size={group_size}")
    act = None
    if activation_bits:
        act = IntxFakeQuantizeConfig(_weight_dtype(activation_bits), "per_token", is_symmetric=False)
    wt = IntxFakeQuantizeConfig(_weight_dtype(weight_bits), group_size=group_size)
    keep = saved_attrs(model)
    q.quantize_(model, QATConfig(activation_config=act, weight_config=wt, step="prepare"), filter_fn=_filter(model))
    restore_attrs(model, keep)
    return model


def qat_convert(model: nn.Module, weight_bits: int = 4, group_size: int = 32,
                activation_bits: Optional[int] = 8) -> nn.Module:
    """Replace the fake-quantized linears by integer weights (and int8 dynamic activations); in place."""
    q = _ao()
    from torchao.quantization.granularity import PerGroup
    from torchao.quantization.qat import FakeQuantizedLinear, QATConfig
    names = set(target_linears(model))
    if activation_bits:
        if int(activation_bits) != 8:
            raise ValueError("converted activations are int8 (torchao); use activation_bits=8 or none")
        base = q.Int8DynamicActivationIntxWeightConfig(weight_dtype=_weight_dtype(weight_bits),
                                                       weight_granularity=PerGroup(group_size))
    else:
        base = q.IntxWeightOnlyConfig(weight_dtype=_weight_dtype(weight_bits), granularity=PerGroup(group_size))
    keep = saved_attrs(model)
    q.quantize_(model, QATConfig(base, step="convert"),
                filter_fn=lambda mod, fqn: isinstance(mod, (nn.Linear, FakeQuantizedLinear)) and fqn in names)
    restore_attrs(model, keep)
    return model
