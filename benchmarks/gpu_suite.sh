#!/usr/bin/env bash
# One command for one H100/H200 machine without network: the step throughput
# table (ResNet-50 224 px bf16, per-device batch 128 and 256) and a CIFAR-10
# BYOL ResNet-18 run sized to finish before the deadline (530 s after the
# start by default); results in benchmarks/results/gpu_suite_<date>_<device>/.
#
# On a machine with pip and the CIFAR-10 JPEG folders (train/<class>/*.jpg,
# test/<class>/*.jpg), once:
#   benchmarks/gpu_suite.sh --prepare --cifar_folder=/data/cifar10
# (.whl/: wheels of the trainer's pure-Python needs missing from a plain
# jax/flax/optax/chex/orbax image; .data/cifar10.npz: the JPEG pack, 53 MiB;
# both git-ignored, so carry them along). Without --cifar_folder the
# 6,000-image ../shared/datasets/cifar10_small.npz is copied instead (smoke).
# Then on the GPU machine:
#   benchmarks/gpu_suite.sh [--results_root=DIR] [--budget_s=530]
# CPU dry run (tests/test_benchmarks.py): benchmarks/gpu_suite.sh --tiny ...
# Other flags go to benchmarks/gpu_suite.py. Exit 0: every stage ran (the
# CIFAR run finished or was stopped on time by SIGTERM, saving first).
set -euo pipefail
start=$(date +%s)
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(ml_collections tensorboardX absl-py)  # pure Python
MODULES=(jax flax optax chex orbax.checkpoint ml_collections absl tensorboardX
         PIL numpy)

prepare=0
cifar_folder=""
args=()
for arg in "$@"; do
  case "$arg" in
    --prepare) prepare=1 ;;
    --cifar_folder=*) cifar_folder=${arg#*=} ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$arg") ;;
  esac
done

if [[ $prepare == 1 ]]; then
  mkdir -p .whl .data
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "${WHEELS[@]}"
  if [[ -n $cifar_folder ]]; then
    "$PYTHON" benchmarks/pack_images.py "$cifar_folder" .data/cifar10.npz
  elif [[ ! -f .data/cifar10.npz ]]; then
    cp ../shared/datasets/cifar10_small.npz .data/cifar10.npz
    echo "copied the 6,000-image cifar10_small.npz (smoke run); give" \
      "--cifar_folder=DIR for the full set"
  fi
  du -sh .whl .data
  echo "carry .whl and .data; on the GPU machine: benchmarks/gpu_suite.sh"
  exit 0
fi

imports=$(IFS=,; echo "${MODULES[*]}")
if ! "$PYTHON" -c "import $imports" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/byol_gpu_suite_site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
      --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
  for module in "${MODULES[@]}"; do
    if ! "$PYTHON" -c "import $module" 2>/dev/null; then
      echo "error: Python module $module is missing; run" \
        "benchmarks/gpu_suite.sh --prepare where pip works and carry .whl" >&2
      exit 1
    fi
  done
fi

exec "$PYTHON" benchmarks/gpu_suite.py --start_time="$start" \
  --python="$PYTHON" "${args[@]}"
