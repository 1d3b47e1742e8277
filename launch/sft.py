"""Supervised fine-tuning: `python launch/sft.py train.init_from=DIR data.train=FILE [data.valid=FILE]`
(or under `deepspeed` / `torchrun`, any tp / dp / ZeRO stage). data files: JSON Lines of
{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}; the loss is on assistant tokens."""
from megaseek.train.entry import stage_main

if __name__ == "__main__":
    stage_main("megaseek.tasks.sft:run", __file__)
