#!/usr/bin/env bash
# Every GPU check on a GPU machine: install what it lacks from .whl/ (Python 3.12 wheels of gymnasium, mujoco-core,
# minari, tyro and their missing dependencies) and .whl_peer/ (d3rlpy's, as benchmark/gpu_sweeps.sh says),
# rebuild local/hopper/medium-replay-v0, then run benchmark/gpu_check.py with the given arguments.
#   bash benchmark/gpu_check.sh --out "$OUT"                # every part
#   bash benchmark/gpu_check.sh --parts e2e packed --out "$OUT"
set -u
cd "$(dirname "$0")/.."
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl || exit 1
[ -d /tmp/peersite ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
  /tmp/peersite .whl_peer/*.whl || exit 1
export PYTHONPATH=/tmp/site:/tmp/peersite PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=/tmp/minari MUJOCO_GL=egl
[ -d /tmp/minari/local/hopper/medium-replay-v0 ] || python3 benchmark/make_datasets.py --datasets medium-replay || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmark/gpu_check.py "$@"
