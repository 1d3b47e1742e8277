"""DPO: `python launch/dpo.py train.init_from=DIR data.train=FILE [data.valid=FILE] [dpo.beta=0.1]
[dpo.loss=sigmoid|ipo] [dpo.label_smoothing=0]` (or under `deepspeed` / `torchrun`, any tp / dp / ZeRO stage,
parallel.pp=1). data files: JSON Lines of {"prompt": str | messages, "chosen": str, "rejected": str}; the
reference is the init checkpoint (its log-probs precomputed); held-out implicit-reward accuracy: val_accuracy."""
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
    from megaseek.tasks.dpo import run
    try:
        run(cfg)
    except (ConfigError, ChatDataError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
