"""The overestimation figure of docs/cql_discrete.md: offline Double DQN (cql_discrete.py --cql-alpha 0) against CQL,
the Q the target takes (values/q_target_action, max over the policy's actions at s') against gradient steps, beside
what the data's own returns are worth: the mean discounted return-to-go of the dataset's transitions (gamma 0.99), the
behaviour's value on the states Q is trained on.

    python benchmark/overestimation.py --logdir sweeps/discrete/runs --name lunarlander_discrete
"""

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import minari
import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Args:
    logdir: Path = Path("benchmark/logs/lunarlander_discrete")
    name: str = "lunarlander_discrete"
    out: Path = Path("benchmark/results")
    discount: float = 0.99
    variants: tuple[str, ...] = ("cql_discrete_dqn", "cql_discrete")


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
    runs = {}
    for run in sorted(p for p in args.logdir.iterdir() if p.is_dir() and p.name.count("__") == 3):
        dataset, variant, _, _ = run.name.split("__")
        if variant in args.variants:
            acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
            acc.Reload()
            runs.setdefault(dataset, {}).setdefault(variant, []).append(acc.Scalars("values/q_target_action"))
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, (dataset, variants) in zip(axes[0], sorted(runs.items())):
        for variant, curves in sorted(variants.items()):
            steps = [e.step for e in curves[0]]
            values = np.array([[e.value for e in c][:len(steps)] for c in curves])
            label = {"cql_discrete_dqn": "offline Double DQN (alpha 0)", "cql_discrete": "CQL (alpha 1)"}.get(variant)
            line, = ax.plot(steps, values.mean(0), label=f"{label or variant}, {len(curves)} seeds")
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
        dataset_id = dataset.replace("-", "/", 2)
        ax.axhline(data_value(dataset_id, args.discount), color="k", ls="--",
                   label="the data's discounted return-to-go")
        ax.set(title=dataset_id, xlabel="gradient steps", ylabel="Q of the action the target takes")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / f"{args.name}_overestimation.png", dpi=110)
    print(f"wrote {args.out / f'{args.name}_overestimation.png'}")


if __name__ == "__main__":
    main(tyro.cli(Args))
