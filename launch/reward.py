"""Reward model: `python launch/reward.py train.init_from=DIR data.train=FILE [data.valid=FILE] [reward.margin=M]`
(or under `deepspeed` / `torchrun`, any tp / dp / ZeRO stage, parallel.pp=1). data files: JSON Lines of
{"prompt": str | messages, "chosen": str, "rejected": str, "margin": float (optional)}; Bradley-Terry loss on a
scalar head read at the last token (megaseek/tasks/reward.py); held-out pair accuracy logged as val_accuracy."""
import sys

from megaseek.distributed.env import quiet_startup, strip_local_rank_arg

sys.argv = strip_local_rank_arg(sys.argv)  # the deepspeed launcher's --local_rank=N must not reach Hydra
quiet_startup()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from megaseek.config.launch import refuse_unknown_overrides  # noqa: E402

refuse_unknown_overrides(sys.argv[1:])


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from megaseek.config.schema import ConfigError
    from megaseek.data.chat import ChatDataError
    from megaseek.tasks.reward import run
    try:
        run(cfg)
    except (ConfigError, ChatDataError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
