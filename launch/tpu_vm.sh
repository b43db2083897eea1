#!/usr/bin/env bash
# Cloud TPU VM slices and pods: create, set up, train, evaluate, delete.
#
# Every worker of the slice runs the same `python -m byol_jax.train` (JAX's
# multi-controller runtime); the trainer reads everything else from the config.
# One host (v3-8, v5litepod-8) and pods (v3-512, v4-64, v6e-64 ...) use the
# same commands; the zone and runtime follow from ACCELERATOR_TYPE.
#
#   export PROJECT=my-project BUCKET=my-bucket
#   export ACCELERATOR_TYPE=v3-32 TPU_NAME=byol-v3-32
#   launch/tpu_vm.sh create             # QUEUED=1 SPOT=1: a queued Spot request
#   launch/tpu_vm.sh setup              # venv + byol_jax on every worker
#   launch/tpu_vm.sh train              # detached; follow with `logs`
#   launch/tpu_vm.sh logs
#   launch/tpu_vm.sh recover            # after a Spot preemption: delete,
#                                       # create, setup, train (resumes)
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
TPU_NAME="${TPU_NAME:-byol-jax}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v3-8}"   # v2-8 ... v3-512, v4-64, v5litepod-16, v5p-32, v6e-64
ZONE="${ZONE:-}"                                # empty: from ACCELERATOR_TYPE (default_zone)
RUNTIME_VERSION="${RUNTIME_VERSION:-}"          # empty: from ACCELERATOR_TYPE (default_runtime)
SPOT="${SPOT:-0}"                               # 1: a Spot TPU (cheaper; can be preempted any time)
QUEUED="${QUEUED:-0}"                           # 1: ask through a queued resource (waits for capacity)
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"  # the queued resource's id
AUTOCHECKPOINT="${AUTOCHECKPOINT:-0}"           # 1: --autocheckpoint-enabled (SIGTERM before maintenance)
SERVICE_ACCOUNT="${SERVICE_ACCOUNT:-}"          # empty: the project's Compute Engine default account
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
  create        gcloud compute tpus tpu-vm create \$TPU_NAME (\$ACCELERATOR_TYPE);
                QUEUED=1: a queued resource, and wait until it is ACTIVE
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
  status        describe the TPU (QUEUED=1: the queued resource)
  delete        delete the TPU (QUEUED=1: the queued resource and its TPU)
  recover       after a Spot preemption or a failed slice: delete, create,
                setup and train again; training resumes from \$WORKDIR
  help          this text

Settings (environment variables; current values):
  PROJECT=${PROJECT:-<gcloud default>} TPU_NAME=$TPU_NAME
  ACCELERATOR_TYPE=$ACCELERATOR_TYPE ZONE=${ZONE:-<from the type>}
  RUNTIME_VERSION=${RUNTIME_VERSION:-<from the type>} SPOT=$SPOT QUEUED=$QUEUED
  QUEUED_RESOURCE=$QUEUED_RESOURCE AUTOCHECKPOINT=$AUTOCHECKPOINT
  SERVICE_ACCOUNT=${SERVICE_ACCOUNT:-<Compute Engine default>}
  BUCKET=${BUCKET:-<unset>} CONFIG=$CONFIG
  WORKDIR=$WORKDIR
  DATA_DIR=$DATA_DIR
  BATCH_SIZE=${BATCH_SIZE:-<config>} MULTIHOST=$MULTIHOST EXTRA_FLAGS=$EXTRA_FLAGS
  SOURCE=$SOURCE REPO_URL=$REPO_URL REPO_REF=$REPO_REF
  PYTHON_VERSION=$PYTHON_VERSION JAX_PACKAGE=$JAX_PACKAGE DETACH=$DETACH
  WORKER=$WORKER DRY_RUN=$DRY_RUN

Zones and runtimes by generation (override with ZONE, RUNTIME_VERSION):
  v2, v3     europe-west4-a   tpu-ubuntu2204-base
  v4         us-central2-b    tpu-ubuntu2204-base
  v5litepod  us-central1-a    v2-alpha-tpuv5-lite   (v5e)
  v5p        us-east5-a       v2-alpha-tpuv5
  v6e        us-east5-b       v2-alpha-tpuv6e

Example: BYOL ResNet-50, 300 epochs, on a v3-32 (per-device batch 4096/32 = 128):
  PROJECT=p BUCKET=b ACCELERATOR_TYPE=v3-32 \\
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

# ----------------------------------------------------------------------------
# The slice: generation, zone, runtime and size from ACCELERATOR_TYPE.
# ----------------------------------------------------------------------------
generation() {  # v2-8 -> v2, v5litepod-16 -> v5litepod
  echo "${ACCELERATOR_TYPE%%-*}"
}

default_zone() {  # a zone that offers every slice size of the generation
  case "$(generation)" in
    v2|v3) echo europe-west4-a ;;
    v4) echo us-central2-b ;;
    v5litepod) echo us-central1-a ;;
    v5p) echo us-east5-a ;;
    v6e) echo us-east5-b ;;
  esac
}

default_runtime() {  # the TPU software version Google lists for JAX
  case "$(generation)" in
    v2|v3|v4) echo tpu-ubuntu2204-base ;;
    v5litepod) echo v2-alpha-tpuv5-lite ;;
    v5p) echo v2-alpha-tpuv5 ;;
    v6e) echo v2-alpha-tpuv6e ;;
  esac
}

slice_size() {  # prints "DEVICES HOSTS": JAX devices and TPU VMs (workers)
  local n="${ACCELERATOR_TYPE##*-}" devices hosts
  [[ "$n" =~ ^[0-9]+$ ]] || die "ACCELERATOR_TYPE=$ACCELERATOR_TYPE: expected GEN-SIZE, e.g. v3-32."
  case "$(generation)" in
    v2|v3) devices=$n; hosts=$(( (n + 7) / 8 )) ;;   # SIZE cores, 8 per host, 1 device each
    v4|v5p) devices=$(( n / 2 )); hosts=$(( (n / 2 + 3) / 4 )) ;;  # SIZE cores, 2 per chip (1 device), 4 chips per host
    v5litepod|v6e)                                   # SIZE chips; 8 on one host, else 4 per host
      devices=$n
      if (( n <= 8 )); then hosts=1; else hosts=$(( n / 4 )); fi ;;
  esac
  echo "$devices $hosts"
}

resolve_slice() {  # fills ZONE and RUNTIME_VERSION; says what the slice is
  local gen
  gen="$(generation)"
  case "$gen" in
    v2|v3|v4|v5litepod|v5p|v6e) ;;
    v5e) die "the TPU API names v5e slices v5litepod-SIZE (ACCELERATOR_TYPE=v5litepod-${ACCELERATOR_TYPE#*-})." ;;
    *) if [[ -z "$ZONE" || -z "$RUNTIME_VERSION" ]]; then
         die "unknown TPU generation '$gen' in ACCELERATOR_TYPE=$ACCELERATOR_TYPE: set ZONE and RUNTIME_VERSION."
       fi
       return ;;
  esac
  ZONE="${ZONE:-$(default_zone)}"
  RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime)}"
  local size
  size="$(slice_size)"
  echo "tpu_vm.sh: $ACCELERATOR_TYPE: ${size% *} JAX devices on ${size#* } host(s);" \
       "zone $ZONE, runtime $RUNTIME_VERSION" >&2
}

gcloud_in_zone() {  # gcloud [alpha] compute tpus GROUP SUBCOMMAND ARGS... --zone [--project]
  local args=(gcloud "$@" --zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then
    args+=(--project="$PROJECT")
  fi
  run "${args[@]}"
}

gcloud_tpu() {  # gcloud compute tpus tpu-vm SUBCOMMAND ARGS...
  gcloud_in_zone compute tpus tpu-vm "$@"
}

gcloud_queued() {  # gcloud compute tpus queued-resources SUBCOMMAND ARGS...
  gcloud_in_zone compute tpus queued-resources "$@"
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
    -e "${dir}[tf,gcs]" "$jax_pkg"
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
  local track=() args=(--accelerator-type="$ACCELERATOR_TYPE")
  if [[ "$SPOT" == 1 ]]; then
    args+=(--spot)
  fi
  if [[ -n "$SERVICE_ACCOUNT" ]]; then
    args+=(--service-account="$SERVICE_ACCOUNT")
  fi
  if [[ "$AUTOCHECKPOINT" == 1 ]]; then
    track=(alpha)  # --autocheckpoint-enabled is a preview flag of gcloud alpha.
    args+=(--autocheckpoint-enabled)
  fi
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_in_zone "${track[@]}" compute tpus queued-resources create \
      "$QUEUED_RESOURCE" --node-id="$TPU_NAME" \
      --runtime-version="$RUNTIME_VERSION" "${args[@]}"
    wait_active
  else
    gcloud_in_zone "${track[@]}" compute tpus tpu-vm create "$TPU_NAME" \
      --version="$RUNTIME_VERSION" "${args[@]}"
  fi
}

wait_active() {  # a queued resource: until ACTIVE (its TPU exists), or fail
  local state
  if [[ "$DRY_RUN" != 0 ]]; then
    gcloud_queued describe "$QUEUED_RESOURCE" --format='value(state.state)'
    return
  fi
  while true; do
    state="$(gcloud_queued describe "$QUEUED_RESOURCE" --format='value(state.state)')"
    case "$state" in
      ACTIVE) echo "tpu_vm.sh: $QUEUED_RESOURCE is ACTIVE."; return ;;
      FAILED|SUSPENDED) die "queued resource $QUEUED_RESOURCE is $state; \`$0 delete\` and create again." ;;
      *) echo "tpu_vm.sh: $QUEUED_RESOURCE is ${state:-?}; waiting for capacity."; sleep 60 ;;
    esac
  done
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    # --force deletes the queued resource's TPU too.
    gcloud_queued delete "$QUEUED_RESOURCE" --force --quiet
  else
    gcloud_tpu delete "$TPU_NAME" --quiet
  fi
}

cmd_status() {
  if [[ "$QUEUED" == 1 ]]; then
    gcloud_queued describe "$QUEUED_RESOURCE"
  else
    gcloud_tpu describe "$TPU_NAME"
  fi
}

# A preempted Spot TPU (state PREEMPTED, or a SUSPENDED queued resource)
# cannot be restarted: delete it, create it again, set it up, and train,
# which resumes from the newest checkpoint in $WORKDIR.
cmd_recover() {
  need_bucket
  cmd_delete || echo "tpu_vm.sh: nothing to delete; creating $TPU_NAME."
  cmd_create
  cmd_setup
  cmd_train "$@"
}

# Packs this checkout as it is on disk: tracked files with their uncommitted
# changes and untracked files that .gitignore does not exclude. Built even
# under DRY_RUN (it only reads the checkout), so it shows what would travel.
source_tarball() {  # OUT.tar.gz
  local file
  git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' file; do
      if [[ -f "$REPO_ROOT/$file" ]]; then  # not deleted since the last commit
        printf '%s\0' "$file"
      fi
    done | tar -C "$REPO_ROOT" --null -T - -czf "$1"
  echo "tpu_vm.sh: packed $(tar -tzf "$1" | wc -l | tr -d ' ') files of $REPO_ROOT into $1" >&2
}

cmd_setup() {
  if [[ "$SOURCE" == copy ]]; then
    local tarball
    tarball="$(mktemp -d)/$REMOTE_DIR.tar.gz"
    source_tarball "$tarball"
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
    help|-h|--help|"") ;;
    *) resolve_slice ;;
  esac
  case "$command" in
    create) cmd_create ;;
    setup) cmd_setup ;;
    train) cmd_train "$@" ;;
    linear-eval|linear_eval) cmd_linear_eval "$@" ;;
    logs) gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER" \
            --command="tail -n 100 -F \$HOME/$LOG_FILE" ;;
    stop) on_workers all remote_stop "$LOG_FILE" ;;
    ssh) gcloud_tpu ssh "$TPU_NAME" --worker="$WORKER" ;;
    status) cmd_status ;;
    delete) cmd_delete ;;
    recover) cmd_recover "$@" ;;
    help|-h|--help) usage ;;
    "") usage >&2; exit 2 ;;
    *) usage >&2; die "unknown command '$command'." ;;
  esac
}

main "$@"
