"""Hydra composition, validation before any work, and the generated DeepSpeed JSON."""
import pytest

from megaseek.config.deepspeed import deepspeed_config
from megaseek.config.schema import ConfigError, validate
from tests.helpers import compose


def test_default_config_composes_with_contract_keys():
    cfg = compose([])
    for key in ("parallel.tp", "parallel.pp", "zero.stage", "zero.offload_optimizer", "zero.offload_param",
                "train.steps", "train.micro_batch_size", "train.global_batch_size", "train.seq_len",
                "train.save_interval", "train.log_interval", "train.grad_clip", "seed", "data.root",
                "logging.prometheus.port", "logging.wandb.mode", "data.sources"):
        node = cfg
        for part in key.split("."):
            assert part in node, key
            node = node[part]
    assert cfg.model.name == "tiny" and cfg.precision.name == "fp32"
    assert "cluster" not in cfg


def test_cluster_composes_with_plus():
    cfg = compose(["+cluster=8xA100"])
    assert cfg.cluster.gpus_per_node == 8 and cfg.precision.name == "bf16" and cfg.model.name == "small"
    cfg = compose(["+cluster=local_cpu"])
    assert cfg.cluster.name == "local_cpu"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_deepspeed_json_per_zero_stage(stage):
    cfg = compose([f"zero.stage={stage}", "train.global_batch_size=32", "train.micro_batch_size=4"])
    lay = validate(cfg, world_size=2, has_cuda=False)
    ds = deepspeed_config(cfg, lay)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 = 4 x 4 x dp 2
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["gradient_clipping"] == 1.0
    assert "offload_optimizer" not in ds["zero_optimization"]
    assert "bf16" not in ds and "fp16" not in ds


def test_deepspeed_json_offload_and_precisions():
    cfg = compose(["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=cpu", "precision=bf16"])
    ds = deepspeed_config(cfg, validate(cfg, 1, has_cuda=False))
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"] == {"enabled": True}
    cfg = compose(["precision=fp16"])
    ds = deepspeed_config(cfg, validate(cfg, 1, has_cuda=True))
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0
    assert ds["fp16"]["initial_scale_power"] == 16 and ds["fp16"]["loss_scale_window"] == 2000


@pytest.mark.parametrize("overrides,world,match", [
    (["train.global_batch_size=10", "train.micro_batch_size=4"], 1, "train.global_batch_size=10"),
    (["train.global_batch_size=16", "train.micro_batch_size=4"], 3, "not a multiple of 12"),
    (["parallel.tp=2"], 3, "not divisible by parallel.tp"),
    (["parallel.tp=3"], 3, "num_heads=8 is not divisible by parallel.tp=3"),
    (["precision=fp16"], 1, "precision=fp16 needs a GPU"),
    (["zero.offload_param=cpu", "zero.stage=2"], 1, "zero.offload_param=cpu needs zero.stage=3"),
    (["zero.offload_optimizer=cpu", "zero.stage=0"], 1, "needs zero.stage >= 1"),
    (["parallel.pp=2", "zero.stage=3"], 2, "pipeline engine supports ZeRO stage 0 or 1"),
    (["train.seq_len=1024"], 1, "train.seq_len=1024"),
    (["model.num_kv_heads=3"], 1, "num_kv_heads=3 must divide"),
    (["zero.stage=5"], 1, "zero.stage=5"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=127"], 2, "sequence_parallel"),
])
def test_inconsistent_config_refused_with_one_clear_message(overrides, world, match):
    cfg = compose(overrides)
    with pytest.raises(ConfigError, match=match):
        validate(cfg, world_size=world, has_cuda=False)


def test_batch_arithmetic():
    cfg = compose(["train.global_batch_size=64", "train.micro_batch_size=2", "parallel.tp=2"])
    lay = validate(cfg, 8, has_cuda=False)
    assert (lay.dp, lay.grad_accum) == (4, 8)
    assert lay.micro_batch * lay.grad_accum * lay.dp == lay.global_batch
