#!/usr/bin/env bash
# The fine-tuning (iql.py, cql_continuous.py) and Decision Transformer (dt.py, d3rlpy's) benchmarks on a GPU machine,
# in sessions of bounded time (benchmark/README.md):
#   bash benchmark/gpu_sweeps.sh SECONDS OUT SWEEP [SWEEP ...]      SWEEP: dt dt_peer finetune sac calql
# First, once per machine, the checks that need it quiet: dt.py's captured step against eager (gpu_check.py
# same-math; the other scripts' are in gpu_check.sh), its speed captured and eager, and d3rlpy's DT step. Then the
# chosen sweeps run together for at most SECONDS (run.py --time-limit: a cut run keeps its checkpoint under
# /tmp/gpu_sweeps, and the same command again on the same warm machine resumes it), and their curves and logs are
# packed into OUT/sweeps.tar.gz. Measured on an H200 with all five at once (36 runs on 16 cores, under MPS): dt.py
# about 90 updates/s a run, iql.py 200, SAC 85, CQL 90, against 603 for dt.py alone; so 8 minutes of sweeps finish one
# or two of them, not all: dt (6 runs of 100k) with dt_peer (6 of 20k, about 60 updates/s), finetune (6 of 100k +
# 100k), calql (6 of 10k + 10k, the CPU's budget) each about 8 minutes (calql less); sac (12 of 100k online) 8 to 15.
# dt alone: 190-230 updates/s a run (1312 together), its six runs and their target evaluations in 434 s + 231 s (two
# calls, the second resuming); sac alone: 173-183 environment steps/s a run, its 12 runs in 531 s + 112 s. To skip
# the checks (run on an earlier machine), first write a line to /tmp/gpu_sweeps/checks.txt.
# Needs, beside the repository: .whl (Python 3.12 wheels of gymnasium, mujoco-core, minari, tyro and their missing
# dependencies), .whl_peer (d3rlpy 2.8.1, gym 0.26.2, structlog, dataclasses-json, marshmallow, gym-notices) and
# .data/hopper-medium-v0.tar.gz (the dataset of the CPU results; medium-replay is rebuilt exactly from the repository).
set -u
cd "$(dirname "$0")/.."
T=$1 OUT=$2 W=/tmp/gpu_sweeps
shift 2
for s in "$@"; do  # every name checked before anything starts
  case $s in
    dt|dt_peer|finetune|sac|calql) ;;
    *) echo "unknown sweep '$s' (dt dt_peer finetune sac calql)"; exit 2 ;;
  esac
done
start=$(date +%s)
mkdir -p /tmp/minari/local/hopper "$W/peer" "$OUT"
. benchmark/gpu_setup.sh > "$W/setup.txt" 2>&1 || { cat "$W/setup.txt"; exit 1; }
export OMP_NUM_THREADS=1
[ -d /tmp/minari/local/hopper/medium-v0 ] || tar xzf .data/hopper-medium-v0.tar.gz -C /tmp/minari/local/hopper || exit 1
if [ ! -f "$W/checks.txt" ]; then
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 benchmark/gpu_check.py --parts same-math --steps dt --out "$W/check" --work "$W/check_work" | grep -v "^\["
    python3 benchmark/speed.py --device cuda --scripts dt --batch-size 64 --warmup 50 --steps 1000
    python3 benchmark/speed.py --device cuda --scripts dt --batch-size 64 --warmup 10 --steps 200 --no-cudagraphs
    python3 benchmark/peers/d3rlpy_peer.py --algo dt --speed --device cuda:0 \
      --dataset-id local/hopper/medium-replay-v0 --warmup 30 --steps 300 2>&1 | grep "^d3rlpy"
  } > "$W/checks.txt" 2>&1
fi
cat "$W/checks.txt"
pgrep -f "nvidia-cuda-mps-control -d" > /dev/null || nvidia-cuda-mps-control -d  # the runs' kernels share the GPU
reserve=25 grace=30  # the last seconds: packing; dt's target evaluations need 110, its long evaluations more grace
case " $* " in *" dt "*) reserve=110 grace=45 ;; esac
left=$((T - ($(date +%s) - start) - reserve))  # the sweeps' share
[ "$left" -gt 60 ] || { echo "SECONDS=$T leaves the sweeps $left s after the checks: give it more"; exit 2; }
D="local/hopper/medium-replay-v0 local/hopper/medium-v0"
sweep() {  # name, then run.py's grid; every run of the grid at once, one thread each
  local name=$1; shift
  python3 benchmark/run.py --runs-per-gpu 12 --threads 1 --time-limit "$left" --stop-grace "$grace" \
    --out "$W/$name" "$@" > "$W/$name.txt" 2>&1
}
for s in "$@"; do
  case $s in
    dt) sweep dt --scripts dt.py --dataset-ids $D \
          --args="--total-steps 100000 --eval-every 10000 --target-returns 3600 1800" & ;;
    finetune) sweep finetune --scripts iql.py --dataset-ids $D --variants "finetune: " \
          --args="--total-steps 100000 --online-steps 100000 --eval-every 5000" & ;;
    sac) sweep sac --scripts cql_continuous.py --dataset-ids $D --variants "sac: " "sac_symmetric: --online-ratio 0.5" \
          --args="--cql-alpha 0 --total-steps 0 --online-steps 100000 --eval-every 5000 --hidden-dims 256 256 \
          --actor-lr 3e-4 --alpha-lr 3e-4 --backup-entropy" & ;;  # SAC's own settings: 256-256, lr 3e-4, soft backup
    calql) sweep calql --scripts cql_continuous.py --dataset-ids local/hopper/medium-replay-v0 \
          --variants "finetune: " "calql: --calql" \
          --args="--total-steps 10000 --online-steps 10000 --eval-every 500 --hidden-dims 256 256" & ;;
    dt_peer) for d in $D; do for seed in 1 2 3; do  # d3rlpy's DT, 20k steps; a run cut by the limit starts over
          f="$W/peer/d3rlpy_dt_${d//\//-}_$seed.json"
          [ -f "$f" ] || timeout $((left - 20)) python3 \
            benchmark/peers/d3rlpy_peer.py --algo dt --device cuda:0 --dataset-id "$d" --seed "$seed" \
            --total-steps 20000 --eval-every 10000 --out "$f" > "$W/peer/${d//\//-}_$seed.txt" 2>&1 &
        done; done ;;
  esac
done
wait
# The return each finished dt.py run achieves against the return it is asked for, 10 episodes each: the DT figure
# (benchmark/dt_targets.py --logdir with the runs' folders).
targets="500 1000 1500 2000 2500 3000 3600 4500"
for run in "$W"/dt/runs/*/; do  # targets.txt only once every target was evaluated; a cut evaluation is done again
  [ -f "$run/dt.pt" ] && [ ! -f "$run/targets.txt" ] && { timeout 90 python3 dt.py --checkpoint "$run/dt.pt" \
    --target-returns $targets --eval-episodes 10 > "$run/targets.log" 2>&1
    [ "$(grep -c 'target return' "$run/targets.log")" = 8 ] && grep 'target return' "$run/targets.log" \
      > "$run/targets.txt"; } &
done
wait
tar czf "$OUT/sweeps.tar.gz" -C "$W" --exclude="*.pt" --exclude="*.pt2" --exclude="check_work" .
cp "$W/checks.txt" "$OUT/"
for f in "$W"/*.txt; do tail -n 3 "$f"; done
echo "done in $(($(date +%s) - start)) s"
