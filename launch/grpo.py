"""GRPO / RLOO: `python launch/grpo.py train.init_from=DIR data.train=FILE [data.valid=FILE]
reward.fn=module:function [grpo.group_size=4] [grpo.advantage=group_norm|loo] [grpo.clip=0.2] [grpo.kl_coef=0]
[grpo.temperature=1.0] [grpo.max_new_tokens=16] [grpo.prompts=0] [grpo.epochs=1]` (or under `deepspeed` /
`torchrun`, any tp / dp / ZeRO stage, parallel.pp=1). data files: JSON Lines of {"prompt": str | messages,
...extra fields}; reward.fn(completion_text, extra_fields) -> float, e.g. the built-in
megaseek.tasks.rollout:exact_match (1 when the completion equals the line's "answer"). Per rollout: group_size
samples per prompt, group advantages, grpo.epochs passes of the clipped objective; metrics.jsonl gets
reward_mean, kl_ref, grpo/kl, response_length, eos_rate and, with data.valid, val_reward (greedy)."""
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
    from megaseek.tasks.grpo import run
    try:
        run(cfg)
    except (ConfigError, ChatDataError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
