"""Can we trust an off-policy estimate? fqe.py, d3rlpy's FQE, each training run's own critic and the dataset's mean
return, against the true values of a DOPE-style set of policies (Fu et al. 2021, arXiv:2103.16596).

    python benchmark/ope.py policies --out sweeps/ope     # train the policy set, keeping snapshots
    python benchmark/ope.py truth --out sweeps/ope        # 50 episodes per policy: true discounted values; critics
    python benchmark/ope.py fqe --out sweeps/ope          # fqe.py on every policy (resumable)
    python benchmark/ope.py peer --out sweeps/ope --peer-python peer/bin/python   # d3rlpy's FQE, its own venv
    python benchmark/ope.py report --out sweeps/ope       # tables and figure in sweeps/ope/
    python benchmark/ope.py report --out sweeps/ope --results benchmark/results   # the published ones

Each step skips what an earlier call finished, so a cut call is continued by running it again.

policies: every entry of RUNS trains once per dataset (seed 1, 1 thread, two at a time) with --save-every 1000; a
  snapshot of each checkpoint is copied as it appears ({out}/{dataset}/snapshots/{name}_{step}.pt), and the chosen
  steps become the policy set: each exported again as {name}_{step}_policy.pt2, the file the scripts write beside
  their checkpoints. A run that was cut continues from its last checkpoint (--resume), unless a snapshot it should
  have copied before that checkpoint is missing: then it starts over.
truth: per policy, --episodes episodes in the dataset's environment from seeds 0..episodes-1: the mean discounted
  return at --discount (the ground truth), its standard error and the undiscounted return; the training critic's own
  estimate, Q(s0, pi(s0)) averaged over the dataset's episode starts (min over twin critics, IQL's reward scaling
  undone; AWR has only V(s0), which estimates the data's value); and the dataset's mean discounted episode return,
  the constant baseline. The CQL runs' snapshots every 1000 steps get the same, for the figure.
fqe / peer: fqe.py (its defaults, --total-steps, --num-bootstrap) and benchmark/peers/d3rlpy_fqe.py (d3rlpy's
  defaults) on every policy of the set; results as JSON per policy.
report: per dataset, each estimator's normalized absolute error, Spearman rank correlation and regret@1 (and those of
  the lower end of fqe.py's interval) with 95% bootstrap intervals over policies (1000 resamples), as DOPE computes
  them; fqe.py's interval coverage; the figure of the CQL runs' critics against the true value over training. Written
  into --out, or into --results when given.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ("local/hopper/medium-replay-v0", "local/hopper/medium-v0")
# name, script, arguments, total steps, the snapshot steps in the policy set. Spread-out quality: early and late
# snapshots, behaviour cloning, offline SAC without conservatism (cql_alpha 0) beside CQL, and three algorithms. No
# BCQ: its policy scores candidates for every state, and d3rlpy's FQE calls the policy at every update (about 30
# updates/s on one CPU thread with 10 candidates), which this CPU budget cannot pay for 40k updates per policy.
# 15 policies per dataset. IQL's 5k and 10k snapshots have true values but are not in the set: their two
# estimators' 160k further updates did not fit into two CPU cores' time, and seven snapshots still span IQL's range.
RUNS = [
    ("cql", "cql_continuous.py", ["--hidden-dims", "256", "256"], 10_000, [1000, 2000, 5000, 10_000]),
    ("sac", "cql_continuous.py", ["--hidden-dims", "256", "256", "--cql-alpha", "0"], 10_000,
     [1000, 2000, 5000, 10_000]),
    ("iql", "iql.py", [], 30_000, [2000, 20_000, 30_000]),
    ("bc", "iql.py", ["--temperature", "0"], 20_000, [2000, 20_000]),
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
    fqe_steps: int = 40_000
    """gradient steps of fqe.py and of d3rlpy's FQE"""
    num_bootstrap: int = 5
    """fqe.py's bootstrap fits per policy"""
    peer_python: str = "peer/bin/python"
    """the Python of d3rlpy's environment (benchmark/peers/d3rlpy_fqe.py's docstring sets it up)"""
    results: Optional[Path] = None
    """where report writes ope.md, ope.csv and ope_critics.png: None is --out; benchmark/results holds the published"""


def slug(dataset_id: str) -> str:
    return dataset_id.replace("/", "-")


def env_with_one_thread() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


# ---- policies --------------------------------------------------------------------------------------------------------
def train_with_snapshots(name: str, script: str, extra: list, steps: int, dataset_id: str, out: Path,
                         discount: float):
    """One training run; every checkpoint it writes (--save-every 1000) is copied to snapshots/ as it appears."""
    import torch

    folder = out / slug(dataset_id)
    snapshots, work = folder / "snapshots", folder / "work" / name
    if (snapshots / f"{name}_{steps}.pt").exists():
        return f"{name} on {dataset_id}: done before"
    wanted = range(1000, steps + 1, 1000) if name in FIGURE_RUNS else [s for n, *_, chosen in RUNS if n == name
                                                                         for s in chosen]
    # A cut run continues from its checkpoint, unless a snapshot it wrote before that checkpoint was never copied
    # (the copying stopped first): the checkpoint has moved past it, and only a run from step 0 writes it again.
    checkpoints, resumed = sorted((work / "runs").glob(f"*/{name}.pt")), None
    if checkpoints:
        resumed = torch.load(checkpoints[0], map_location="cpu", weights_only=True)["loop"]["step"]
        if any(s < resumed and not (snapshots / f"{name}_{s}.pt").exists() for s in wanted):
            resumed = None
    if resumed is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        argv = [sys.executable, str(ROOT / script), "--dataset-id", dataset_id, "--seed", "1", "--total-steps",
                str(steps), "--save-every", "1000", "--eval-episodes", "0", "--exp-name", name, "--discount",
                str(discount), *extra]
    else:  # every argument comes from the checkpoint
        argv = [sys.executable, str(ROOT / script), "--resume", str(checkpoints[0].parent.relative_to(work))]
    snapshots.mkdir(parents=True, exist_ok=True)

    with open(work / "log.txt", "w" if resumed is None else "a") as log:
        if resumed is not None:  # the log goes on where the cut run's stopped
            log.write(f"ope.py: resuming at step {resumed}: {' '.join(argv[1:])}\n")
            log.flush()
        process = subprocess.Popen(argv, cwd=work, env=env_with_one_thread(), stdout=log, stderr=subprocess.STDOUT)
        seen = {}
        while True:
            finished = process.poll() is not None
            for path in (work / "runs").glob(f"*/{name}.pt"):
                stamp = path.stat().st_mtime_ns
                if seen.get(path) != stamp:  # a new checkpoint: renamed into place whole, so a copy reads all of it
                    seen[path] = stamp
                    copy = snapshots / f"incoming_{name}.pt"  # one per run: runs on one dataset share the folder
                    shutil.copyfile(path, copy)
                    step = torch.load(copy, map_location="cpu", weights_only=True)["loop"]["step"]
                    os.replace(copy, snapshots / f"{name}_{step}.pt")
            if finished:
                break
            time.sleep(0.5)
    missing = [step for step in wanted if not (snapshots / f"{name}_{step}.pt").exists()]
    if process.returncode != 0 or missing:
        raise SystemExit(f"{name} on {dataset_id} failed (exit {process.returncode}; no snapshot at steps {missing}): "
                         f"see {work / 'log.txt'}")
    return f"{name} on {dataset_id}: {steps} steps" + (f" (resumed at step {resumed})" if resumed is not None else "")


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
    jobs = [(train_with_snapshots, name, script, extra, steps, dataset_id, args.out, args.discount)
            for name, script, extra, steps, _ in RUNS for dataset_id in args.datasets]
    run_pool(jobs, args.workers)
    for dataset_id in args.datasets:
        for path in policy_set(dataset_id, args.out):
            export_snapshot(path)
        print(f"{dataset_id}: {len(policy_set(dataset_id, args.out))} policies exported")


# ---- truth -----------------------------------------------------------------------------------------------------------
def critic_estimate(module, agent, ckpt: dict, start_obs, data: dict) -> float | None:
    """The training run's own estimate of J(pi): its critic (the lower of the twin Qs) at the dataset's episode starts
    and pi's actions there, in raw reward units: the runs train on rewards * scale + shift (IQL's scale is 1000 / (max -
    min episode return)), so Q is turned back by (Q - shift / (1 - gamma)) / scale. None for AWR, whose only critic is
    V(s), the value of the data's own policy."""
    import torch

    if ckpt["algorithm"] == "awr":
        return None
    a = ckpt["args"]
    if ckpt["algorithm"] == "iql":
        scale = 1000.0 / float(np.ptp(data["episode_returns"])) if a["normalize_reward"] else 1.0
        shift = a["reward_shift"]
    else:  # cql_continuous's --reward-scale and --reward-bias; the others train on the rewards as they are
        scale, shift = a.get("reward_scale", 1.0), a.get("reward_bias", 0.0)
    with torch.no_grad():
        q = agent.critic(start_obs, agent.act(start_obs)).min(0).values.mean()
    return float((q - shift / (1.0 - a["discount"])) / scale)


def truth_of(path: Path, episodes: int, discount: float) -> dict:
    """Ground truth and the critic's estimate for one snapshot."""
    import torch

    module, ckpt = load_script(path)
    name, step = path.stem.rsplit("_", 1)
    if (ckpt["args"]["exp_name"], ckpt["loop"]["step"]) != (name, int(step)):  # a snapshot copied under a wrong name
        raise SystemExit(f"{path} holds {ckpt['args']['exp_name']} at step {ckpt['loop']['step']}")
    torch.manual_seed(0)  # BCQ's candidates
    args = module.Args(**{**ckpt["args"], "eval_episodes": episodes})
    agent = module.Agent(len(ckpt["task"]["obs_mean"]), len(ckpt["task"]["action_low"]), args, torch.device("cpu"))
    agent.load_state_dict(ckpt["agent"])
    data, task = module.load_data(args, torch.device("cpu"))
    envs = module.make_eval_envs(task, episodes, None)
    discounted = module.evaluate(agent.act, envs, task, 0, discount)
    returns = module.evaluate(agent.act, envs[:10], task, 0)
    lengths = torch.as_tensor(data["episode_lengths"])
    table, split = module.transition_table(data, task)
    start_obs = table[torch.cumsum(lengths, 0) - lengths, :split[0]]
    return {"true": float(discounted.mean()), "true_se": float(discounted.std(ddof=1) / np.sqrt(episodes)),
            "return": float(returns.mean()), "score": module.normalized_score(returns, task),
            "critic": critic_estimate(module, agent, ckpt, start_obs, data), "algorithm": ckpt["algorithm"],
            "step": ckpt["loop"]["step"]}


def dataset_value(dataset_id: str, discount: float) -> float:
    """The constant baseline: the dataset's mean discounted episode return from its episode starts."""
    import minari

    return float(np.mean([np.sum(np.asarray(ep.rewards) * discount ** np.arange(len(ep.rewards)))
                          for ep in minari.load_dataset(dataset_id).iterate_episodes()]))


def truth_job(path: Path, episodes: int, discount: float) -> str:
    target = path.with_suffix(".truth.json")
    if not target.exists():
        target.write_text(json.dumps(truth_of(path, episodes, discount), indent=1))
    return f"{path.name}: {json.loads(target.read_text())}"


def figure_snapshots(dataset_id: str, out: Path) -> list[Path]:
    snapshots = out / slug(dataset_id) / "snapshots"
    return [snapshots / f"{name}_{step}.pt" for name, _, _, steps, _ in RUNS if name in FIGURE_RUNS
            for step in range(1000, steps + 1, 1000)]


def truth(args: Args):
    jobs = []
    for dataset_id in args.datasets:
        folder = args.out / slug(dataset_id)
        (folder / "dataset.json").write_text(json.dumps({"value": dataset_value(dataset_id, args.discount)}))
        paths = dict.fromkeys(policy_set(dataset_id, args.out) + figure_snapshots(dataset_id, args.out))
        jobs += [(truth_job, path, args.episodes, args.discount) for path in paths]
    run_pool(jobs, args.workers)


# ---- fqe and peer ----------------------------------------------------------------------------------------------------
def estimate_job(kind: str, policy: Path, dataset_id: str, args: Args) -> str:
    """One estimator on one policy, in its own folder, one thread; its result as {policy}.{kind}.json."""
    target = policy.with_name(policy.name.replace("_policy.pt2", f".{kind}.json"))
    if target.exists():
        return f"{target.name}: done before"
    work = policy.parent.parent / kind / policy.stem
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if kind == "fqe":
        argv = [sys.executable, str(ROOT / "fqe.py"), "--policy", str(policy.resolve()), "--dataset-id", dataset_id,
                "--total-steps", str(args.fqe_steps), "--num-bootstrap", str(args.num_bootstrap), "--discount",
                str(args.discount), "--eval-every", "5000"]
    else:  # d3rlpy's FQE at its own defaults, in its own environment
        argv = [args.peer_python, str(ROOT / "benchmark" / "peers" / "d3rlpy_fqe.py"), "--policy",
                str(policy.resolve()), "--dataset-id", dataset_id, "--steps", str(args.fqe_steps), "--gamma",
                str(args.discount), "--log-every", "5000", "--threads", "1", "--seed", "1", "--out",
                str((work / "result.json").resolve())]
    started = time.time()
    result = subprocess.run(argv, cwd=work, env=env_with_one_thread(), capture_output=True, text=True)
    (work / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{kind} on {policy} failed: see {work / 'log.txt'}")
    if kind == "fqe":
        found = re.search(r"episode starts: (\S+), 95% interval \[(\S+), (\S+)\]", result.stdout)
        curve = [(int(m[1]), float(m[2])) for m in re.finditer(r"step (\d+)/\d+ \| J\(pi\) +(\S+)", result.stdout)]
        speed = [float(m[1]) for m in re.finditer(r"\| (\d+) updates/s", result.stdout)]
        summary = {"estimate": float(found[1]), "low": float(found[2]), "high": float(found[3]), "curve": curve,
                   "updates_per_second": speed[-1]}
    else:
        peer = json.loads((work / "result.json").read_text())
        summary = {"estimate": peer["estimate"], "curve": peer["curve"],
                   "updates_per_second": peer["updates_per_second"]}
    target.write_text(json.dumps({**summary, "seconds": round(time.time() - started)}, indent=1))
    return f"{target.name}: {summary['estimate']:.2f} ({time.time() - started:.0f} s)"


def estimates(args: Args, kind: str):
    jobs = [(estimate_job, kind, export_snapshot(path), dataset_id, args) for dataset_id in args.datasets
            for path in policy_set(dataset_id, args.out)]
    run_pool(jobs, args.workers)


# ---- report ----------------------------------------------------------------------------------------------------------
# fqe_low: the lower end of fqe.py's 95% interval, a pessimistic score for picking a policy (a wide interval flags
# a policy whose value the data barely cover).
ESTIMATORS = {"fqe": "fqe.py (ours)", "fqe_low": "fqe.py, its interval's lower end", "peer": "d3rlpy FQE",
              "critic": "the run's own critic", "dataset": "the dataset's mean return"}


def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's correlation needs)."""
    order = np.argsort(x, kind="stable")
    ranked = np.empty(len(x))
    ranked[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        ranked[x == value] = ranked[x == value].mean()
    return ranked


def metrics(true: np.ndarray, estimate: np.ndarray, worst: float | None = None, best: float | None = None) -> tuple:
    """DOPE's metrics on one set of policies: values rescaled by the true values' range, (v - worst) / (best - worst)
    (the whole set's, for a resample of it), estimates clipped at 2 on that scale; the mean absolute error, Spearman's
    rank correlation (nan for a constant estimate) and regret@1, 1 - the rescaled true value of the estimator's top
    pick (ties: the mean over them)."""
    worst, best = (true.min(), true.max()) if worst is None else (worst, best)
    rescaled, guessed = (true - worst) / (best - worst), np.minimum((estimate - worst) / (best - worst), 2.0)
    a, b = ranks(true), ranks(estimate)
    spearman = float(np.corrcoef(a, b)[0, 1]) if b.std() > 0 else float("nan")
    regret = 1.0 - rescaled[estimate == estimate.max()].mean()
    return float(np.abs(guessed - rescaled).mean()), spearman, float(regret)


def bootstrap(true: np.ndarray, estimate: np.ndarray, resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """Each metric on `resamples` resamples of the policies (with replacement): 2.5 and 97.5 percentiles."""
    rng, values = np.random.default_rng(seed), []
    for _ in range(resamples):
        pick = rng.integers(len(true), size=len(true))
        if true[pick].max() > true[pick].min():
            values.append(metrics(true[pick], estimate[pick], true.min(), true.max()))
    # A metric undefined on every resample (a constant estimate's Spearman) has no interval: nan, as its point value.
    return np.array([np.nanpercentile(v, [2.5, 97.5]) if not np.isnan(v).all() else [np.nan, np.nan]
                     for v in np.array(values).T]).T


def load_results(dataset_id: str, out: Path) -> list[dict]:
    folder = out / slug(dataset_id)
    baseline = json.loads((folder / "dataset.json").read_text())["value"]
    rows = []
    for path in policy_set(dataset_id, out):
        row = {"policy": path.stem, **json.loads(path.with_suffix(".truth.json").read_text()), "dataset": baseline}
        for kind in ("fqe", "peer"):
            result = path.with_name(f"{path.stem}.{kind}.json")
            if result.exists():
                loaded = json.loads(result.read_text())
                row[kind] = loaded["estimate"]
                row.update({f"{kind}_{k}": v for k, v in loaded.items() if k != "estimate"})
        rows.append(row)
    return rows


def report(args: Args):
    names = list(args.datasets)
    title = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    lines, csv = [f"# Off-policy evaluation on {title}", ""], []
    for dataset_id in args.datasets:
        rows = load_results(dataset_id, args.out)
        true = np.array([r["true"] for r in rows])
        lines += [f"## {dataset_id}: {len(rows)} policies, true values {true.min():.1f} to {true.max():.1f}", "",
                  "| estimator | absolute error (rescaled) | Spearman rank correlation | regret@1 |",
                  "|---|---|---|---|"]
        for kind, name in ESTIMATORS.items():
            have = [r for r in rows if r.get(kind) is not None]  # the critic row: AWR has no Q of its own
            if len(have) < 2:
                lines.append(f"| {name} | not run | | |")
                continue
            true_have, estimate = np.array([r["true"] for r in have]), np.array([r[kind] for r in have])
            point, (low, high) = metrics(true_have, estimate), bootstrap(true_have, estimate)
            name += f" ({len(have)} policies)" if len(have) < len(rows) else ""
            cells = [f"{p:.2f} [{lo:.2f}, {hi:.2f}]" if not np.isnan(p) else "n/a (one value for all)"
                     for p, lo, hi in zip(point, low, high)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if all("fqe_low" in r and np.isfinite(r["fqe_low"]) for r in rows):
            inside = [r["fqe_low"] <= r["true"] <= r["fqe_high"] for r in rows]
            lines += ["", f"fqe.py's 95% intervals hold the true value for {sum(inside)} of {len(rows)} policies "
                          f"({100 * np.mean(inside):.0f}%)."]
        lines += ["", f"| policy | true ({args.episodes} episodes) | return (10 episodes) | fqe.py [95% interval] | "
                      "d3rlpy FQE | own critic |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            fqe_cell = f"{r['fqe']:.1f} [{r['fqe_low']:.1f}, {r['fqe_high']:.1f}]" if "fqe" in r else "-"
            lines.append(f"| {r['policy']} | {r['true']:.1f} +- {r['true_se']:.1f} | {r['return']:.0f} | {fqe_cell} | "
                         + (f"{r['peer']:.1f}" if "peer" in r else "-") + " | "
                         + ("-" if r["critic"] is None else f"{r['critic']:.1f}") + " |")
            csv.append({"dataset": dataset_id, **{k: v for k, v in r.items() if not isinstance(v, list)}})
        lines.append("")
    results = args.results or args.out
    results.mkdir(parents=True, exist_ok=True)
    (results / "ope.md").write_text("\n".join(lines))
    keys = list(dict.fromkeys(k for row in csv for k in row))
    (results / "ope.csv").write_text("\n".join([",".join(keys)] + [",".join(str(row.get(k, "")) for k in keys)
                                                                    for row in csv]) + "\n")
    print("\n".join(lines))
    plot_critics(args, results)
    print(f"written: {results / 'ope.md'}, ope.csv, ope_critics.png")


def plot_critics(args: Args, results: Path):
    """The figure: each CQL run's critic estimate of J(pi) against pi's true value, over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.datasets), figsize=(5.5 * len(args.datasets), 4), squeeze=False)
    for ax, dataset_id in zip(axes[0], args.datasets):
        for name, label, color in (("sac", "cql_alpha 0 (offline SAC)", "tab:red"), ("cql", "CQL, cql_alpha 5",
                                                                                    "tab:blue")):
            points = [json.loads(p.with_suffix(".truth.json").read_text())
                      for p in figure_snapshots(dataset_id, args.out) if p.stem.startswith(name + "_")]
            steps = [p["step"] for p in points]
            ax.plot(steps, [p["true"] for p in points], color=color, label=f"{label}: true value")
            ax.plot(steps, [p["critic"] for p in points], color=color, linestyle="--", label=f"{label}: its critic")
        ax.set(title=dataset_id, xlabel="gradient steps", ylabel=f"J(pi), discounted at {args.discount}",
               yscale="symlog")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(results / "ope_critics.png", dpi=110)
    plt.close(fig)


def main(args: Args):
    {"policies": policies, "truth": truth, "fqe": lambda a: estimates(a, "fqe"),
     "peer": lambda a: estimates(a, "peer"), "report": report}[args.step](args)


if __name__ == "__main__":
    main(tyro.cli(Args))
