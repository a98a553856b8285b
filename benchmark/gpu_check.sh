#!/usr/bin/env bash
# Every GPU check on a GPU machine: what it lacks installed and local/hopper/medium-replay-v0 rebuilt
# (benchmark/gpu_setup.sh), then benchmark/gpu_check.py with the given arguments.
#   bash benchmark/gpu_check.sh --out "$OUT"                # every part
#   bash benchmark/gpu_check.sh --parts e2e packed --out "$OUT"
set -u
cd "$(dirname "$0")/.."
. benchmark/gpu_setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmark/gpu_check.py "$@"
