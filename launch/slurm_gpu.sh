#!/usr/bin/env bash
# Multi-node GPUs under SLURM: submit launch/slurm_gpu.sbatch with sizes from
# the environment, and the per-task wrapper that srun runs on every task.
#
#   NODES=4 GPUS_PER_NODE=8 CONFIG=configs/byol_r50.py:epochs=300 \
#     WORKDIR=/shared/runs/r50 DATA_DIR=/shared/tensorflow_datasets \
#     launch/slurm_gpu.sh submit
#   TASKS=node launch/slurm_gpu.sh submit          # one process per node
#   DRY_RUN=1 launch/slurm_gpu.sh submit           # print the sbatch command
#
# Run `launch/slurm_gpu.sh help` for the settings.
set -euo pipefail

# Settings: every one can be overridden from the environment.
NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
TASKS="${TASKS:-gpu}"                  # gpu: one process per GPU; node: one per node
CPUS_PER_GPU="${CPUS_PER_GPU:-8}"      # host threads for tf.data, per GPU
TIME="${TIME:-24:00:00}"
PARTITION="${PARTITION:-}"             # empty: the cluster's default
ACCOUNT="${ACCOUNT:-}"
JOB_NAME="${JOB_NAME:-byol_jax}"
CONFIG="${CONFIG:-configs/byol_r50.py:epochs=300}"
WORKDIR="${WORKDIR:-}"                 # empty: REPO_DIR/runs/byol_jax-JOB_NAME
DATA_DIR="${DATA_DIR:-}"               # a prepared TFDS directory
BATCH_SIZE="${BATCH_SIZE:-}"           # empty: the config's global batch
EXTRA_FLAGS="${EXTRA_FLAGS:-}"         # more trainer flags
VENV="${VENV:-}"                       # activated in every task when set
PYTHON="${PYTHON:-python}"
DRY_RUN="${DRY_RUN:-0}"                # 1: print the sbatch command only

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="${REPO_DIR:-$(dirname "$SCRIPT_DIR")}"

usage() {
  cat <<EOF
Usage: launch/slurm_gpu.sh COMMAND [EXTRA TRAINER FLAGS...]

Commands:
  submit   sbatch launch/slurm_gpu.sbatch for NODES x GPUS_PER_NODE GPUs
           (TASKS=gpu: one task per GPU; TASKS=node: one task per node)
  task     run one trainer process (what srun starts on every task; it reads
           SLURM_* and sets JAX_LOCAL_DEVICE_IDS when needed)
  help     this text

Settings (environment variables; current values):
  NODES=$NODES GPUS_PER_NODE=$GPUS_PER_NODE TASKS=$TASKS CPUS_PER_GPU=$CPUS_PER_GPU
  TIME=$TIME PARTITION=${PARTITION:-<default>} ACCOUNT=${ACCOUNT:-<default>} JOB_NAME=$JOB_NAME
  CONFIG=$CONFIG
  WORKDIR=${WORKDIR:-<REPO_DIR/runs/byol_jax-JOB_NAME>}
  DATA_DIR=${DATA_DIR:-<config>} BATCH_SIZE=${BATCH_SIZE:-<config>}
  EXTRA_FLAGS=$EXTRA_FLAGS
  VENV=${VENV:-<none>} PYTHON=$PYTHON REPO_DIR=$REPO_DIR DRY_RUN=$DRY_RUN

Example: BYOL ResNet-50 on 4 nodes x 8 GPUs (per-device batch 4096/32 = 128):
  NODES=4 CONFIG=configs/byol_r50.py:epochs=300 WORKDIR=/shared/runs/r50 \\
    DATA_DIR=/shared/tensorflow_datasets launch/slurm_gpu.sh submit
See launch/README.md.
EOF
}

die() {
  echo "slurm_gpu.sh: error: $*" >&2
  exit 1
}

cmd_submit() {
  local ntasks_per_node cpus_per_task
  case "$TASKS" in
    gpu) ntasks_per_node=$GPUS_PER_NODE; cpus_per_task=$CPUS_PER_GPU ;;
    node) ntasks_per_node=1; cpus_per_task=$((CPUS_PER_GPU * GPUS_PER_NODE)) ;;
    *) die "TASKS=$TASKS; use gpu or node." ;;
  esac
  local args=(sbatch --job-name="$JOB_NAME" --nodes="$NODES"
              --gpus-per-node="$GPUS_PER_NODE"
              --ntasks-per-node="$ntasks_per_node"
              --cpus-per-task="$cpus_per_task" --time="$TIME"
              --chdir="$REPO_DIR")
  if [[ -n "$PARTITION" ]]; then
    args+=(--partition="$PARTITION")
  fi
  if [[ -n "$ACCOUNT" ]]; then
    args+=(--account="$ACCOUNT")
  fi
  args+=("$REPO_DIR/launch/slurm_gpu.sbatch" "$@")
  # sbatch passes this environment to the job (--export=ALL by default).
  export CONFIG WORKDIR DATA_DIR BATCH_SIZE EXTRA_FLAGS VENV PYTHON REPO_DIR
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "+ CONFIG=$CONFIG WORKDIR=${WORKDIR:-<default>} DATA_DIR=$DATA_DIR" \
         "BATCH_SIZE=$BATCH_SIZE EXTRA_FLAGS=$EXTRA_FLAGS ${args[*]}"
  else
    "${args[@]}"
  fi
}

# Number of GPUs this task can see.
visible_gpus() {
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    local ids=()
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    echo "$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

cmd_task() {
  : "${SLURM_PROCID:?task must run under srun (see launch/slurm_gpu.sbatch)}"
  local nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
  local ntasks="${SLURM_NTASKS:-1}"
  local per_node=$((ntasks / nodes)) gpus
  gpus="$(visible_gpus)"
  # jax.distributed.initialize() under SLURM gives each process the one GPU
  # numbered SLURM_LOCALID unless JAX_LOCAL_DEVICE_IDS says otherwise:
  if [[ "$ntasks" -gt 1 && "$gpus" -gt 0 ]]; then
    if [[ "$gpus" -eq 1 ]]; then
      # SLURM bound one GPU to this task (--gpus-per-task / --gpu-bind): it
      # is device 0 of this process.
      export JAX_LOCAL_DEVICE_IDS=0
    elif [[ "$per_node" -eq 1 ]]; then
      # One process per node drives all the node's GPUs.
      export JAX_LOCAL_DEVICE_IDS
      JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((gpus - 1)))"
    fi
  fi
  if [[ -n "$VENV" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
  fi
  cd "$REPO_DIR"
  local flags=(--config="$CONFIG"
               --workdir="${WORKDIR:-$REPO_DIR/runs/byol_jax-${SLURM_JOB_NAME:-byol_jax}}")
  if [[ -n "$DATA_DIR" ]]; then
    flags+=(--config.data.data_dir="$DATA_DIR")
  fi
  if [[ -n "$BATCH_SIZE" ]]; then
    flags+=(--config.batch_size="$BATCH_SIZE")
  fi
  local extra=()
  read -r -a extra <<<"$EXTRA_FLAGS"
  flags+=("${extra[@]}")
  if [[ "$SLURM_PROCID" == 0 ]]; then
    echo "task 0 of $ntasks ($per_node per node, $gpus visible GPU(s)," \
         "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-<SLURM_LOCALID>}):" \
         "$PYTHON -m byol_jax.train ${flags[*]} $*"
  fi
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
  exec "$PYTHON" -m byol_jax.train "${flags[@]}" "$@"
}

main() {
  local command="${1:-}"
  if [[ $# -gt 0 ]]; then
    shift
  fi
  case "$command" in
    submit) cmd_submit "$@" ;;
    task) cmd_task "$@" ;;
    help|-h|--help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown command '$command'." ;;
  esac
}

main "$@"
