"""GPU readiness that CPU machines can check: fp8 refused before any work where it cannot run, the one-GPU
MFU benchmark's code path (--dry-run on CPU), and the production schedule of the cluster presets."""
import json
import subprocess
import sys

import pytest

from megaseek.distributed.fp8 import check_fp8, installed_backends
from tests.helpers import REPO, compose


def test_fp8_refused_on_cpu_and_before_hopper():
    with pytest.raises(Exception, match=r"precision=fp8 needs an NVIDIA GPU .* no CUDA device: use precision=bf16"):
        check_fp8(False, None)
    for cap, name in (((8, 0), "A100"), ((7, 0), "V100"), ((8, 9), "L40S")):
        with pytest.raises(Exception, match=rf"compute capability >= 9.0 .*this GPU has {cap[0]}.{cap[1]}"):
            check_fp8(True, cap)
    # Hopper and Blackwell pass, with the backend that will run the matmuls
    assert check_fp8(True, (9, 0), backends=["torchao"]) == "torchao"
    assert check_fp8(True, (10, 0), backends=["transformer_engine", "torchao"]) == "torchao"
    assert check_fp8(True, (12, 0), backends=["transformer_engine"]) == "transformer_engine"
    with pytest.raises(Exception, match="needs torchao .* or Transformer Engine; neither is installed"):
        check_fp8(True, (9, 0), backends=[])
    assert "torchao" in installed_backends()  # requirements.txt has it


def test_fp8_error_is_the_config_error():
    from megaseek.config.schema import ConfigError
    with pytest.raises(ConfigError):
        check_fp8(False, None)


def test_gpu_mfu_dry_run():
    p = subprocess.run([sys.executable, "bench/gpu_mfu.py", "--dry-run"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.splitlines()[0])
    assert out["device"] == "cpu" and out["steps"] == 3 and out["fused_adamw"]
    assert out["tokens_per_s"] > 0 and 0 < out["mfu_vs_measured_matmul"] < 1.5
    assert out["flops_per_token"] == 6 * (2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128) + 512 * 64) + 12 * 2 * 64 * 64
    assert out["loss_first"] == pytest.approx(6.24, abs=0.1)  # ~ln(512) at init, and finite
    assert "[gpu_mfu] cpu:" in p.stdout


def test_gpu_mfu_refuses_cpu_without_dry_run():
    import torch
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = subprocess.run([sys.executable, "bench/gpu_mfu.py", "--steps", "1"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode != 0 and "needs a CUDA GPU (use --dry-run on CPU)" in p.stderr


@pytest.mark.parametrize("preset", ["8xA100", "8xH100", "64xA100", "512xA100", "2048xV100"])
def test_cluster_presets_carry_the_production_schedule(preset):
    cfg = compose([f"+cluster={preset}"])
    assert cfg.optimizer.warmup_steps == 5000 and cfg.train.save_interval == 1000 and cfg.train.grad_clip == 1.0
    assert cfg.model.name in ("small", "7b", "large", "gpt3_175b")


def test_the_tiny_default_keeps_its_schedule():
    cfg = compose([])
    assert cfg.model.name == "tiny" and cfg.optimizer.warmup_steps == 20
    assert compose(["+cluster=local_cpu"]).optimizer.warmup_steps == 20
