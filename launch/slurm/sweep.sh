#!/bin/bash
# Hydra sweeps on Slurm through the submitit launcher: one Slurm job per sweep point, one task per GPU.
#
#   NODES=1 GPUS_PER_NODE=8 launch/slurm/sweep.sh +cluster=8xA100 optimizer.lr=1e-4,3e-4,1e-3
#   NODES=8 launch/slurm/sweep.sh +cluster=64xA100 parallel.tp=1,2,4          # a layout sweep
#
# submitit writes and submits the sbatch scripts (requeue on preemption and time-out included: the
# launcher resubmits the same job, and the run resumes from its run_dir, the job's sweep directory).
# Each task is one rank: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR are taken from Slurm's variables
# inside the job (hydra.job.env_set, resolved on the compute node). The same sweep runs locally with
# `python launch/pretrain.py -m optimizer.lr=1e-4,3e-4` (one run after the other) or in local processes
# with `hydra/launcher=submitit_local`.
#   env: NODES (1), GPUS_PER_NODE (8), CPUS_PER_TASK (8), TIME_MIN (1440), PARTITION, MEGASEEK_PYTHON,
#        MEGASEEK_DRY_RUN=1 (print the command instead of running it)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${MEGASEEK_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
NODES=${NODES:-1}
GPN=${GPUS_PER_NODE:-8}
# shellcheck disable=SC2016  # ${oc.env:...} are Hydra interpolations, resolved in the job
CMD=("$PY" launch/pretrain.py -m hydra/launcher=submitit_slurm
     "hydra.launcher.nodes=$NODES" "hydra.launcher.gpus_per_node=$GPN" "hydra.launcher.tasks_per_node=$GPN"
     "hydra.launcher.cpus_per_task=${CPUS_PER_TASK:-8}" "hydra.launcher.timeout_min=${TIME_MIN:-1440}"
     "hydra.launcher.max_num_timeout=20" "hydra.launcher.signal_delay_s=300"
     '++hydra.job.env_set.RANK=${oc.env:SLURM_PROCID}'
     '++hydra.job.env_set.WORLD_SIZE=${oc.env:SLURM_NTASKS}'
     '++hydra.job.env_set.LOCAL_RANK=${oc.env:SLURM_LOCALID}'
     '++hydra.job.env_set.LOCAL_WORLD_SIZE=${oc.env:SLURM_NTASKS_PER_NODE}'
     '++hydra.job.env_set.MASTER_ADDR=${oc.env:SLURM_LAUNCH_NODE_IPADDR}'
     '++hydra.job.env_set.MASTER_PORT=29500')
if [ -n "${PARTITION:-}" ]; then CMD+=("hydra.launcher.partition=$PARTITION"); fi
CMD+=("$@")
if [ "${MEGASEEK_DRY_RUN:-0}" = "1" ]; then
    printf 'CMD'; printf ' %q' "${CMD[@]}"; printf '\n'
    exit 0
fi
exec "${CMD[@]}"
