"""Pretrain: `deepspeed launch/pretrain.py [overrides]`, `torchrun --nproc_per_node N launch/pretrain.py`,
or `python launch/pretrain.py` (one process). Hydra overrides, e.g. `parallel.tp=2 zero.stage=3`."""
from megaseek.train.entry import stage_main

if __name__ == "__main__":
    stage_main("megaseek.train.job:pretrain", __file__)
