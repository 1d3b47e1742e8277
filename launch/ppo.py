"""PPO (RLHF): `python launch/ppo.py train.init_from=DIR data.train=FILE [data.valid=FILE]
(reward.fn=module:function | reward.model=DIR) [ppo.kl_coef=0.05] [ppo.kl_estimator=k1|k3] [ppo.kl_target=0]
[ppo.kl_horizon=10000] [ppo.gamma=1] [ppo.lam=0.95] [ppo.clip=0.2] [ppo.value_clip=0.2] [ppo.epochs=2]
[ppo.minibatches=1] [ppo.missing_eos_penalty=0] [ppo.temperature=1] [ppo.max_new_tokens=16]
[ppo.keep_rollouts=2]` (or under `deepspeed` / `torchrun`, any tp / dp / ZeRO stage, parallel.pp=1). data files: JSON Lines of
{"prompt": str | messages, ...extra fields passed to reward.fn}. Per rollout: sample, score, KL-penalised
rewards, critic values, GAE, advantages whitened over the global batch, ppo.epochs x ppo.minibatches steps of
the clipped policy + value losses (megaseek/tasks/ppo_stage.py); metrics.jsonl gets reward, score, kl, kl_coef,
response_length, eos_rate, ppo/entropy, ppo/approx_kl, ppo/clip_fraction, value_loss (+ val_reward)."""
from megaseek.train.entry import stage_main

if __name__ == "__main__":
    stage_main("megaseek.tasks.ppo_stage:run", __file__)
