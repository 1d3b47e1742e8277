"""Test helpers: Hydra composition, a small model, and a several-process world on CPU (gloo)."""
from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A small model whose vocabulary (1001) divides by no tensor degree > 1: exercises vocab padding.
SMALL_MODEL = ["model.vocab_size=1001", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=2", "model.intermediate_size=128", "model.max_seq_len=64"]
SMALL_DATA = ["data.max_bytes=1500000", "data.tokenizer_sample_bytes=1000000"]


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    import torch
    torch.set_num_threads(1)
    try:
        out = fn(rank, world, *args)
        queue.put((rank, "ok", out))
    except BaseException:  # report, never hang the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world: int, fn, *args, timeout: float = 600.0) -> list:
    """Run fn(rank, world, *args) in `world` fresh processes over gloo; returns the results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world):
            rank, status, out = queue.get(timeout=timeout)
            if status == "error":
                errors.append(f"rank {rank}:\n{out}")
                break
            results[rank] = out
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world)]


def init_gloo(rank: int, world: int):
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=world)
