"""benchmark/make_datasets.py at a tiny size: every stage says what it does and, with the count interval at zero, how
far along it is; a dataset already there is kept."""

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import make_datasets  # noqa: E402


def test_every_stage_reports_its_progress(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    monkeypatch.setattr(make_datasets, "EVERY", 0.0)  # every count line, not one every few seconds
    make_datasets.main(make_datasets.Args(datasets=("medium-expert",), steps=300))
    out = capsys.readouterr().out
    for stage in ("medium-v0: loading the behaviour policy actor_100000.pt",
                  "medium-v0: collecting episodes: step 150/300 (50%)", "medium-v0: collected 300 steps",
                  "expert-v0: writing: episode 1/", "medium-expert-v0: combining medium and expert (600 steps)",
                  "medium-expert-v0: reading it back: episode 1/", "medium-expert-v0: 600 transitions"):
        assert stage in out, stage
    assert "medium-replay" not in out  # only what medium-expert is made of
    assert (tmp_path / "local" / "hopper" / "medium-expert-v0").is_dir()
    make_datasets.main(make_datasets.Args(datasets=("medium",), steps=300))
    again = capsys.readouterr().out
    assert "local/hopper/medium-v0: already under" in again and "collecting" not in again
