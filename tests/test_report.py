"""benchmark/report.py on tiny hand-made log folders: the table's rows, the final score's averaging, the CSV, a resumed
run's curve and wall time, and the tables without matplotlib; benchmark/dt_targets.py on hand-made targets.txt files."""

import csv
import json
import sys

import pytest
from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "benchmark"))
import report  # noqa: E402


def fake_run(logdir, script, seed, scores, steps=None, hyper=None):
    """scores logged at steps (default 100, 200, ...); hyper: rows of the logged hyperparameters table."""
    with SummaryWriter(logdir / f"test-hopper-v0__{script}__{seed}__1700000000") as w:
        if hyper:
            w.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "".join(f"|{k}|{v}|\n" for k, v in hyper.items()))
        for step, score in zip(steps or range(100, 100 * len(scores) + 1, 100), scores):
            w.add_scalar("eval/normalized_score", score, step)
            w.add_scalar("charts/updates_per_second", 50.0 + seed, step)
            w.add_scalar("charts/peak_memory_mb", 100.0 * seed, step)


def test_report_averages_the_last_three_evaluations_per_seed(tmp_path):
    logs = tmp_path / "logs"
    fake_run(logs, "iql", 1, [0.0, 10.0, 20.0, 30.0])  # final: mean(10, 20, 30) = 20
    fake_run(logs, "iql", 2, [0.0, 40.0, 40.0, 40.0])  # final: 40
    fake_run(logs, "iql_bc", 1, [5.0, 5.0, 5.0, 5.0])
    (logs / "peers").mkdir()
    history = [{"step": s, "score": v, "updates_per_second": 30.0} for s, v in ((100, 1.0), (200, 2.0), (300, 3.0),
                                                                               (400, 4.0))]
    (logs / "peers" / "p.json").write_text(json.dumps({"name": "d3rlpy_iql", "dataset_id": "test/hopper-v0",
                                                       "seed": 1, "history": history}))
    report.main(report.Args(logdir=logs, name="t", out=tmp_path / "out", curves=False))  # the image: test_run.py
    table = (tmp_path / "out" / "t.md").read_text().splitlines()
    rows = {line.split(" | ")[1]: line for line in table[2:]}
    assert set(rows) == {"iql", "iql_bc", "d3rlpy_iql"}
    assert "| 30.0 +- 10.0 | 20.0, 40.0 |" in rows["iql"]
    assert "| 3.0 +- 0.0 | 3.0 |" in rows["d3rlpy_iql"]
    with open(tmp_path / "out" / "t.csv") as f:
        assert len(list(csv.DictReader(f))) == 4


def test_a_resumed_run_reads_as_one_curve_and_its_wall_time_skips_the_gap(tmp_path):
    """Two sessions in one run folder, as --resume leaves them: the first logged steps 100-400 from t=1000 s (its
    checkpoint was at 300), the second, hours later, continues after the checkpoint with purge_step=301."""
    run_dir = tmp_path / "logs" / "test-hopper-v0__iql__1__1700000000"
    sessions = ((None, {100: 1.0, 200: 2.0, 300: 3.0, 400: 4.0}, 1000.0),  # 3 minutes of logs
                (301, {400: 40.0, 500: 50.0, 600: 60.0}, 9000.0))  # 2 minutes of logs
    for purge_step, scores, start in sessions:
        with SummaryWriter(run_dir, purge_step=purge_step) as w:
            for i, (step, score) in enumerate(scores.items()):
                for tag, value in (("eval/normalized_score", score), ("charts/updates_per_second", 50.0),
                                   ("charts/peak_memory_mb", 100.0)):
                    w.add_scalar(tag, value, step, walltime=start + 60.0 * i)
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2
    run = report.read_run(run_dir, last=3)
    assert run["curve"] == [(100, 1.0), (200, 2.0), (300, 3.0), (400, 40.0), (500, 50.0), (600, 60.0)]
    assert run["final"] == 50.0 and run["steps"] == 600
    assert abs(run["wall_minutes"] - 5.0) < 1e-6  # 3 + 2, not the two hours from the first log to the last


def test_without_matplotlib_the_tables_are_written_and_the_curves_skipped(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "logs", "iql", 1, [1.0, 2.0, 3.0])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    report.main(report.Args(logdir=tmp_path / "logs", name="t", out=tmp_path / "out"))  # returns: exit code 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["t.csv", "t.md"]
    assert "skipped t_curves.png: the curves need matplotlib" in capsys.readouterr().out


def test_fine_tuning_runs_get_the_switch_the_dip_and_the_gain(tmp_path):
    """Two seeds of a run with 400 offline and 1000 online steps (evaluations every 100): the score at the switch is the
    one logged at step 400, the dip the lowest within 100 steps after it, 25/50/100% the first evaluations at or past
    650, 900 and 1400; a run from scratch (total_steps 0) has no switch and no gain; an offline run adds no row."""
    logs = tmp_path / "logs"
    for seed, dip in ((1, 10.0), (2, 20.0)):
        marks = {400: 50.0, 500: dip, 700: 60.0, 900: 70.0, 1400: 90.0}
        scores = [marks.get(step, 55.0) for step in range(100, 1401, 100)]
        fake_run(logs, "iql_ft", seed, scores, hyper={"total_steps": 400, "online_steps": 1000})
    fake_run(logs, "sac", 1, [2.0, 5.0, 3.0, 8.0, 9.0], steps=[40, 100, 200, 300, 400],
             hyper={"total_steps": 0, "online_steps": 400})
    fake_run(logs, "iql", 1, [0.0, 10.0, 20.0, 30.0])
    report.main(report.Args(logdir=logs, name="t", out=tmp_path / "out", curves=False))
    rows = (tmp_path / "out" / "t_finetune.md").read_text().splitlines()[2:]
    assert rows == ["| test-hopper-v0 | iql_ft | 1000 | 50.0 +- 0.0 | 15.0 +- 5.0 | 60.0 +- 0.0 | 70.0 +- 0.0 | "
                    "90.0 +- 0.0 | 40.0 +- 0.0 | 2 |",
                    "| test-hopper-v0 | sac | 400 | n/a | 2.0 +- 0.0 | 5.0 +- 0.0 | 3.0 +- 0.0 | 9.0 +- 0.0 | n/a | "
                    "1 |"]


def test_dt_targets_averages_each_target_over_seeds(tmp_path):
    import dt_targets

    line = ("runs/r/dt.pt (trained on local/x/y-v0), evaluated in Hopper-v5: 10 episodes, target return {t:g}, "
            "return {r:.1f} +- 3.0, normalized score 1.0")
    for seed, returns in ((1, (100.0, 300.0)), (2, (200.0, 500.0))):
        (tmp_path / f"run{seed}").mkdir()
        (tmp_path / f"run{seed}" / "targets.txt").write_text(
            "target returns: 500 1800\n" + "\n".join(line.format(t=t, r=r) for t, r in zip((500, 1800), returns)))
    dt_targets.main(dt_targets.Args(logdir=tmp_path, name="t", out=tmp_path / "out"))
    table = (tmp_path / "out" / "t_targets.md").read_text()
    assert "| local/x/y-v0 | 500 | 150.0 +- 50.0 | 2 |" in table
    assert "| local/x/y-v0 | 1800 | 400.0 +- 100.0 | 2 |" in table
    (tmp_path / "run1" / "targets.txt").write_text("no evaluation here\n")
    with pytest.raises(SystemExit, match="no 'target return T, return R' line"):
        dt_targets.main(dt_targets.Args(logdir=tmp_path, name="t", out=tmp_path / "out"))
