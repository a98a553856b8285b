"""benchmark/report.py on a tiny hand-made log folder: the table's rows, the final score's averaging, the CSV."""

import csv
import json
import sys

from conftest import ROOT
from torch.utils.tensorboard import SummaryWriter

sys.path.insert(0, str(ROOT / "benchmark"))
import report  # noqa: E402


def fake_run(logdir, script, seed, scores):
    with SummaryWriter(logdir / f"test-hopper-v0__{script}__{seed}__1700000000") as w:
        for i, score in enumerate(scores):
            w.add_scalar("eval/normalized_score", score, (i + 1) * 100)
            w.add_scalar("charts/updates_per_second", 50.0 + seed, (i + 1) * 100)
            w.add_scalar("charts/peak_memory_mb", 100.0 * seed, (i + 1) * 100)


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
