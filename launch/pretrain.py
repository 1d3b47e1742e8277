"""Pretrain: `deepspeed launch/pretrain.py [overrides]`, `torchrun --nproc_per_node N launch/pretrain.py`,
or `python launch/pretrain.py` (one process). Hydra overrides, e.g. `parallel.tp=2 zero.stage=3`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megaseek.distributed.env import strip_local_rank_arg  # noqa: E402

sys.argv = strip_local_rank_arg(sys.argv)  # the deepspeed launcher's --local_rank=N must not reach Hydra

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from megaseek.config.schema import ConfigError
    from megaseek.engine.trainer import pretrain
    try:
        pretrain(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
