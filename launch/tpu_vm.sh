#!/usr/bin/env bash
# Cloud TPU VM slices and pods: create, set up, train, evaluate, delete.
#
# Every worker of the slice runs the same `python -m byol_jax.train` (JAX's
# multi-controller runtime); the trainer reads everything else from the config.
# One host (v3-8, v4-8) and pods (v3-512, v4-64, ...) use the same commands.
#
#   export PROJECT=my-project ZONE=europe-west4-a BUCKET=my-bucket
#   export ACCELERATOR_TYPE=v3-32 TPU_NAME=byol-v3-32
#   launch/tpu_vm.sh create
#   launch/tpu_vm.sh setup              # venv + byol_jax on every worker
#   launch/tpu_vm.sh train              # detached; follow with `logs`
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh linear-eval
#   launch/tpu_vm.sh delete
#
# Run `launch/tpu_vm.sh help` for every command and variable; DRY_RUN=1
# prints the gcloud commands instead of running them.
set -euo pipefail

# ----------------------------------------------------------------------------
# Settings: every one can be overridden from the environment.
# ----------------------------------------------------------------------------
PROJECT="${PROJECT:-}"                          # empty: gcloud's default project
ZONE="${ZONE:-europe-west4-a}"
TPU_NAME="${TPU_NAME:-byol-jax}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v3-8}"   # v3-8, v3-32, v3-512, v4-64, v5litepod-16 ...
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"  # v5e: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e
SPOT="${SPOT:-0}"                               # 1: create a Spot (preemptible) TPU
BUCKET="${BUCKET:-}"                            # gs://NAME or NAME: data and runs live here
BUCKET="${BUCKET#gs://}"
BUCKET="${BUCKET%/}"
CONFIG="${CONFIG:-configs/byol_r50.py:epochs=300}"
RUN_NAME="${RUN_NAME:-byol_r50_300ep}"
WORKDIR="${WORKDIR:-gs://${BUCKET:-BUCKET}/byol_jax/${RUN_NAME}}"
DATA_DIR="${DATA_DIR:-gs://${BUCKET:-BUCKET}/tensorflow_datasets}"  # prepared TFDS directory; "none": do not pass
BATCH_SIZE="${BATCH_SIZE:-}"                    # empty: the config's global batch (byol_r50: 4096)
EXTRA_FLAGS="${EXTRA_FLAGS:-}"                  # more trainer flags, e.g. "--config.model.dtype=bfloat16"
MULTIHOST="${MULTIHOST:-yes}"                   # --multihost of the trainer: jax.distributed.initialize()
SOURCE="${SOURCE:-git}"                         # git: clone REPO_URL@REPO_REF; copy: this checkout
REPO_URL="${REPO_URL:-https://github.com/OWNER/byol_jax.git}"  # <-- set to your fork or the project's repository
REPO_REF="${REPO_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-byol_jax}"            # on each worker, relative to $HOME
REMOTE_VENV="${REMOTE_VENV:-byol_jax_venv}"     # on each worker, relative to $HOME
PYTHON_VERSION="${PYTHON_VERSION:-3.12}"        # JAX needs >= 3.11; uv provides it on any image
JAX_PACKAGE="${JAX_PACKAGE:-jax[tpu]}"
DETACH="${DETACH:-1}"                           # 1: train under nohup (survives ssh drops)
LOG_FILE="${LOG_FILE:-byol_jax_train.log}"      # on each worker, relative to $HOME
WORKER="${WORKER:-0}"                           # for `ssh` and `logs`
DRY_RUN="${DRY_RUN:-0}"                         # 1: print the commands, run nothing; full: also the remote function bodies

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$SCRIPT_DIR")"

usage() {
  cat <<EOF
Usage: launch/tpu_vm.sh COMMAND [EXTRA TRAINER FLAGS...]

Commands (all run from your machine through gcloud):
  create        gcloud compute tpus tpu-vm create \$TPU_NAME (\$ACCELERATOR_TYPE)
  setup         on every worker: Python \$PYTHON_VERSION venv, byol_jax
                (SOURCE=git: clone \$REPO_URL@\$REPO_REF; SOURCE=copy: this
                checkout, uncommitted changes included) and \$JAX_PACKAGE
  train         python -m byol_jax.train on every worker (--worker=all);
                extra arguments go to the trainer, e.g.
                --config.optimizer.base_lr=0.2. DETACH=0 stays attached.
  linear-eval   python -m byol_jax.linear_eval --workdir=\$WORKDIR on every worker
  logs          tail -f the training log of worker \$WORKER
  stop          stop a detached training run on every worker (SIGTERM: it
                saves a checkpoint; \`train\` again resumes)
  ssh           open a shell on worker \$WORKER
  status        gcloud compute tpus tpu-vm describe \$TPU_NAME
  delete        gcloud compute tpus tpu-vm delete \$TPU_NAME
  help          this text

Settings (environment variables; current values):
  PROJECT=${PROJECT:-<gcloud default>} ZONE=$ZONE TPU_NAME=$TPU_NAME
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE RUNTIME_VERSION=$RUNTIME_VERSION SPOT=$SPOT
  BUCKET=${BUCKET:-<unset>} CONFIG=$CONFIG
  WORKDIR=$WORKDIR
  DATA_DIR=$DATA_DIR
  BATCH_SIZE=${BATCH_SIZE:-<config>} MULTIHOST=$MULTIHOST EXTRA_FLAGS=$EXTRA_FLAGS
  SOURCE=$SOURCE REPO_URL=$REPO_URL REPO_REF=$REPO_REF
  PYTHON_VERSION=$PYTHON_VERSION JAX_PACKAGE=$JAX_PACKAGE DETACH=$DETACH
  WORKER=$WORKER DRY_RUN=$DRY_RUN

Example: BYOL ResNet-50, 300 epochs, on a v3-32 (per-device batch 4096/32 = 128):
  PROJECT=p ZONE=europe-west4-a BUCKET=b ACCELERATOR_TYPE=v3-32 \\
    CONFIG=configs/byol_r50.py:epochs=300 launch/tpu_vm.sh train
See launch/README.md for slice sizes, batch sizes and data preparation.
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 1
}

# Runs a command, or prints it (shell-quoted) when DRY_RUN is 1 or full.
run() {
  if [[ "$DRY_RUN" != 0 ]]; then
    local arg out="+"
    for arg in "$@"; do
      if [[ "$arg" =~ ^[][A-Za-z0-9_./:=,@%+~-]+$ ]]; then
        out+=" $arg"
      else
        out+=" '${arg//\'/\'\\\'\'}'"
      fi
    done
    echo "$out"
  else
    "$@"
  fi
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ARGS... --zone [--project]
  local args=(gcloud compute tpus tpu-vm "$@" --zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    args+=(--project="$PROJECT")
  fi
  run "${args[@]}"
}

# Runs a bash function (defined below, shipped by source) with arguments on
# the workers named by $1 ("all" or a number).
on_workers() {
  local worker=$1 fn=$2
  shift 2
  local call cmd
  call="$fn$(printf ' %q' "$@")"
  if [[ "$DRY_RUN" == 1 ]]; then  # Readable: the function body is elided.
    cmd="<body of $fn from tpu_vm.sh>; $call"
  else
    cmd="$(declare -f "$fn"); $call"
  fi
  gcloud_tpu ssh "$TPU_NAME" --worker="$worker" --command="$cmd"
}

need_bucket() {
  if [[ -z "$BUCKET" && ( "$WORKDIR" == gs://BUCKET/* || "$DATA_DIR" == gs://BUCKET/* ) ]]; then
    die "set BUCKET=NAME (or WORKDIR and DATA_DIR) first."
  fi
}

# ----------------------------------------------------------------------------
# Functions that run on the workers (sent with `declare -f`).
# ----------------------------------------------------------------------------
remote_setup() {  # source dir venv python_version jax_package repo_url repo_ref
  set -euo pipefail
  local source=$1 dir=$2 venv=$3 py=$4 jax_pkg=$5 url=$6 ref=$7
  cd "$HOME"
  if [[ "$source" == git ]]; then
    if [[ -d "$dir/.git" ]]; then
      git -C "$dir" fetch --depth=1 origin "$ref"
      git -C "$dir" checkout -q --detach FETCH_HEAD
    else
      rm -rf "$dir"
      git clone -q --depth=1 --branch "$ref" "$url" "$dir"
    fi
  else
    rm -rf "$dir"
    mkdir -p "$dir"
    tar -xzf "$dir.tar.gz" -C "$dir"
    rm -f "$dir.tar.gz"
  fi
  if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m pip install -q --user uv
    "$HOME/.local/bin/uv" venv -q --python "$py" "$venv"
  fi
  "$HOME/.local/bin/uv" pip install -q --python "$venv/bin/python" \
    -e "${dir}[tf]" "$jax_pkg"
  "$venv/bin/python" -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)' \
    || true
  echo "$(hostname): byol_jax ready in ~/$dir, venv ~/$venv"
}

remote_run() {  # dir venv detach log module args...
  set -euo pipefail
  local dir=$1 venv=$2 detach=$3 log=$4 module=$5
  shift 5
  cd "$HOME/$dir"
  export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
  if [[ "$detach" == 1 ]]; then
    nohup "$HOME/$venv/bin/python" -m "$module" "$@" >"$HOME/$log" 2>&1 </dev/null &
    echo "$!" >"$HOME/$log.pid"
    echo "$(hostname): started $module (pid $!), log ~/$log"
  else
    "$HOME/$venv/bin/python" -m "$module" "$@" 2>&1 | tee "$HOME/$log"
  fi
}

remote_stop() {  # log
  local pidfile="$HOME/$1.pid"
  if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    kill -TERM "$(cat "$pidfile")"
    echo "$(hostname): sent SIGTERM to $(cat "$pidfile")"
  else
    echo "$(hostname): no running job"
  fi
}

# ----------------------------------------------------------------------------
# Commands.
# ----------------------------------------------------------------------------
cmd_create() {
  local args=(create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE"
              --version="$RUNTIME_VERSION")
  if [[ "$SPOT" == 1 ]]; then
    args+=(--spot)
  fi
  gcloud_tpu "${args[@]}"
}

cmd_setup() {
  if [[ "$SOURCE" == copy ]]; then
    local tarball ref
    tarball="$(mktemp -d)/$REMOTE_DIR.tar.gz"
    # `git stash create` snapshots uncommitted changes without touching them.
    ref="$(git -C "$REPO_ROOT" stash create 2>/dev/null || true)"
    run git -C "$REPO_ROOT" archive --format=tar.gz -o "$tarball" "${ref:-HEAD}"
    gcloud_tpu scp "$tarball" "$TPU_NAME:~/" --worker=all
  elif [[ "$SOURCE" != git ]]; then
    die "SOURCE=$SOURCE; use git or copy."
  elif [[ "$REPO_URL" == *"/OWNER/"* ]]; then
    die "set REPO_URL to the byol_jax git repository (or SOURCE=copy)."
  fi
  on_workers all remote_setup "$SOURCE" "$REMOTE_DIR" "$REMOTE_VENV" \
    "$PYTHON_VERSION" "$JAX_PACKAGE" "$REPO_URL" "$REPO_REF"
}

train_flags() {  # prints nothing; fills the array TRAIN_FLAGS
  TRAIN_FLAGS=(--config="$CONFIG" --workdir="$WORKDIR" --multihost="$MULTIHOST")
  if [[ "$DATA_DIR" != none ]]; then
    TRAIN_FLAGS+=(--config.data.data_dir="$DATA_DIR")
  fi
  if [[ -n "$BATCH_SIZE" ]]; then
    TRAIN_FLAGS+=(--config.batch_size="$BATCH_SIZE")
  fi
  local extra=()
  read -r -a extra <<<"$EXTRA_FLAGS"
  TRAIN_FLAGS+=("${extra[@]}")
}

cmd_train() {
  need_bucket
  local TRAIN_FLAGS=()
  train_flags
  on_workers all remote_run "$REMOTE_DIR" "$REMOTE_VENV" "$DETACH" \
    "$LOG_FILE" byol_jax.train "${TRAIN_FLAGS[@]}" "$@"
}

cmd_linear_eval() {
  need_bucket
  local flags=(--workdir="$WORKDIR")
  if [[ "$MULTIHOST" == yes ]]; then
    flags+=(--multihost)
  fi
  if [[ "$DATA_DIR" != none ]]; then
    flags+=(--data_dir="$DATA_DIR")
  fi
  on_workers all remote_run "$REMOTE_DIR" "$REMOTE_VENV" 0 \
    byol_jax_linear_eval.log byol_jax.linear_eval "${flags[@]}" "$@"
}

main() {
  local command="${1:-}"
  if [[ $# -gt 0 ]]; then
    shift
  fi
  case "$command" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    train) cmd_train "$@" ;;
    linear-eval|linear_eval) cmd_linear_eval "$@" ;;
    logs) gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER" \
            --command="tail -n 100 -F \$HOME/$LOG_FILE" ;;
    stop) on_workers all remote_stop "$LOG_FILE" ;;
    ssh) gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER" ;;
    status) gcloud_tpu describe "$TPU_NAME" ;;
    delete) gcloud_tpu delete "$TPU_NAME" --quiet ;;
    help|-h|--help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown command '$command'." ;;
  esac
}

main "$@"
