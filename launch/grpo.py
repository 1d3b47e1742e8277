"""GRPO / RLOO: `python launch/grpo.py train.init_from=DIR data.train=FILE [data.valid=FILE]
reward.fn=module:function [grpo.group_size=4] [grpo.advantage=group_norm|loo] [grpo.clip=0.2] [grpo.kl_coef=0]
[grpo.temperature=1.0] [grpo.max_new_tokens=16] [grpo.prompts=0] [grpo.epochs=1]` (or under `deepspeed` /
`torchrun`, any tp / dp / ZeRO stage, parallel.pp=1). data files: JSON Lines of {"prompt": str | messages,
...extra fields}; reward.fn(completion_text, extra_fields) -> float, e.g. the built-in
megaseek.tasks.rollout:exact_match (1 when the completion equals the line's "answer"). Per rollout: group_size
samples per prompt, group advantages, grpo.epochs passes of the clipped objective; metrics.jsonl gets
reward_mean, kl_ref, grpo/kl, response_length, eos_rate and, with data.valid, val_reward (greedy)."""
from megaseek.train.entry import stage_main

if __name__ == "__main__":
    stage_main("megaseek.tasks.grpo:run", __file__)
