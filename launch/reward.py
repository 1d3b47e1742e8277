"""Reward model: `python launch/reward.py train.init_from=DIR data.train=FILE [data.valid=FILE] [reward.margin=M]`
(or under `deepspeed` / `torchrun`, any tp / dp / ZeRO stage, parallel.pp=1). data files: JSON Lines of
{"prompt": str | messages, "chosen": str, "rejected": str, "margin": float (optional)}; Bradley-Terry loss on a
scalar head read at the last token (megaseek/tasks/reward.py); held-out pair accuracy logged as val_accuracy."""
from megaseek.train.entry import stage_main

if __name__ == "__main__":
    stage_main("megaseek.tasks.reward:run", __file__)
