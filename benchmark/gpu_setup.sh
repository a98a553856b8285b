# Sourced by gpu_check.sh and gpu_sweeps.sh from the repository root on a GPU machine: installs, once per machine, the
# Python 3.12 wheels it lacks from .whl/ (gymnasium, mujoco-core, minari, tyro and their missing dependencies) into
# /tmp/site and from .whl_peer/ (d3rlpy 2.8.1 and its, as gpu_sweeps.sh lists them) into /tmp/peersite, puts both on
# the path, and rebuilds local/hopper/medium-replay-v0 under /tmp/minari (exactly, in seconds).
[ -d /tmp/site ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .whl/*.whl || return 1
[ -d /tmp/peersite ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target \
  /tmp/peersite .whl_peer/*.whl || return 1
export PYTHONPATH=/tmp/site:/tmp/peersite PYTHONUNBUFFERED=1 MINARI_DATASETS_PATH=/tmp/minari MUJOCO_GL=egl
[ -d /tmp/minari/local/hopper/medium-replay-v0 ] || python3 benchmark/make_datasets.py --datasets medium-replay || return 1
