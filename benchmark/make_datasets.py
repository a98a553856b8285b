"""Rebuild the four local Hopper-v5 datasets that the benchmark results use, with D4RL's recipe, from the behaviour
material in benchmark/datasets/hopper/ (two SAC actor checkpoints and SAC's replay buffer; see its README):

    python benchmark/make_datasets.py                       # all four, under MINARI_DATASETS_PATH
    MINARI_DATASETS_PATH=~/minari python benchmark/make_datasets.py --datasets medium-replay

- local/hopper/medium-v0: 200,000 steps of the medium actor (after 100,000 SAC steps) acting stochastically in
  Hopper-v5, episode k reset with seed k; collection stops at exactly 200,000 steps, so the last episode ends in
  a truncation.
- local/hopper/expert-v0: the same with the expert actor (after 390,000 SAC steps), episode k reset with seed
  100000 + k.
- local/hopper/medium-replay-v0: SAC's first 100,000 transitions, split into episodes at every termination or time
  limit; the unfinished last one ends in a truncation. Rebuilt exactly.
- local/hopper/medium-expert-v0: medium and expert combined (minari.combine_datasets).

Every dataset carries D4RL's hopper reference scores (-20.272305, 3234.3), so the scripts log D4RL-style normalized
scores, and Hopper-v5 as its evaluation environment. Written with minari.create_dataset_from_buffers, which needs no
jax. A dataset that already exists is left as it is (delete its folder to rebuild it). At the end the mean normalized
episode score of each dataset is printed: medium 38.4, medium-replay 7.9, expert 85.7, medium-expert 53.4 in the
collection the results were made with. medium-replay is rebuilt exactly; the rollout datasets depend on the policies'
noise (--seed) and move by about a point from machine to machine: the default seed gave 37.9, 85.5 and 52.9 on one
CPU and 38.2, 86.5 and 53.3 on another, and seeds 0-5 scattered over 37.7-39.3 (medium), 81.2-86.9 (expert: a few
early falls move it) and 52.0-54.3 (medium-expert) on one machine.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
from minari.data_collector import EpisodeBuffer

HERE = Path(__file__).resolve().parent / "datasets" / "hopper"
REF_MIN, REF_MAX = -20.272305, 3234.3  # D4RL's hopper constants
NAMES = ("medium", "medium-replay", "expert", "medium-expert")


@dataclass
class Args:
    datasets: tuple[str, ...] = NAMES
    """which datasets to build: medium, medium-replay, expert, medium-expert"""
    seed: int = 5
    """seed of the behaviour policies' action noise (the recipe seeds the resets); 5 lands closest to the collection
    the results were made with (seeds 0-5 gave expert 81.2-86.9, medium 37.7-39.3, medium-expert 52.0-54.3)"""
    steps: int = 200_000
    """environment steps of each rollout dataset (medium, expert)"""


def behaviour_policy(path: Path):
    """The SAC actor of the checkpoint: tanh(mean + std * eps), sampled, in Hopper's [-1, 1] action box."""
    net = nn.Sequential(nn.Linear(11, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 6))
    net.load_state_dict({k.removeprefix("net."): v for k, v in torch.load(path, weights_only=True).items()})
    return net


def rollouts(actor_file: str, first_seed: int, steps: int, seed: int) -> list:
    env, actor = gym.make("Hopper-v5"), behaviour_policy(HERE / actor_file)
    noise = torch.Generator().manual_seed(seed)
    episodes, total = [], 0
    while total < steps:
        obs, _ = env.reset(seed=first_seed + len(episodes))
        o, a, r, term, trunc = [obs], [], [], [], []
        while True:
            with torch.no_grad():
                mean, log_std = actor(torch.as_tensor(obs, dtype=torch.float32)).chunk(2, -1)
                action = torch.tanh(mean + log_std.clamp(-20, 2).exp() * torch.randn(3, generator=noise)).numpy()
            obs, reward, terminated, truncated, _ = env.step(action)
            total += 1
            truncated = truncated or total == steps  # the collection's end cuts the last episode
            o.append(obs), a.append(action), r.append(reward), term.append(terminated), trunc.append(truncated)
            if terminated or truncated:
                break
        episodes.append(EpisodeBuffer(id=len(episodes), observations=o, actions=a, rewards=r, terminations=term,
                                      truncations=trunc))
    return episodes


def replay_episodes() -> list:
    """SAC's replay buffer in order, cut at every termination or time limit; each episode's observations are its
    steps' observations followed by the next-observation of its last step."""
    z = dict(np.load(HERE / "replay.npz"))  # read each array once: indexing the archive decompresses it again
    ends = np.flatnonzero(z["term"] | z["trunc"]).tolist()
    if not ends or ends[-1] != len(z["rew"]) - 1:
        ends.append(len(z["rew"]) - 1)  # the unfinished last episode
    episodes, start = [], 0
    for end in ends:
        steps = slice(start, end + 1)
        trunc = z["trunc"][steps].copy()
        trunc[-1] = not z["term"][end]  # an episode that did not terminate ends in a truncation
        obs = np.concatenate([z["obs"][steps], z["nobs"][end:end + 1]]).astype(np.float64)  # Hopper-v5's dtype
        episodes.append(EpisodeBuffer(id=len(episodes), observations=list(obs),
                                      actions=list(z["act"][steps]), rewards=list(z["rew"][steps].astype(np.float64)),
                                      terminations=list(z["term"][steps]), truncations=list(trunc)))
        start = end + 1
    return episodes


def describe(name: str) -> dict:
    what = {"medium": ("SAC checkpoint 100000, stochastic", "a stochastic SAC policy stopped at about a third of "
                       "expert return, 200,000 steps"),
            "expert": ("SAC checkpoint 390000, stochastic", "a stochastic SAC policy trained to expert return, "
                       "200,000 steps"),
            "medium-replay": ("SAC replay buffer up to step 100000", "every transition SAC saw while training up to "
                              "the medium policy, random warm-up included"),
            "medium-expert": ("medium + expert", "the medium and expert datasets combined")}[name]
    return {"algorithm_name": what[0], "description": f"Hopper-v5 {name}, D4RL's recipe: {what[1]}. Reference scores "
            "are D4RL's hopper constants.", "author": {"offline-rl reference scripts"},
            "author_email": {"none@example.com"}, "code_permalink": "benchmark/make_datasets.py"}


def mean_score(dataset: minari.MinariDataset) -> float:
    returns = [float(np.sum(ep.rewards)) for ep in dataset.iterate_episodes()]
    return 100 * (np.mean(returns) - REF_MIN) / (REF_MAX - REF_MIN)


def main(args: Args):
    unknown = set(args.datasets) - set(NAMES)
    if unknown:
        raise SystemExit(f"make_datasets.py: error: unknown dataset(s) {sorted(unknown)}; choose from {NAMES}")
    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    local = minari.list_local_datasets()
    spec = gym.spec("Hopper-v5")
    # medium-expert is made from the other two, so they come first when it is asked for.
    order = [n for n in NAMES if n in args.datasets or (n in ("medium", "expert") and "medium-expert" in args.datasets)]
    for name in order:
        dataset_id = f"local/hopper/{name}-v0"
        if dataset_id in local:
            print(f"{dataset_id}: already under {root}, kept as it is")
            continue
        if name == "medium-expert":
            parts = [minari.load_dataset(f"local/hopper/{n}-v0") for n in ("medium", "expert")]
            combined = minari.combine_datasets(parts, dataset_id)
            # Combining keeps the environment but drops the reference scores and the evaluation environment.
            combined.storage.update_metadata({"ref_min_score": REF_MIN, "ref_max_score": REF_MAX,
                                              "num_episodes_average_score": 100, "eval_env_spec": spec.to_json(),
                                              **describe(name)})
        else:
            episodes = (replay_episodes() if name == "medium-replay" else
                        rollouts("actor_100000.pt" if name == "medium" else "actor_390000.pt",
                                 0 if name == "medium" else 100_000, args.steps, args.seed))
            minari.create_dataset_from_buffers(dataset_id, episodes, env=spec, eval_env=spec, ref_min_score=REF_MIN,
                                               ref_max_score=REF_MAX, **describe(name))
        print(f"{dataset_id}: built under {root}")
    for name in order:
        dataset_id = f"local/hopper/{name}-v0"
        ds = minari.load_dataset(dataset_id)
        print(f"{dataset_id}: {ds.total_steps} transitions, {ds.total_episodes} episodes, mean episode score "
              f"{mean_score(ds):.1f}")


if __name__ == "__main__":
    main(tyro.cli(Args))
