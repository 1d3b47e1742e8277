"""Process start-up: rank environment, device and backend detection, process-group init.

Works the same under `deepspeed`, `torchrun` and plain `python` (a world of one). Without CUDA the
DeepSpeed CPU accelerator and gloo are chosen; with CUDA, NCCL and one GPU per local rank.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta


def strip_local_rank_arg(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends `--local_rank=N` (or `--local_rank N`); Hydra would reject it.
    Move it into the LOCAL_RANK environment variable and drop it from argv."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--local_rank=") or a.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", a.split("=", 1)[1])
        elif a in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(a)
        i += 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def select_accelerator() -> bool:
    """Returns has_cuda, and points DeepSpeed at its CPU accelerator when there is no GPU.
    Must run before `import deepspeed`."""
    import torch
    has_cuda = torch.cuda.is_available()
    if not has_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return has_cuda


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    backend: str
    device: str


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Initialise torch.distributed through DeepSpeed (idempotent)."""
    import torch
    has_cuda = select_accelerator()
    if "RANK" not in os.environ:  # plain `python launch/...`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK=os.environ.get("LOCAL_RANK", "0"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    backend = "nccl" if has_cuda else "gloo"
    if has_cuda:
        torch.cuda.set_device(local_rank)
    else:  # share the cores between the ranks of this node
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    import deepspeed
    import torch.distributed as dist
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s), verbose=False)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_world,
                   backend=backend, device=f"cuda:{local_rank}" if has_cuda else "cpu")


def is_rank0() -> bool:
    import torch.distributed as dist
    return not dist.is_initialized() or dist.get_rank() == 0


def log0(*args, **kw):
    """print on global rank 0 only, flushed (launchers buffer child output)."""
    if is_rank0():
        kw.setdefault("flush", True)
        print(*args, **kw)


def quiet_startup() -> bool:
    """Call first in an entry script: selects DeepSpeed's CPU accelerator (when there is no GPU) before
    anything imports DeepSpeed, which otherwise warns that it guessed one, and silences the deprecation
    warnings torch raises inside DeepSpeed's own collectives (nothing a user can act on). Returns has_cuda."""
    import warnings
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*reduce_scatter_tensor.* is deprecated", category=FutureWarning)
    return select_accelerator()
