#!/usr/bin/env bash
# One call on a lent GPU machine (see DEVELOPERS.md): install what it lacks from .whl/ (Python 3.12 wheels of
# gymnasium, mujoco-core, minari, tyro, d3rlpy and their missing dependencies, downloaded beside the repository),
# rebuild local/hopper/medium-replay-v0, then run benchmark/gpu_check.py with the given arguments.
#   bash benchmark/gpu_check.sh --out "$OUT"                # every part
#   bash benchmark/gpu_check.sh --parts e2e packed --out "$OUT"
set -u
cd "$(dirname "$0")/.."
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl $(ls .whl_peer/*.whl 2>/dev/null) || exit 1
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=/tmp/minari MUJOCO_GL=egl
[ -d /tmp/minari/local/hopper/medium-replay-v0 ] || python3 benchmark/make_datasets.py --datasets medium-replay || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 benchmark/gpu_check.py "$@"
