#!/bin/bash
# One node of the Kubernetes Indexed Job (k8s/job.yaml): hostfile from the Job's pod DNS names, rendezvous on
# pod 0, the preset's NCCL settings, then this node's DeepSpeed launcher (no ssh between pods).
#   env: NNODES, GPUS_PER_NODE, JOB_NAME, SERVICE, MASTER_PORT, JOB_COMPLETION_INDEX (set by Kubernetes),
#        MEGASEEK_RUN_DIR, MEGASEEK_PYTHON, MEGASEEK_DEEPSPEED, MEGASEEK_DRY_RUN=1 (print instead of running)
#   args: Hydra overrides, passed through.
set -euo pipefail
PY=${MEGASEEK_PYTHON:-python}
read -r -a DEEPSPEED <<< "${MEGASEEK_DEEPSPEED:-deepspeed}"
: "${NNODES:?}" "${JOB_NAME:?}" "${SERVICE:?}" "${JOB_COMPLETION_INDEX:?set by an Indexed Job}"
GPN=${GPUS_PER_NODE:-8}
RUN_DIR=${MEGASEEK_RUN_DIR:-runs/$JOB_NAME}
mkdir -p "$RUN_DIR"
HOSTFILE=$RUN_DIR/hostfile.$JOB_COMPLETION_INDEX
: > "$HOSTFILE"
for ((i = 0; i < NNODES; i++)); do echo "$JOB_NAME-$i.$SERVICE slots=$GPN" >> "$HOSTFILE"; done
export MASTER_ADDR=$JOB_NAME-0.$SERVICE
export MASTER_PORT=${MASTER_PORT:-29500}
eval "$("$PY" launch/plan.py --env "$@")"
CMD=("${DEEPSPEED[@]}" --hostfile="$HOSTFILE" --no_ssh --node_rank="$JOB_COMPLETION_INDEX"
     --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" launch/pretrain.py "$@" "run_dir=$RUN_DIR")
if [ "${MEGASEEK_DRY_RUN:-0}" = "1" ]; then
    cat "$HOSTFILE"
    env | grep -E '^(NCCL_|MASTER_)' | sort
    printf 'CMD'; printf ' %q' "${CMD[@]}"; printf '\n'
    exit 0
fi
exec "${CMD[@]}"
