"""Pretrain: `deepspeed launch/pretrain.py [overrides]`, `torchrun --nproc_per_node N launch/pretrain.py`,
or `python launch/pretrain.py` (one process). Hydra overrides, e.g. `parallel.tp=2 zero.stage=3`."""
import sys

from megaseek.distributed.env import quiet_startup, strip_local_rank_arg

sys.argv = strip_local_rank_arg(sys.argv)  # the deepspeed launcher's --local_rank=N must not reach Hydra
quiet_startup()  # the CPU accelerator chosen before DeepSpeed is imported

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from megaseek.config.launch import refuse_unknown_overrides  # noqa: E402

refuse_unknown_overrides(sys.argv[1:])  # one clear message naming the closest key, before Hydra's own


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from megaseek.config.schema import ConfigError
    from megaseek.train.job import pretrain
    try:
        pretrain(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
