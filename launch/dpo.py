"""DPO: `python launch/dpo.py train.init_from=DIR data.train=FILE [data.valid=FILE] [dpo.beta=0.1]
[dpo.loss=sigmoid|ipo] [dpo.label_smoothing=0]` (or under `deepspeed` / `torchrun`, any tp / dp / ZeRO stage,
parallel.pp=1). data files: JSON Lines of {"prompt": str | messages, "chosen": str, "rejected": str}; the
reference is the init checkpoint (its log-probs precomputed); held-out implicit-reward accuracy: val_accuracy."""
from megaseek.train.entry import stage_main

if __name__ == "__main__":
    stage_main("megaseek.tasks.dpo:run", __file__)
