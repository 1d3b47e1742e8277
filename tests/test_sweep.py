"""Hydra sweeps: a local `-m` multirun of two learning rates completes both runs; the same sweep through
launch/slurm/sweep.sh and Hydra's submitit Slurm launcher completes on a fake Slurm (sbatch/srun/sacct
stand-ins that run the submitted jobs locally); the sweep script's overrides compose into a valid
submitit_slurm launcher whose per-task environment resolves to the rank variables megaseek reads."""
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


# A fake Slurm for submitit: sbatch runs the array tasks of the submission file (once submitit has put each
# task's pickle in place, as a queue would), srun starts SLURM_NTASKS_PER_NODE tasks with their
# SLURM_PROCID / SLURM_LOCALID and honours --output/--error; sacct knows nothing (submitit then polls files).
FAKE_SBATCH = r"""#!/bin/bash
file="${*: -1}"
jid=$(( (RANDOM % 9000) + 1000 ))
arr=$(sed -n 's/^#SBATCH --array=\([0-9]*-[0-9]*\).*/\1/p' "$file")
ntpn=$(sed -n 's/^#SBATCH --ntasks-per-node=\([0-9]*\).*/\1/p' "$file")
nodes=$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$file")
lo=${arr%-*}; hi=${arr#*-}
cp "$file" "$FAKE_DIR/last_submission.sh"
(
  for ((i = lo; i <= hi; i++)); do
    o=$(sed -n 's/^#SBATCH --output=//p' "$file"); o=${o//%A/$jid}; o=${o//%a/$i}
    for _ in $(seq 600); do [ -e "$(dirname "$o")/${jid}_${i}_submitted.pkl" ] && break; sleep 0.1; done
    SLURM_ARRAY_JOB_ID=$jid SLURM_ARRAY_TASK_ID=$i SLURM_JOB_ID=$((jid + 1 + i)) SLURM_JOB_NUM_NODES=${nodes:-1} \
    SLURM_NNODES=${nodes:-1} SLURM_JOB_NODELIST=localhost SLURM_NTASKS_PER_NODE=${ntpn:-1} \
    SLURM_NTASKS=$(( ${nodes:-1} * ${ntpn:-1} )) bash "$file"
  done
) </dev/null >/dev/null 2>&1 &
echo "Submitted batch job $jid"
"""
FAKE_SRUN = r"""#!/bin/bash
out=/dev/null; err=
while [[ "$1" == --* ]]; do
  case "$1" in
    --output) out=$2; shift 2;;
    --error) err=$2; shift 2;;
    *) shift;;
  esac
done
sub() { local p=$1; p=${p//%A/$SLURM_ARRAY_JOB_ID}; p=${p//%a/$SLURM_ARRAY_TASK_ID}; p=${p//%j/$SLURM_JOB_ID}; echo "${p//%t/$2}"; }
pids=()
for ((t = 0; t < ${SLURM_NTASKS_PER_NODE:-1}; t++)); do
  SLURM_PROCID=$t SLURM_LOCALID=$t SLURM_NODEID=0 SLURM_LAUNCH_NODE_IPADDR=127.0.0.1 "$@" \
    >> "$(sub "$out" $t)" 2>> "$(sub "${err:-$out}" $t)" &
  pids+=($!)
done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""


@pytest.mark.slow
def test_sweep_through_the_submitit_slurm_launcher_on_a_fake_slurm(data_root, tmp_path):
    """launch/slurm/sweep.sh as a user runs it: Hydra's submitit_slurm launcher writes and submits an array
    job; each sweep point is a 2-task job whose tasks become ranks 0 and 1 of one world through the
    hydra.job.env_set mapping of Slurm's variables."""
    from megaseek.distributed.spawn import free_port
    fake = tmp_path / "slurm-bin"
    fake.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN), ("sacct", "#!/bin/bash\necho 'JobID|State|NodeList'\n"),
                       ("scancel", "#!/bin/bash\nexit 0\n")):
        (fake / name).write_text(text)
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_", "MASTER_"))}
    env.update(PATH=f"{fake}:{env['PATH']}", FAKE_DIR=str(fake), NODES="1", GPUS_PER_NODE="2", CPUS_PER_TASK="1",
               TIME_MIN="10", MEGASEEK_PYTHON=sys.executable)
    sweep = tmp_path / "sweep"
    r = subprocess.run(["bash", "launch/slurm/sweep.sh", "optimizer.lr=1e-3,2e-3", *RUN, f"data.root={data_root}",
                        f"hydra.sweep.dir={sweep}", f"++hydra.job.env_set.MASTER_PORT={free_port()}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _check_two_runs(sweep)
    for num in (0, 1):
        rec = json.loads((sweep / str(num) / "metrics.jsonl").read_text().splitlines()[-1])
        assert rec["tokens_per_s"] == pytest.approx(2 * rec["tokens_per_s_per_rank"])   # a world of 2 ranks
    sbatch = (fake / "last_submission.sh").read_text()
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=2",
                 "#SBATCH --gpus-per-node=2", "#SBATCH --signal=USR2@300"):
        assert line in sbatch
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 4      # 2 jobs x 2 tasks


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
