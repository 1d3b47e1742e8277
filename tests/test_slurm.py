"""launch/slurm/pretrain.sbatch run by bash with a fake allocation: SLURM_* variables, and fake `scontrol`
and `srun` on PATH (scontrol prints the hostnames and records requeues; srun runs its command once per
"node" with SLURM_NODEID set, so the real per-node command line is executed, against a fake deepspeed
runner that records its arguments)."""
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "launch" / "slurm" / "pretrain.sbatch"
HOSTS = ["gpu-a001", "gpu-a002", "gpu-b017", "gpu-b018"]

FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf '%s\\n' $FAKE_HOSTS; exit 0; fi
if [ "$1" = "requeue" ]; then echo "requeue $2" >> "$FAKE_LOG"; exit 0; fi
echo "fake scontrol: unexpected $*" >&2; exit 1
"""
# srun: record the options, then run the command once per node (in the foreground) with SLURM_NODEID;
# with FAKE_SRUN_SLEEP, wait (as a running job) and report a forwarded SIGTERM.
FAKE_SRUN = """#!/bin/bash
echo "srun $*" >> "$FAKE_LOG"
while [[ "$1" == --* ]]; do shift; done
if [ -n "$FAKE_SRUN_SLEEP" ]; then
    sleep "$FAKE_SRUN_SLEEP" &
    trap 'kill $!; echo "srun got TERM" >> "$FAKE_LOG"; exit 0' TERM
    echo started >> "$FAKE_LOG"
    wait $!
    exit 0
fi
n=0
for h in $FAKE_HOSTS; do SLURM_NODEID=$n SLURMD_NODENAME=$h "$@" || exit $?; n=$((n+1)); done
"""
FAKE_DEEPSPEED = """#!/bin/bash
{ printf 'deepspeed'; printf ' %q' "$@"; printf ' | NCCL_ALGO=%s MASTER_ADDR=%s\\n' "$NCCL_ALGO" "$MASTER_ADDR"; } >> "$FAKE_LOG"
"""


@pytest.fixture
def fake_slurm(tmp_path):
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN), ("fake-deepspeed", FAKE_DEEPSPEED)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NCCL_", "MASTER_"))}
    env.update(PATH=f"{bin_}:{env['PATH']}", FAKE_HOSTS=" ".join(HOSTS), FAKE_LOG=str(log),
               SLURM_JOB_ID="424242", SLURM_JOB_NODELIST="gpu-a[001-002],gpu-b[017-018]", SLURM_NNODES="4",
               SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(REPO), MEGASEEK_PYTHON=sys.executable,
               MEGASEEK_DEEPSPEED=str(bin_ / "fake-deepspeed"), MEGASEEK_RUN_DIR=str(tmp_path / "run"))
    return env, log, tmp_path


def _run(env, *args, **kw):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, cwd=kw.pop("cwd", "/"), capture_output=True,
                          text=True, timeout=180, **kw)


def test_dry_run_builds_hostfile_rendezvous_and_command(fake_slurm):
    env, log, tmp = fake_slurm
    env["MEGASEEK_DRY_RUN"] = "1"
    sources = "data.sources={web:{path:/d/web.jsonl,text_field:text,weight:1.0}}"
    r = _run(env, "+cluster=64xA100", "optimizer.lr=3e-4", sources)
    assert r.returncode == 0, r.stderr + r.stdout
    hostfile = (tmp / "run" / "hostfile").read_text().splitlines()
    assert hostfile == [f"{h} slots=8" for h in HOSTS]
    assert f"ENV MASTER_ADDR=gpu-a001 MASTER_PORT={20000 + 424242 % 20000} WORLD=32" in r.stdout
    for k, v in (("NCCL_ALGO", "Ring"), ("NCCL_IB_DISABLE", "0"), ("NCCL_DEBUG", "WARN"),
                 ("NCCL_SOCKET_IFNAME", "^lo,docker0")):
        assert f"ENV {k}={v}" in r.stdout
    cmd = shlex.split(next(l for l in r.stdout.splitlines() if l.startswith("CMD "))[4:])
    assert cmd[:5] == ["srun", "--nodes=4", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--export=ALL"]
    tail = cmd[cmd.index("launch/pretrain.py"):]
    assert tail == ["launch/pretrain.py", "+cluster=64xA100", "optimizer.lr=3e-4", sources,
                    f"run_dir={tmp / 'run'}"]
    assert f"--hostfile={tmp / 'run' / 'hostfile'}" in cmd and "--no_ssh" in cmd
    assert "--master_addr=gpu-a001" in cmd and not log.exists()  # nothing launched


def test_per_node_command_gets_its_node_rank_and_the_preset_environment(fake_slurm):
    env, log, tmp = fake_slurm
    env["SLURM_GPUS_ON_NODE"] = ""
    env["SLURM_GPUS_PER_NODE"] = "a100:8"
    r = _run(env, "+cluster=64xA100", "zero.stage=1")
    assert r.returncode == 0, r.stderr + r.stdout
    lines = log.read_text().splitlines()
    assert lines[0].startswith("srun --nodes=4 --ntasks-per-node=1")
    ds = [l for l in lines if l.startswith("deepspeed")]
    assert len(ds) == 4
    for rank, line in enumerate(ds):
        args, env_part = line.split(" | ")
        args = shlex.split(args)[1:]
        assert args.index(f"--node_rank={rank}") < args.index("launch/pretrain.py")
        assert args[args.index("launch/pretrain.py"):] == ["launch/pretrain.py", "+cluster=64xA100", "zero.stage=1",
                                                          f"run_dir={tmp / 'run'}"]
        assert env_part == "NCCL_ALGO=Ring MASTER_ADDR=gpu-a001"


def test_planner_refuses_before_any_rank_starts(fake_slurm):
    env, log, _ = fake_slurm
    r = _run(env, "+cluster=8xA100", "model=large", "parallel.tp=1")      # 57B parameters on 80 GB GPUs
    assert r.returncode == 2 and "DOES NOT FIT" in r.stdout and "refused" in r.stderr
    r = _run(env, "+cluster=8xA100", "parallel.tp=3")                     # 32 ranks: tp 3 does not divide
    assert r.returncode == 2 and "not divisible" in r.stdout
    assert not log.exists()


def test_sigterm_forwards_to_the_ranks_and_requeues(fake_slurm):
    env, log, _ = fake_slurm
    env.update(FAKE_SRUN_SLEEP="60", SLURM_RESTART_COUNT="1")
    p = subprocess.Popen(["bash", str(SCRIPT), "+cluster=64xA100"], env=env, cwd="/", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "started" in log.read_text()):
        time.sleep(0.2)
    assert log.exists() and "started" in log.read_text()
    p.send_signal(signal.SIGUSR1)                # Slurm's warning before the time limit (--signal=B:USR1@300)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    text = log.read_text()
    assert "srun got TERM" in text and "requeue 424242" in text
    assert text.index("srun got TERM") < text.index("requeue 424242")  # checkpoint first, then requeue
    assert "caught SIGUSR1" in err


def test_no_requeue_after_too_many_restarts(fake_slurm):
    env, log, _ = fake_slurm
    env.update(FAKE_SRUN_SLEEP="60", SLURM_RESTART_COUNT="50")
    p = subprocess.Popen(["bash", str(SCRIPT), "+cluster=64xA100"], env=env, cwd="/", stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and "started" in log.read_text()):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert "srun got TERM" in log.read_text() and "requeue 424242" not in log.read_text()
