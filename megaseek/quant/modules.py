"""Which modules of a tp = 1 model are quantized, and swapping them for plain `nn.Linear` (torchao's filter).

Targets are the linear layers of the transformer blocks (`ColumnParallelLinear` / `RowParallelLinear` / the GQA
`KVProjection` / `nn.Linear`), named by their canonical checkpoint names without `.weight`
(e.g. `layers.0.attn.k_proj`).
The embedding and the LM head stay in float (the head is applied by `gemm.linear` on its weight, not by calling
the module, so hooks and module swaps would miss it; like GPTQ's reference recipe, it is not quantized).
At tp = 1 both parallel linears compute `x W^T + b` (`megaseek/tensor_parallel/gemm.py`; their communication is
the identity), so an `nn.Linear` holding the same tensors is a drop-in replacement from the outside (equal up to
the GEMM library's rounding, ~1e-7 relative, when `train.gemm` runs the layers on oneDNN).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from megaseek.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear


def _kv_types() -> tuple:
    """The GQA key/value projection (x W^T on `.weight` at tp = 1), wherever the model defines it."""
    for mod in ("megaseek.model.attention", "megaseek.model.layers"):
        try:
            return (getattr(__import__(mod, fromlist=["KVProjection"]), "KVProjection"),)
        except (ImportError, AttributeError):
            continue
    return ()


LINEAR_TYPES = (ColumnParallelLinear, RowParallelLinear, nn.Linear) + _kv_types()
KEEP_ATTRS = ("local_heads", "d")  # read by the attention from its k/v projections
SKIP = ("lm_head",)


def target_linears(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """name -> linear module, in module-definition order (q, k, v, o, gate, up, down per block)."""
    ctx = getattr(model, "ctx", None)
    if ctx is not None and getattr(ctx, "size", 1) != 1:
        raise ValueError("quantization works on a tp = 1 model (load it with megaseek.ckpt.hf.load_model)")
    out = OrderedDict()
    for name, mod in model.named_modules():
        if isinstance(mod, LINEAR_TYPES) and name.split(".")[-1] not in SKIP and name not in SKIP:
            if getattr(mod, "replicated", False) or not isinstance(getattr(mod, "weight", None), torch.Tensor):
                continue  # a k/v projection replicated across tensor ranks (tp > 1 only) or a container
            if getattr(mod, "gather_output", False):
                raise ValueError(f"{name}: gather_output linears are not supported")
            out[name] = mod
    if not out:
        raise ValueError("the model has no linear layers to quantize")
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def to_nn_linear(model: nn.Module) -> nn.Module:
    """Replace every target linear by an `nn.Linear` sharing its weight (and bias) tensors; in place."""
    for name, mod in target_linears(model).items():
        if type(mod) is nn.Linear:
            continue
        lin = nn.Linear(mod.weight.shape[1], mod.weight.shape[0], bias=getattr(mod, "bias", None) is not None)
        lin.weight = mod.weight
        if getattr(mod, "bias", None) is not None:
            lin.bias = mod.bias
        for a in KEEP_ATTRS:
            if hasattr(mod, a) and not isinstance(getattr(mod, a), (nn.Module, torch.Tensor)):
                setattr(lin, a, getattr(mod, a))
        _set(model, name, lin)
    return model


def set_weight(mod: nn.Module, w: torch.Tensor) -> None:
    """Overwrite a module's weight values (same shape and dtype), keeping the Parameter object."""
    with torch.no_grad():
        mod.weight.copy_(w.to(mod.weight.dtype))


def saved_attrs(model: nn.Module) -> dict:
    """name -> {attr: value} of the KEEP_ATTRS on the target linears (module swaps by other libraries drop them)."""
    return {n: {a: getattr(m, a) for a in KEEP_ATTRS if hasattr(m, a) and isinstance(getattr(m, a), int)}
            for n, m in target_linears(model).items()}


def restore_attrs(model: nn.Module, saved: dict) -> None:
    for name, attrs in saved.items():
        mod = model.get_submodule(name)
        for a, v in attrs.items():
            setattr(mod, a, v)
