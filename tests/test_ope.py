"""benchmark/ope.py's metrics, DOPE's (Fu et al. 2021), on hand-computed cases."""

import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import ope  # noqa: E402

TRUE = np.array([10.0, 20.0, 30.0, 50.0])  # rescaled: 0, 0.25, 0.5, 1


def test_a_perfect_estimate_has_no_error_full_rank_correlation_and_no_regret():
    assert ope.metrics(TRUE, TRUE.copy()) == (0.0, pytest.approx(1.0), 0.0)


def test_a_shifted_estimate_keeps_its_ranking_but_pays_in_error():
    error, spearman, regret = ope.metrics(TRUE, TRUE + 8.0)  # +8 is 0.2 on the rescaled axis
    assert error == pytest.approx(0.2) and spearman == pytest.approx(1.0) and regret == 0.0


def test_a_reversed_ranking_picks_the_worst_policy():
    error, spearman, regret = ope.metrics(TRUE, -TRUE)
    assert spearman == pytest.approx(-1.0) and regret == 1.0  # its top pick is the worst policy
    # Rescaled estimates (-v - 10) / 40 are -0.5, -0.75, -1, -1.5 against 0, 0.25, 0.5, 1.
    assert error == pytest.approx(np.mean([0.5, 1.0, 1.5, 2.5]))


def test_overestimates_are_clipped_at_twice_the_range_and_ties_share_the_regret():
    error, _, _ = ope.metrics(TRUE, np.array([10.0, 20.0, 30.0, 1e6]))
    assert error == pytest.approx((2.0 - 1.0) / 4)  # 1e6 counts as 2 on the rescaled axis
    error, spearman, regret = ope.metrics(TRUE, np.full(4, 25.0))  # a constant: every policy tied at the top
    assert np.isnan(spearman) and regret == pytest.approx(1 - np.mean([0, 0.25, 0.5, 1]))


def test_ranks_average_ties_as_spearman_needs():
    np.testing.assert_array_equal(ope.ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_bootstrap_interval_brackets_the_point_estimate():
    rng = np.random.default_rng(1)
    true = rng.normal(size=30) * 10
    estimate = true + rng.normal(size=30) * 3
    point = ope.metrics(true, estimate)
    low, high = ope.bootstrap(true, estimate, resamples=300)
    assert np.all(low <= np.array(point) + 1e-9) and np.all(np.array(point) <= high + 1e-9)
    assert high[1] - low[1] < 0.5 and low[1] > 0.5  # a good estimator's rank correlation, tightly


def test_a_constant_estimate_has_no_rank_interval_and_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "All-NaN slice" on the constant's Spearman was one
        low, high = ope.bootstrap(TRUE, np.full(4, 25.0), resamples=50)
    assert np.isnan(low[1]) and np.isnan(high[1]) and np.all(np.isfinite(low[[0, 2]]))


def test_report_writes_into_out_and_is_titled_from_its_datasets(tmp_path, monkeypatch):
    """Hand-made truth and estimates for two tiny datasets: report writes into --out unless --results says where, and
    names the datasets it read; the published results in benchmark/results are left alone."""
    pytest.importorskip("matplotlib", reason="the figure needs pip install -r benchmark/requirements.txt")
    monkeypatch.setattr(ope, "RUNS", [("cql", "cql_continuous.py", [], 2000, [1000, 2000]),
                                      ("awr", "awr.py", [], 2000, [1000, 2000])])
    datasets = ("test/a/one-v0", "test/b/two-v0")
    for i, dataset_id in enumerate(datasets):
        snapshots = tmp_path / "out" / ope.slug(dataset_id) / "snapshots"
        snapshots.mkdir(parents=True)
        (snapshots.parent / "dataset.json").write_text(json.dumps({"value": 50.0}))
        for j, path in enumerate(ope.policy_set(dataset_id, tmp_path / "out")):
            true = 10.0 * (j + 1) + i
            path.with_suffix(".truth.json").write_text(json.dumps({
                "true": true, "true_se": 1.0, "return": 100.0, "score": None, "algorithm": path.stem.split("_")[0],
                "critic": None if path.stem.startswith("awr") else 2 * true, "step": int(path.stem.split("_")[1])}))
            path.with_name(f"{path.stem}.fqe.json").write_text(json.dumps({"estimate": true + 1, "low": true - 5,
                                                                          "high": true + 5, "curve": []}))
    published = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmark" / "results").glob("ope*")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ope.report(ope.Args(step="report", out=tmp_path / "out", datasets=datasets))
    page = (tmp_path / "out" / "ope.md").read_text()
    assert page.startswith("# Off-policy evaluation on test/a/one-v0 and test/b/two-v0\n")
    assert "| the dataset's mean return | " in page and "n/a (one value for all)" in page
    assert (tmp_path / "out" / "ope.csv").exists() and (tmp_path / "out" / "ope_critics.png").exists()
    assert {p: p.stat().st_mtime_ns for p in (ROOT / "benchmark" / "results").glob("ope*")} == published

    ope.report(ope.Args(step="report", out=tmp_path / "out", datasets=datasets[:1], results=tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "ope.md").read_text().startswith("# Off-policy evaluation on test/a/one-v0\n")


def test_a_cut_policies_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    """The training script is faked: each poll writes its next checkpoint (every 1000 steps). A run cut at step 1500,
    with its 1000-step snapshot copied, continues with --resume from its folder and its earlier log; one cut before
    a snapshot was copied, or before its first checkpoint, starts over from step 0."""
    import torch

    monkeypatch.setattr(ope, "RUNS", [("toy", "iql.py", ["--tau", "0.01"], 3000, [1000, 3000])])
    calls = []

    class FakeScript:
        def __init__(self, argv, cwd, **kwargs):
            calls.append(argv[2:])
            resume = argv.index("--resume") + 1 if "--resume" in argv else None
            self.folder = Path(cwd) / (argv[resume] if resume else "runs/test-toy-v0__toy__1__2")
            self.folder.mkdir(parents=True, exist_ok=True)
            saved = self.folder / "toy.pt"
            self.step = torch.load(saved)["loop"]["step"] if resume else 0
            self.returncode = None

        def poll(self):
            if self.step < 3000:
                self.step = (self.step // 1000 + 1) * 1000
                torch.save({"loop": {"step": self.step}}, self.folder / "toy.pt")
                return None
            self.returncode = 0
            return 0

    monkeypatch.setattr(ope.subprocess, "Popen", FakeScript)
    monkeypatch.setattr(ope.time, "sleep", lambda seconds: None)  # the copier's wait between two looks
    cases = {"cut after snapshot 1000": (1500, [1000]), "cut before snapshot 1000 was copied": (1500, []),
             "cut before its first checkpoint": (None, [])}
    for case, (cut_at, copied) in cases.items():
        out, calls[:] = tmp_path / case.replace(" ", "_"), []
        folder = out / "test-toy-v0"
        run = folder / "work" / "toy" / "runs" / "test-toy-v0__toy__1__1"
        run.mkdir(parents=True)
        (folder / "work" / "toy" / "log.txt").write_text("the first session's output\n")
        if cut_at:
            torch.save({"loop": {"step": cut_at}}, run / "toy.pt")
        (folder / "snapshots").mkdir()
        for step in copied:
            torch.save({"loop": {"step": step}}, folder / "snapshots" / f"toy_{step}.pt")
        message = ope.train_with_snapshots("toy", "iql.py", ["--tau", "0.01"], 3000, "test/toy-v0", out, 0.99)
        steps = {torch.load(p)["loop"]["step"] for p in (folder / "snapshots").glob("toy_*.pt")}
        assert {1000, 2000, 3000} <= steps, case
        log = (folder / "work" / "toy" / "log.txt").read_text()
        if case == "cut after snapshot 1000":
            assert calls == [["--resume", "runs/test-toy-v0__toy__1__1"]] and "resumed at step 1500" in message
            assert log.startswith("the first session's output\nope.py: resuming at step 1500")
        else:
            assert calls[0][:2] == ["--dataset-id", "test/toy-v0"] and "--tau" in calls[0], case
            assert "resumed" not in message and log == "" and not run.exists(), case
