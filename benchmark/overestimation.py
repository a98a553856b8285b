"""The overestimation figure of docs/cql_discrete.md: offline Double DQN (cql_discrete.py --cql-alpha 0) against CQL,
the Q the target takes (values/q_target_action, max over the policy's actions at s') against gradient steps, beside
what the data's own returns are worth: the mean discounted return-to-go of the dataset's transitions (gamma 0.99), the
behaviour's value on the states Q is trained on. Drawn by report.py's plot_curves.

    python benchmark/overestimation.py --logdir sweeps/discrete/runs --name lunarlander_discrete
"""

from dataclasses import dataclass
from pathlib import Path

import minari
import numpy as np
import tyro
from report import plot_curves
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

LABELS = {"cql_discrete_dqn": "offline Double DQN (alpha 0)", "cql_discrete": "CQL (alpha 1)"}


@dataclass
class Args:
    logdir: Path = Path("benchmark/logs/lunarlander_discrete")
    """folder of run folders, as report.py reads them"""
    name: str = "lunarlander_discrete"
    """the figure is {out}/{name}_overestimation.png"""
    out: Path = Path("benchmark/results")
    discount: float = 0.99
    """the discount of the data's return-to-go (the scripts' default)"""


def data_value(dataset_id: str, discount: float) -> float:
    """Mean over the dataset's transitions of the discounted return from there to the episode's end."""
    values = []
    for ep in minari.load_dataset(dataset_id).iterate_episodes():
        g, togo = 0.0, np.zeros(len(ep.rewards))
        for t in range(len(ep.rewards) - 1, -1, -1):
            g = ep.rewards[t] + discount * g
            togo[t] = g
        values.append(togo)
    return float(np.concatenate(values).mean())


def main(args: Args):
    runs = []
    for run in sorted(p for p in args.logdir.iterdir() if p.is_dir() and p.name.count("__") == 3):
        dataset, variant, _, _ = run.name.split("__")
        if variant in LABELS:
            acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
            acc.Reload()
            runs.append({"dataset": dataset, "script": LABELS[variant], "metric": "q",
                         "curve": [(e.step, e.value) for e in acc.Scalars("values/q_target_action")]})
    lines = {d: (data_value(d.replace("-", "/", 2), args.discount), "the data's discounted return-to-go")
             for d in {r["dataset"] for r in runs}}
    png = args.out / f"{args.name}_overestimation.png"
    plot_curves(runs, png, ylabel="Q of the action the target takes", lines=lines)
    print(f"wrote {png}")


if __name__ == "__main__":
    main(tyro.cli(Args))
