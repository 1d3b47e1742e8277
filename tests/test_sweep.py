"""Hydra sweeps: a local `-m` multirun of two learning rates completes both runs (the basic launcher, and
the submitit launcher's local executor, the code path of the Slurm one); the Slurm sweep script's
overrides compose into a valid submitit_slurm launcher whose per-task environment resolves to the rank
variables megaseek reads."""
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, SMALL_DATA, SMALL_MODEL

RUN = SMALL_MODEL + SMALL_DATA + ["train.steps=2", "train.sample_tokens=0", "logging.progress=false",
                                  "logging.wandb.mode=disabled", "train.seq_len=32", "train.global_batch_size=4",
                                  "train.micro_batch_size=2", "train.log_interval=1"]


def _multirun(data_root, sweep_dir, *extra, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "launch/pretrain.py", "-m", "optimizer.lr=1e-3,2e-3", *RUN, f"data.root={data_root}",
           f"hydra.sweep.dir={sweep_dir}", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _check_two_runs(sweep_dir: Path):
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        d = sweep_dir / str(num)
        summary = json.loads((d / "summary.json").read_text())
        assert summary["steps"] == 2
        records = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 2]
        cfg = (d / "config.yaml").read_text()
        assert f"lr: {lr}" in cfg


@pytest.mark.slow
def test_local_multirun_of_two_learning_rates(data_root, tmp_path):
    r = _multirun(data_root, tmp_path / "sweep")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_two_runs(tmp_path / "sweep")


@pytest.mark.slow
def test_multirun_through_the_submitit_launcher_local_executor(data_root, tmp_path):
    r = _multirun(data_root, tmp_path / "sweep", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
                  "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_two_runs(tmp_path / "sweep")
    assert list((tmp_path / "sweep" / ".submitit").glob("*/*_result.pkl"))  # jobs ran through submitit


def test_slurm_sweep_script_composes_a_submitit_slurm_launcher(tmp_path):
    env = dict(os.environ, MEGASEEK_DRY_RUN="1", NODES="2", GPUS_PER_NODE="8", PARTITION="gpu",
               MEGASEEK_PYTHON=sys.executable)
    r = subprocess.run(["bash", "launch/slurm/sweep.sh", "+cluster=64xA100", "optimizer.lr=1e-4,3e-4"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(r.stdout.split("CMD ", 1)[1])
    assert cmd[1:3] == ["launch/pretrain.py", "-m"] and cmd[-2:] == ["+cluster=64xA100", "optimizer.lr=1e-4,3e-4"]
    overrides = [a for a in cmd[3:] if a != "optimizer.lr=1e-4,3e-4"] + ["optimizer.lr=1e-4"]
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.gpus_per_node, launcher.tasks_per_node) == (2, 8, 8)
    assert launcher.partition == "gpu" and launcher.max_num_timeout > 0       # requeued on time-out
    fake = {"SLURM_PROCID": "11", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_NTASKS_PER_NODE": "8",
            "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"}
    old = {k: os.environ.get(k) for k in fake}
    os.environ.update(fake)
    try:
        env_set = {k: cfg.hydra.job.env_set[k] for k in cfg.hydra.job.env_set}   # resolved as in the job
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert env_set == {"RANK": "11", "WORLD_SIZE": "16", "LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8",
                       "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29500"}
