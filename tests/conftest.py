"""Small real Minari datasets, built once per test session under a temporary MINARI_DATASETS_PATH.

They are collected by stepping the real environments with a random policy and written with
minari.create_dataset_from_buffers (which, unlike DataCollector, needs no jax). A fresh clone has no access to the
project's shared datasets or to the dataset hub, so the tests make their own.
"""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOPPER_ID = "test/hopper/random-v0"
PENDULUM_ID = "test/pendulum/random-v0"
CARTPOLE_ID = "test/cartpole/random-v0"
# D4RL's hopper reference returns, so normalized scores exist for the Hopper dataset.
HOPPER_REF = (-20.272305, 3234.3)


def collect(env_id: str, num_steps: int, seed: int, cut_at: int):
    """Random-policy episodes of `env_id`. An episode ends at a termination, at the environment's time limit, or
    when `cut_at` steps are reached (recorded as a truncation, like a dataset whose collection stopped mid-episode)."""
    from minari.data_collector import EpisodeBuffer

    env = gym.make(env_id)
    env.action_space.seed(seed)
    episodes, steps = [], 0
    while steps < num_steps:
        obs, _ = env.reset(seed=seed + len(episodes))
        o, a, r, term, trunc = [obs], [], [], [], []
        while True:
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            truncated = truncated or len(a) + 1 >= cut_at
            o.append(obs), a.append(action), r.append(float(reward)), term.append(terminated), trunc.append(truncated)
            if terminated or truncated:
                break
        episodes.append(EpisodeBuffer(id=len(episodes), observations=o, actions=a, rewards=r, terminations=term,
                                      truncations=trunc))
        steps += len(a)
    return env, episodes


@pytest.fixture(scope="session")
def minari_root(tmp_path_factory):
    """Builds the three datasets once and points MINARI_DATASETS_PATH at them for this process and subprocesses."""
    root = tmp_path_factory.mktemp("minari")
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    import minari

    def create(dataset_id, env, episodes, **ref_scores):
        minari.create_dataset_from_buffers(dataset_id, episodes, env=env, eval_env=env.spec, algorithm_name="random",
                                           author="tests", author_email="tests@localhost", description="test data",
                                           code_permalink="tests/conftest.py", **ref_scores)

    env, eps = collect("Hopper-v5", 3000, seed=0, cut_at=60)  # random Hopper falls: terminations and truncations
    create(HOPPER_ID, env, eps, ref_min_score=HOPPER_REF[0], ref_max_score=HOPPER_REF[1])
    create(PENDULUM_ID, *collect("Pendulum-v1", 1000, seed=0, cut_at=10**9))  # 200-step time limit: truncations only
    create(CARTPOLE_ID, *collect("CartPole-v1", 300, seed=0, cut_at=10**9))
    yield root
    if old is None:
        os.environ.pop("MINARI_DATASETS_PATH", None)
    else:
        os.environ["MINARI_DATASETS_PATH"] = old


def run_script(script: str, *args: str, cwd: Path, timeout: int = 300, env: dict | None = None):
    """Runs a repo script the way a user does: its own process, from an arbitrary working directory."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
