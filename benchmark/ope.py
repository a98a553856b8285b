"""Can we trust an off-policy estimate? fqe.py, d3rlpy's FQE, each training run's own critic and the dataset's mean
return, against the true values of a DOPE-style set of policies (Fu et al. 2021, arXiv:2103.16596).

    python benchmark/ope.py policies --out sweeps/ope     # train the policy set, keeping snapshots (about 1 h per dataset)
    python benchmark/ope.py truth --out sweeps/ope        # 50 episodes per policy: true discounted values; critics
    python benchmark/ope.py fqe --out sweeps/ope          # fqe.py on every policy (resumable)
    /work/peer/bin/python ... ope.py peer --out sweeps/ope   # d3rlpy's FQE on every policy (its own environment)
    python benchmark/ope.py report --out sweeps/ope       # tables and figure in benchmark/results/

Each step skips what an earlier call finished, so a cut call is continued by running it again.

policies: every entry of RUNS trains once per dataset (seed 1, 1 thread, two at a time) with --save-every 1000; a
  snapshot of each checkpoint is copied as it appears ({out}/{dataset}/snapshots/{name}_{step}.pt), and the chosen
  steps become the policy set: each exported again as {name}_{step}_policy.pt2, the file the scripts write beside
  their checkpoints.
truth: per policy, --episodes episodes in the dataset's environment from seeds 0..episodes-1: the mean discounted
  return at --discount (the ground truth), its standard error and the undiscounted return; the training critic's own
  estimate, Q(s0, pi(s0)) averaged over the dataset's episode starts (min over twin critics, IQL's reward scaling
  undone; AWR has only V(s0), which estimates the data's value); and the dataset's mean discounted episode return,
  the constant baseline. The CQL runs' snapshots every 1000 steps get the same, for the figure.
fqe / peer: fqe.py (its defaults, --total-steps, --num-bootstrap) and benchmark/peers/d3rlpy_fqe.py (d3rlpy's
  defaults) on every policy of the set; results as JSON per policy.
report: per dataset, each estimator's normalized absolute error, Spearman rank correlation and regret@1 with 95%
  bootstrap intervals over policies (1000 resamples), as DOPE computes them; fqe.py's interval coverage; the figure of
  the CQL runs' critics against the true value over training.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("local/hopper/medium-replay-v0", "local/hopper/medium-v0")
# name, script, arguments, total steps, the snapshot steps in the policy set. Spread-out quality: early and late
# snapshots, behaviour cloning, offline SAC without conservatism (cql_alpha 0) beside CQL, and four algorithms.
RUNS = [
    ("cql", "cql_continuous.py", ["--hidden-dims", "256", "256"], 10_000, [1000, 2000, 5000, 10_000]),
    ("sac", "cql_continuous.py", ["--hidden-dims", "256", "256", "--cql-alpha", "0"], 10_000, [1000, 2000, 5000, 10_000]),
    ("iql", "iql.py", [], 30_000, [2000, 5000, 10_000, 20_000, 30_000]),
    ("bc", "iql.py", ["--temperature", "0"], 20_000, [2000, 20_000]),
    ("bcq", "bcq.py", ["--num-candidates", "10"], 5000, [2000, 5000]),
    ("awr", "awr.py", [], 20_000, [5000, 20_000]),
]
FIGURE_RUNS = ("cql", "sac")  # every 1000-step snapshot of these gets a true value and its critic's estimate


@dataclass
class Args:
    step: tyro.conf.Positional[Literal["policies", "truth", "fqe", "peer", "report"]]
    """which part to run (see the module docstring)"""
    out: Path = Path("sweeps/ope")
    """working folder: snapshots, policies, results (large; not for the repository)"""
    datasets: tuple[str, ...] = DATASETS
    """Minari dataset ids (MINARI_DATASETS_PATH must hold them: python benchmark/make_datasets.py)"""
    workers: int = 2
    """processes at a time, one thread each"""
    discount: float = 0.99
    """gamma of every value: the ground truth, the estimators and the critics' targets"""
    episodes: int = 50
    """episodes per policy for the ground truth"""
    fqe_steps: int = 50_000
    """gradient steps of fqe.py and of d3rlpy's FQE"""
    num_bootstrap: int = 5
    """fqe.py's bootstrap fits per policy"""
    results: Path = ROOT / "benchmark" / "results"
    """where report writes ope.md, ope.csv and ope_critics.png"""


def slug(dataset_id: str) -> str:
    return dataset_id.replace("/", "-")


def env_with_one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- policies ----------------------------------------------------------------------------------------------------------
def train_with_snapshots(name: str, script: str, extra: list, steps: int, dataset_id: str, out: Path):
    """One training run; every checkpoint it writes (--save-every 1000) is copied to snapshots/ as it appears."""
    folder = out / slug(dataset_id)
    snapshots, work = folder / "snapshots", folder / "work" / name
    if (snapshots / f"{name}_{steps}.pt").exists():
        return f"{name} on {dataset_id}: done before"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    snapshots.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, str(ROOT / script), "--dataset-id", dataset_id, "--seed", "1", "--total-steps", str(steps),
            "--save-every", "1000", "--eval-episodes", "0", "--exp-name", name, *extra]
    import torch

    with open(work / "log.txt", "w") as log:
        process = subprocess.Popen(argv, cwd=work, env=env_with_one_thread(), stdout=log, stderr=subprocess.STDOUT)
        seen = {}
        while True:
            finished = process.poll() is not None
            for path in (work / "runs").glob(f"*/{name}.pt"):
                stamp = path.stat().st_mtime_ns
                if seen.get(path) != stamp:  # a new checkpoint: renamed into place whole, so a copy reads all of it
                    seen[path] = stamp
                    copy = snapshots / "incoming.pt"
                    shutil.copyfile(path, copy)
                    step = torch.load(copy, map_location="cpu", weights_only=True)["loop"]["step"]
                    os.replace(copy, snapshots / f"{name}_{step}.pt")
            if finished:
                break
            time.sleep(0.5)
    if process.returncode != 0 or not (snapshots / f"{name}_{steps}.pt").exists():
        raise SystemExit(f"{name} on {dataset_id} failed (exit {process.returncode}): see {work / 'log.txt'}")
    return f"{name} on {dataset_id}: {steps} steps"


def export_snapshot(path: Path) -> Path:
    """The snapshot's policy, exported by its own script's harness (the same file the script writes at every save)."""
    import torch

    target = path.with_name(path.stem + "_policy.pt2")
    if not target.exists():
        module, ckpt = load_script(path)
        agent = module.Agent(len(ckpt["task"]["obs_mean"]), len(ckpt["task"]["action_low"]),
                             module.Args(**ckpt["args"]), torch.device("cpu"))
        agent.load_state_dict(ckpt["agent"])
        torch.export.save(module.export_policy(agent, ckpt["task"]), target)
    return target


def load_script(path: Path):
    """The module of the script that saved a checkpoint (benchmark code may import the scripts; they never import each
    other), and the checkpoint."""
    import importlib

    import torch

    sys.path.insert(0, str(ROOT))
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return importlib.import_module(ckpt["algorithm"]), ckpt


def policy_set(dataset_id: str, out: Path) -> list[Path]:
    snapshots = out / slug(dataset_id) / "snapshots"
    return [snapshots / f"{name}_{step}.pt" for name, _, _, _, chosen in RUNS for step in chosen]


def run_pool(jobs: list, workers: int):
    """Runs callables in worker processes, at most `workers` at a time; prints what each returns."""
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(workers) as pool:
        futures = {pool.submit(*job): job for job in jobs}
        for future in as_completed(futures):
            print(future.result(), flush=True)


def policies(args: Args):
    jobs = [(train_with_snapshots, name, script, extra, steps, dataset_id, args.out)
            for name, script, extra, steps, _ in RUNS for dataset_id in args.datasets]
    run_pool(jobs, args.workers)
    for dataset_id in args.datasets:
        for path in policy_set(dataset_id, args.out):
            export_snapshot(path)
        print(f"{dataset_id}: {len(policy_set(dataset_id, args.out))} policies exported")


def main(args: Args):
    {"policies": policies}[args.step](args)


if __name__ == "__main__":
    main(tyro.cli(Args))
