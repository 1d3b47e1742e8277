"""PPO (RLHF): `python launch/ppo.py train.init_from=DIR data.train=FILE [data.valid=FILE]
(reward.fn=module:function | reward.model=DIR) [ppo.kl_coef=0.05] [ppo.kl_estimator=k1|k3] [ppo.kl_target=0]
[ppo.kl_horizon=10000] [ppo.gamma=1] [ppo.lam=0.95] [ppo.clip=0.2] [ppo.value_clip=0.2] [ppo.epochs=2]
[ppo.minibatches=1] [ppo.missing_eos_penalty=0] [ppo.temperature=1] [ppo.max_new_tokens=16]` (or under
`deepspeed` / `torchrun`, any tp / dp / ZeRO stage, parallel.pp=1). data files: JSON Lines of
{"prompt": str | messages, ...extra fields passed to reward.fn}. Per rollout: sample, score, KL-penalised
rewards, critic values, GAE, advantages whitened over the global batch, ppo.epochs x ppo.minibatches steps of
the clipped policy + value losses (megaseek/tasks/ppo_stage.py); metrics.jsonl gets reward, score, kl, kl_coef,
response_length, eos_rate, ppo/entropy, ppo/approx_kl, ppo/clip_fraction, value_loss (+ val_reward)."""
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
    from megaseek.tasks.ppo_stage import run
    try:
        run(cfg)
    except (ConfigError, ChatDataError) as e:
        print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
