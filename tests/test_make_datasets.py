"""benchmark/make_datasets.py at a tiny size: every stage says what it does and, with the count interval at zero, how
far along it is; a dataset already there is kept."""

import re
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


def test_a_discrete_task_stores_its_reference_scores(tmp_path, monkeypatch, capsys):
    """CartPole's random and medium-replay datasets from the shipped DQN material: integer actions in a Discrete(2)
    space, the random policy's and the expert's mean returns as reference scores, and a random dataset that scores
    about 0 against them (its episodes are the random policy's)."""
    import gymnasium as gym
    import minari
    import numpy as np

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    make_datasets.main(make_datasets.Args(task="cartpole", datasets=("random", "medium-replay"), steps=3000))
    out = capsys.readouterr().out
    for name in ("random", "medium-replay"):
        dataset = minari.load_dataset(f"local/cartpole/{name}-v0")
        meta = dataset.storage.metadata
        assert (meta["ref_min_score"], meta["ref_max_score"]) == make_datasets.DISCRETE["cartpole"]["ref"]
        assert dataset.spec.action_space == gym.spaces.Discrete(2)
        episode = next(dataset.iterate_episodes())
        assert episode.actions.dtype.kind == "i" and len(episode.observations) == len(episode.actions) + 1
    assert minari.load_dataset("local/cartpole/random-v0").total_steps == 3000
    assert minari.load_dataset("local/cartpole/medium-replay-v0").total_steps == 10_000  # the shipped replay prefix
    score = float(re.search(r"random-v0: 3000 transitions, \d+ episodes, mean episode score (\S+)", out).group(1))
    assert abs(score) < 5, out
    returns = [float(np.sum(ep.rewards)) for ep in minari.load_dataset("local/cartpole/medium-replay-v0")
               .iterate_episodes()]
    assert max(returns) > 100 > min(returns)  # the replay holds random warm-up and the learning policy's episodes
