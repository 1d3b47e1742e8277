"""The real launchers: deepspeed (2, 4 and 8 CPU ranks), torchrun and plain python, through Hydra."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL_DATA, SMALL_MODEL, free_port

BIN = Path(sys.executable).parent
BASE = SMALL_MODEL + SMALL_DATA + ["train.seq_len=32", "train.global_batch_size=8", "train.micro_batch_size=2",
                                   "train.log_interval=1", "logging.progress=false", "train.sample_tokens=8",
                                   "logging.wandb.mode=disabled", "logging.tensorboard.enabled=false"]


def _run(cmd, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p.stdout + p.stderr


def _metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _deepspeed(n, overrides):
    return [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(free_port()),
            "launch/pretrain.py"] + BASE + overrides


@pytest.mark.slow
def test_deepspeed_two_ranks_zero3_cpu_offload(tmp_path, data_root):
    out = _run(_deepspeed(2, [f"data.root={data_root}", f"run_dir={tmp_path}", "train.steps=4", "zero.stage=3",
                              "zero.offload_optimizer=cpu", "zero.offload_param=cpu"]))
    recs = _metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and 5.0 < r["loss"] < 8.0 for r in recs)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "global_step4"
    from megaseek.ckpt.checkpoint import verify
    assert verify(tmp_path / "checkpoints" / "global_step4") is None  # whole, checksums match
    assert (tmp_path / "checkpoints" / "global_step4" / "optim-stage0.safetensors").is_file()
    assert "dp=2 tp=1 pp=1" in out and "[megaseek] sample:" in out
    # started again in the same run directory: resumes from the checkpoint and continues to step 6
    out = _run(_deepspeed(2, [f"data.root={data_root}", f"run_dir={tmp_path}", "train.steps=6", "zero.stage=3",
                              "zero.offload_optimizer=cpu", "zero.offload_param=cpu"]))
    assert "resumed from global_step4" in out
    assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_deepspeed_four_ranks_tensor_parallel(tmp_path, data_root):
    out = _run(_deepspeed(4, [f"data.root={data_root}", f"run_dir={tmp_path}", "train.steps=3", "parallel.tp=2"]))
    assert "dp=2 tp=2 pp=1" in out
    assert all(math.isfinite(r["loss"]) for r in _metrics(tmp_path))


@pytest.mark.slow
def test_deepspeed_eight_ranks_3d(tmp_path, data_root):
    out = _run(_deepspeed(8, [f"data.root={data_root}", f"run_dir={tmp_path}", "train.steps=3", "parallel.tp=2",
                              "parallel.pp=2", "model.num_layers=4"]))
    assert "dp=2 tp=2 pp=2" in out
    recs = _metrics(tmp_path)
    assert len(recs) == 3 and all(math.isfinite(r["loss"]) for r in recs)


def test_torchrun_and_plain_python(tmp_path, data_root):
    _run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/pretrain.py"]
         + BASE + [f"data.root={data_root}", f"run_dir={tmp_path / 'tr'}", "train.steps=2", "zero.stage=2"])
    assert len(_metrics(tmp_path / "tr")) == 2
    out = _run([sys.executable, "launch/pretrain.py"] + BASE + [f"data.root={data_root}", f"run_dir={tmp_path / 'py'}",
                                                                "train.steps=2", "+cluster=local_cpu", "--local_rank=0"])
    assert "world=1" in out and len(_metrics(tmp_path / "py")) == 2


def test_bad_config_exits_with_one_clear_message(tmp_path):
    p = subprocess.run([sys.executable, "launch/pretrain.py", "train.global_batch_size=7", f"run_dir={tmp_path}"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "config error: train.global_batch_size=7" in p.stderr
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any work


def test_fp8_on_cpu_exits_with_one_clear_message_before_any_work(tmp_path):
    """`precision=fp8` on this CPU machine: exit 2 at config validation (no process group, no DeepSpeed engine,
    no data), one line naming precision=fp8, what is missing and what to use instead."""
    p = subprocess.run([sys.executable, "launch/pretrain.py", "precision=fp8", f"run_dir={tmp_path}",
                        "data.root=/nonexistent/fp8-never-read"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    errors = [line for line in p.stderr.splitlines() if line.startswith("config error:")]
    assert errors == ["config error: precision=fp8 needs an NVIDIA GPU with fp8 tensor cores (Hopper or Blackwell, "
                      "compute capability >= 9.0); this machine has no CUDA device: use precision=bf16 (or fp32 on "
                      "CPU)"], p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "DeepSpeed info" not in p.stdout + p.stderr
    assert not any(tmp_path.iterdir())  # refused before any work: not even config.yaml in the run directory
