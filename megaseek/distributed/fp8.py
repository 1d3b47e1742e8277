"""`precision=fp8`: where it can run, decided before any work.

FP8 training runs the matmuls of the linear layers in float8 (e4m3 forward, e5m2 gradients, per-tensor
scales) on the tensor cores of Hopper (compute capability 9.0) and Blackwell (10.x, 12.x) GPUs; the master
weights, optimizer states and everything outside the matmuls stay in fp32/bf16. On CPU and on older GPUs
there are no fp8 tensor cores, so the run is refused with one message instead of failing (or emulating
slowly) deep inside the first step. The kernels come from `torchao` float8 training, or Transformer Engine
when it is installed.
"""
from __future__ import annotations

import importlib.util
from typing import Optional, Sequence

MIN_CAPABILITY = (9, 0)  # Hopper
BACKENDS = ("torchao", "transformer_engine")


def _error(msg: str) -> Exception:
    try:  # the config package's error when it is there (validate() reports it with exit code 2)
        from megaseek.config.schema import ConfigError
        return ConfigError(msg)
    except ImportError:
        return ValueError(msg)


def installed_backends() -> list[str]:
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def check_fp8(has_cuda: bool, device_capability: Optional[Sequence[int]],
              backends: Optional[Sequence[str]] = None) -> str:
    """Returns the fp8 backend to use ('torchao' or 'transformer_engine'), or raises one error that names
    `precision=fp8`, what this machine has, and what to use instead. `device_capability`: the
    (major, minor) of torch.cuda.get_device_capability(), None without CUDA. `backends`: the installed
    fp8 libraries (default: looked up)."""
    alt = "use precision=bf16 (or fp32 on CPU)"
    if not has_cuda or device_capability is None:
        raise _error(f"precision=fp8 needs an NVIDIA GPU with fp8 tensor cores (Hopper or Blackwell, compute "
                     f"capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}); this machine has no CUDA device: {alt}")
    cap = tuple(int(x) for x in device_capability)[:2]
    if cap < MIN_CAPABILITY:
        raise _error(f"precision=fp8 needs compute capability >= {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} (Hopper "
                     f"or Blackwell); this GPU has {cap[0]}.{cap[1]}: {alt}")
    found = list(installed_backends() if backends is None else backends)
    for b in BACKENDS:
        if b in found:
            return b
    raise _error("precision=fp8 needs torchao (pip install torchao) or Transformer Engine; neither is installed")


def check_fp8_here() -> str:
    """check_fp8 for this process's device (cuda:0 when present)."""
    import torch
    has = torch.cuda.is_available()
    return check_fp8(has, torch.cuda.get_device_capability() if has else None)
