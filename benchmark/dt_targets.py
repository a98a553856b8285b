"""The Decision Transformer's achieved return against the return it is conditioned on (Chen et al. 2021, Fig. 4):
does asking for more than the data ever got give more? Reads the targets.txt of every dt.py run folder under --logdir,
the output of

    python dt.py --checkpoint RUN/dt.pt --target-returns 500 1000 1500 2000 2500 3000 3600 4500 > RUN/targets.txt

(benchmark/gpu_sweeps.sh writes them for its dt runs), and writes benchmark/results/{name}_targets.md, per dataset and
target the mean return over seeds +- their std, and {name}_targets.png, one panel per dataset: the mean over seeds
against the target, shaded from the lowest to the highest seed, the dataset's best episode return dashed (when the
dataset can be loaded: MINARI_DATASETS_PATH) and the line return = target dotted. A point above the dashed line is a
return the data never reached.

    python benchmark/dt_targets.py --logdir benchmark/logs/dt_hopper --name dt_hopper
"""

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import plot_curves  # noqa: E402

LINE = re.compile(r"\(trained on (?P<dataset>\S+)\).*target return (?P<target>[-\d.e+]+), return (?P<ret>[-\d.e+]+)")


@dataclass
class Args:
    logdir: Path = Path("benchmark/logs/dt_hopper")
    """folder of dt.py run folders, each with its targets.txt"""
    name: str = "dt_hopper"
    """output file stem"""
    out: Path = Path("benchmark/results")
    """output folder"""


def read_targets(path: Path) -> tuple[str, list]:
    """The dataset and the (target, mean return) pairs of one run's targets.txt."""
    found = [m for m in map(LINE.search, path.read_text().splitlines()) if m]
    if not found:
        raise SystemExit(f"dt_targets.py: error: {path} holds no 'target return T, return R' line; write it with "
                         "python dt.py --checkpoint RUN/dt.pt --target-returns ... > RUN/targets.txt")
    return found[0]["dataset"], [(float(m["target"]), float(m["ret"])) for m in found]


def best_return(dataset_id: str) -> float | None:
    """The dataset's best episode return, or None where it cannot be loaded here."""
    try:
        import minari

        return max(float(np.sum(ep.rewards)) for ep in minari.load_dataset(dataset_id).iterate_episodes())
    except Exception:
        return None


def main(args: Args):
    runs = []
    for path in sorted(args.logdir.glob("*/targets.txt")):
        dataset, curve = read_targets(path)
        runs.append({"dataset": dataset, "script": "dt.py", "curve": curve, "metric": "return"})
    if not runs:
        raise SystemExit(f"dt_targets.py: error: no */targets.txt under {args.logdir}")
    rows = ["| dataset | target return | return (mean +- std over seeds) | seeds |", "|---|---|---|---|"]
    lines = {}
    for dataset in sorted({r["dataset"] for r in runs}):
        curves = [dict(r["curve"]) for r in runs if r["dataset"] == dataset]
        for target in sorted(set.intersection(*[set(c) for c in curves])):
            values = np.array([c[target] for c in curves])
            rows.append(f"| {dataset} | {target:g} | {values.mean():.1f} +- {values.std():.1f} | {len(values)} |")
        if (best := best_return(dataset)) is not None:
            lines[dataset] = (best, f"the dataset's best episode return ({best:.0f})")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}_targets.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    if plot_curves(runs, args.out / f"{args.name}_targets.png", xlabel="target return", ylabel="return", lines=lines,
                   diagonal="return = target"):
        print(f"wrote {args.out / f'{args.name}_targets.png'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
