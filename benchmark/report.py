"""Score table from training logs: per script and dataset, the final normalized score (mean of the last 3
evaluations) as mean +- std over seeds, the per-seed values, updates per second, wall time and peak memory.

    python benchmark/report.py --logdir benchmark/logs --name hopper_local

Reads every run folder under --logdir (TensorBoard logs named {dataset}__{exp_name}__{seed}__{time}, as the scripts
write them) and every peer result under --logdir/peers/*.json, and writes benchmark/results/{name}.md and .csv, and
{name}_curves.png: score against gradient steps, one panel per dataset, one line per script (the mean over seeds) with
a band from the lowest to the highest seed. Without matplotlib it writes the tables and says it skipped the curves.

Fine-tuning runs (`--online-steps`, read from a run's logged hyperparameters; a peer's `offline_steps`) get a table of
their own, {name}_finetune.md: per script and dataset, over seeds, the score at the switch (the last evaluation at or
before it), the dip (the lowest score in the first 10% of the online phase), the scores at 25%, 50% and 100% of it and
the gain from the switch to the end (n/a both for a run from scratch, `--total-steps 0`); and {name}_online.png, score
against online steps with the offline phase before 0.

A run stopped and resumed (`--resume`) holds one event file per session; they read as one curve (a resumed session
drops what the earlier one logged after the checkpoint's step), and its wall time is the sum of the sessions' own spans,
without the time between them.
"""

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader


@dataclass
class Args:
    logdir: Path = Path("benchmark/logs")
    """folder of run folders (and peers/*.json)"""
    name: str = "results"
    """output file stem"""
    out: Path = Path("benchmark/results")
    """output folder"""
    last: int = 3
    """evaluations averaged into a run's final score"""
    curves: bool = True
    """also draw {name}_curves.png (needs matplotlib: pip install -r benchmark/requirements.txt; without it the tables
    are written and the curves skipped, with a note)"""


def wall_minutes(run_dir: Path) -> float:
    """Minutes from the first to the last scalar of each event file, summed over the files: a resumed run writes one
    file per session, and the time between a stop and the resumption is not the run's."""
    seconds = 0.0
    for path in sorted(run_dir.glob("events.out.tfevents.*")):
        times = [e.wall_time for e in EventFileLoader(str(path)).Load()
                 if any(v.HasField("simple_value") or v.metadata.plugin_data.plugin_name == "scalars"
                        for v in e.summary.value)]
        seconds += max(times) - min(times) if times else 0.0
    return seconds / 60


def read_run(run_dir: Path, last: int) -> dict:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    dataset, exp_name, seed, _ = run_dir.name.split("__")
    score_tag = "eval/normalized_score" if "eval/normalized_score" in tags else "eval/return"
    evals = acc.Scalars(score_tag)
    text = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode() if "hyperparameters/" \
        "text_summary" in acc.Tags()["tensors"] else ""
    hyper = dict(line.strip("|").split("|", 1) for line in text.splitlines() if line.count("|") == 3)
    return {
        "script": exp_name, "dataset": dataset, "seed": int(seed), "metric": score_tag.split("/")[1],
        "final": float(np.mean([e.value for e in evals[-last:]])), "steps": evals[-1].step,
        "updates_per_second": float(np.median([e.value for e in acc.Scalars("charts/updates_per_second")])),
        "peak_memory_mb": max(e.value for e in acc.Scalars("charts/peak_memory_mb")),
        "wall_minutes": wall_minutes(run_dir),
        "curve": [(e.step, e.value) for e in evals],
        "offline_steps": int(hyper["total_steps"]) if hyper.get("online_steps", "0") != "0" else None,
    }


def read_peer(path: Path, last: int) -> dict:
    result = json.loads(path.read_text())
    history = result["history"]
    return {
        "script": result["name"], "dataset": result["dataset_id"].replace("/", "-"),
        "seed": result["seed"], "metric": "normalized_score",
        "final": float(np.mean([h["score"] for h in history[-last:]])), "steps": history[-1]["step"],
        "updates_per_second": history[-1]["updates_per_second"], "peak_memory_mb": float("nan"),
        "wall_minutes": float("nan"),
        "curve": [(h["step"], h["score"]) for h in history],
        "offline_steps": result.get("offline_steps") if "finetune" in result["name"] else None,
    }


def finetune_row(run: dict) -> dict:
    """One fine-tuning run's figures: the score at the switch, the dip in the first 10% of the online phase, the
    scores at 25%, 50% and 100% of it (the first evaluation at or past each point) and the gain from the switch to the
    end. A run from scratch (--total-steps 0) has no evaluation before its online phase: no switch, no gain (nan)."""
    switch, curve = run["offline_steps"], sorted(run["curve"])
    online = curve[-1][0] - switch
    before = [v for s, v in curve if s <= switch]
    at = lambda frac: next(v for s, v in curve if s >= switch + frac * online)  # noqa: E731
    score_at_switch = before[-1] if before else float("nan")
    return {"switch": score_at_switch,
            "dip": min([v for s, v in curve if switch < s <= switch + 0.1 * online] or [float("nan")]),
            "25%": at(0.25), "50%": at(0.5), "100%": at(1.0), "gain": at(1.0) - score_at_switch,
            "online_steps": online}


def finetune_table(runs: list) -> list:
    lines = ["| dataset | script | online steps | at the switch | dip (first 10%) | 25% | 50% | 100% | gain | seeds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in (r for r in runs if r["offline_steps"] is not None and r["curve"][-1][0] > r["offline_steps"]):
        groups.setdefault((r["dataset"], r["script"]), []).append(finetune_row(r))
    for (dataset, script), rows in sorted(groups.items()):
        cell = lambda k: "n/a" if np.isnan([r[k] for r in rows]).all() else (  # noqa: E731
            f"{np.mean([r[k] for r in rows]):.1f} +- {np.std([r[k] for r in rows]):.1f}")
        lines.append(f"| {dataset} | {script} | {min(r['online_steps'] for r in rows)} | {cell('switch')} | "
                     f"{cell('dip')} | {cell('25%')} | {cell('50%')} | {cell('100%')} | {cell('gain')} | "
                     f"{len(rows)} |")
    return lines if len(lines) > 2 else []


def plot_curves(runs: list, path: Path, xlabel: str = "gradient steps", ylabel: str | None = None,
                lines: dict | None = None, diagonal: str | None = None) -> bool:
    """One panel per dataset; per script the mean over seeds at each evaluation step, shaded from min to max seed;
    lines maps a dataset to a (value, label) drawn dashed across its panel; diagonal, if given, labels a dotted y = x
    line. Returns False, drawing nothing, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # a script keeps its colour in every panel
    colors = {s: palette[i % len(palette)] for i, s in enumerate(sorted({r["script"] for r in runs}))}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        scripts = sorted({r["script"] for r in runs if r["dataset"] == dataset})
        for script in scripts:
            group = [r for r in runs if r["dataset"] == dataset and r["script"] == script]
            curves = [dict(r["curve"]) for r in group]
            steps = sorted(set.intersection(*[set(c) for c in curves]))
            values = np.array([[c[s] for s in steps] for c in curves])
            ax.plot(steps, values.mean(0), color=colors[script],
                    label=f"{script} ({len(group)} seed{'s' * (len(group) > 1)})")
            ax.fill_between(steps, values.min(0), values.max(0), color=colors[script], alpha=0.2)
        if dataset in (lines or {}):
            ax.axhline(lines[dataset][0], color="k", ls="--", label=lines[dataset][1])
        if diagonal:
            ax.axline((0, 0), slope=1, color="gray", ls=":", label=diagonal)
        metric = {r["metric"] for r in runs if r["dataset"] == dataset}
        ax.set(title=dataset, xlabel=xlabel, ylabel=ylabel or ("normalized score" if metric == {"normalized_score"}
                                                                else "return"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(args: Args):
    runs = [read_run(d, args.last) for d in sorted(args.logdir.iterdir()) if d.is_dir() and d.name.count("__") == 3]
    runs += [read_peer(p, args.last) for p in sorted((args.logdir / "peers").glob("*.json"))]
    if not runs:
        raise SystemExit(f"no runs under {args.logdir}")
    args.out.mkdir(parents=True, exist_ok=True)
    fields = [k for k in runs[0] if k != "curve"]
    with open(args.out / f"{args.name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(runs, key=lambda r: (r["dataset"], r["script"], r["seed"])))
    lines = ["| dataset | script | steps | final score (mean +- std) | per seed | updates/s | wall (min) | peak MB |",
             "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["script"], r["steps"]), []).append(r)
    for (dataset, script, steps), group in sorted(groups.items()):
        group.sort(key=lambda r: r["seed"])
        finals = [r["final"] for r in group]
        per_seed = ", ".join(f"{r['final']:.1f}" for r in group)
        wall = np.mean([r["wall_minutes"] for r in group])
        memory = max(r["peak_memory_mb"] for r in group)
        lines.append(f"| {dataset} | {script} | {steps} | {np.mean(finals):.1f} +- {np.std(finals):.1f} | {per_seed} | "
                     f"{np.mean([r['updates_per_second'] for r in group]):.0f} | "
                     f"{'n/a' if np.isnan(wall) else f'{wall:.0f}'} | "
                     f"{'n/a' if np.isnan(memory) else f'{memory:.0f}'} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    finetune = finetune_table(runs)
    if finetune:
        (args.out / f"{args.name}_finetune.md").write_text("\n".join(finetune) + "\n")
        print("\n".join(finetune))
    if args.curves and finetune:
        shifted = [{**r, "curve": [(s - r["offline_steps"], v) for s, v in r["curve"]]} for r in runs
                   if r["offline_steps"] is not None]
        if plot_curves(shifted, args.out / f"{args.name}_online.png", "environment steps online (offline before 0)"):
            print(f"wrote {args.out / f'{args.name}_online.png'}")
    if args.curves:
        png = args.out / f"{args.name}_curves.png"
        print(f"wrote {png}" if plot_curves(runs, png) else f"skipped {png.name}: the curves need matplotlib (pip "
              "install -r benchmark/requirements.txt); the tables are written (--no-curves skips the curves quietly)")


if __name__ == "__main__":
    main(tyro.cli(Args))
