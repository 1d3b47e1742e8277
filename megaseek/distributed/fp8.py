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


def check_fp8_here(has_cuda: Optional[bool] = None) -> str:
    """check_fp8 for this process's device (cuda:0 when present). `has_cuda`: what config validation
    decided (False on a CPU run even where CUDA exists); None: look it up."""
    import torch
    has = torch.cuda.is_available() if has_cuda is None else bool(has_cuda) and torch.cuda.is_available()
    return check_fp8(has, torch.cuda.get_device_capability() if has else None)


def check_fp8_run(has_cuda: Optional[bool] = None) -> None:
    """What config validation calls for `precision=fp8`: the hardware / library check above, then a refusal
    on qualifying GPUs too, because the training job does not convert its layers yet. torchao's
    `convert_to_float8_training` swaps `nn.Linear` modules, and megaseek's projections are tensor-parallel
    modules calling `gemm.linear` on their shard (ColumnParallelLinear, RowParallelLinear, KVProjection,
    ReplicatedLinear, the tied head): they need a float8 matmul of their own, which cannot be verified
    without an fp8 GPU. Refusing keeps `precision=fp8` from silently training in fp32."""
    backend = check_fp8_here(has_cuda)
    raise _error(f"precision=fp8: this GPU and {backend} qualify, but the float8 conversion of megaseek's "
                 f"tensor-parallel linear layers is not wired into the training job yet; use precision=bf16")
