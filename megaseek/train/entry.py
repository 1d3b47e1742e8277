"""One Hydra entry point for every stage script (launch/pretrain.py, sft.py, reward.py, dpo.py, ...).

A launch script is its docstring plus `stage_main("package.module:function", __file__)`. Before Hydra composes:
the deepspeed launcher's `--local_rank=N` is stripped from argv, DeepSpeed's accelerator is chosen before
anything imports DeepSpeed (`quiet_startup`), and an override naming no declared key exits 2 with the closest
valid key (`refuse_unknown_overrides`). Hydra reads the repository's `conf/` by absolute path, and its job name
(`hydra.job.name`, which names wandb runs) is the script's file name, as with one decorated `main` per script.
The stage's function receives the composed config; a config or data error exits 2 with one line on stderr.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path


def _resolve(target: str):
    module, _, name = target.partition(":")
    if not name:
        raise ValueError(f"stage target {target!r}: expected 'package.module:function'")
    return getattr(importlib.import_module(module), name)


def _close_process_group() -> None:
    """Tear the process group down after a finished stage, on every rank: left to interpreter exit, gloo's
    C++ threads are sometimes still joinable when their objects are destroyed, and the rank dies with
    "terminate called without an active exception" (exit -6) after its work is done."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def stage_main(target: str, script: str) -> None:
    """Run `target` (e.g. "megaseek.tasks.sft:run") under Hydra as the entry point of `script` (its __file__)."""
    from megaseek.distributed.env import quiet_startup, strip_local_rank_arg
    sys.argv = strip_local_rank_arg(sys.argv)
    quiet_startup()

    import hydra

    from megaseek.config.launch import CONF, refuse_unknown_overrides
    refuse_unknown_overrides(sys.argv[1:])

    def main(cfg) -> None:
        from megaseek.config.schema import ConfigError
        from megaseek.data.chat import ChatDataError
        run = _resolve(target)
        try:
            run(cfg)
        except (ConfigError, ChatDataError) as e:
            print(f"config error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        _close_process_group()

    # Hydra names the job after the task function's module when it is not __main__ (detect_task_name).
    main.__module__ = Path(script).stem
    hydra.main(config_path=str(CONF), config_name="config", version_base="1.3")(main)()
