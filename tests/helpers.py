"""Test helpers: Hydra composition, a small model, and a several-process world on CPU (gloo)."""
from __future__ import annotations

from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

# A small model whose vocabulary (1001) divides by no tensor degree > 1: exercises vocab padding.
SMALL_MODEL = ["model.vocab_size=1001", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=2", "model.intermediate_size=128", "model.max_seq_len=64"]
SMALL_DATA = ["data.max_bytes=1500000", "data.tokenizer_sample_bytes=1000000"]


def compose(overrides: list[str]):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="config", overrides=list(overrides))


import megaseek  # noqa: E402,F401  (registers the config schemas)
from megaseek.distributed.spawn import free_port, init_gloo, run_world  # noqa: E402,F401
