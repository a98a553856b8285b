"""Rebuild the four local Hopper-v5 datasets that the benchmark results use, with D4RL's recipe, from the behaviour
material in benchmark/datasets/hopper/ (two SAC actor checkpoints and SAC's replay buffer; see its README):

    python benchmark/make_datasets.py                       # all four, under MINARI_DATASETS_PATH
    MINARI_DATASETS_PATH=~/minari python benchmark/make_datasets.py --datasets medium-replay

`--datasets medium-replay` alone copies stored transitions and takes seconds: enough for a first run. The rollout
datasets step MuJoCo 400,000 times (a few minutes on one core, more on a busy machine); every stage prints its
progress as it goes. `--task cartpole` and `--task lunarlander` (which needs gymnasium[box2d]) build discrete
datasets (random, medium, medium-replay, expert) the same way, from a Double DQN's material in
benchmark/datasets/<task>/ (see its README), in under a minute.

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
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import tyro
from minari.data_collector import EpisodeBuffer

DATASETS = Path(__file__).resolve().parent / "datasets"
HERE = DATASETS / "hopper"
REF_MIN, REF_MAX = -20.272305, 3234.3  # D4RL's hopper constants
NAMES = ("medium", "medium-replay", "expert", "medium-expert")
# The discrete tasks: the behaviour is epsilon-greedy (EPSILON) in a Double DQN's Q, saved at two points of its
# training (benchmark/datasets/train_dqn.py; the files and how they were picked: datasets/<task>/README.md). The
# reference scores, stored in every dataset, are the mean returns of the uniform random policy (random) and of the
# expert Q acting greedily, 100 episodes each: the normalized score is 0 for random play and 100 for the expert.
EPSILON = 0.1
DISCRETE_NAMES = ("random", "medium", "medium-replay", "expert")
DISCRETE = {"lunarlander": {"env": "LunarLander-v3", "medium": "q_medium.pt", "expert": "q_expert.pt", "steps": 100_000,
                            "ref": (-191.74, 198.50), "names": DISCRETE_NAMES, "replay": "the DQN's"},
            "cartpole": {"env": "CartPole-v1", "medium": "q_medium.pt", "expert": "q_expert.pt", "steps": 50_000,
                         "ref": (21.13, 500.0), "names": DISCRETE_NAMES, "replay": "the DQN's"}}
# Every task: its environment, the behaviour files of its datasets, the steps of a rollout dataset, the reference
# scores, the datasets it has; episode k of a rollout dataset is reset with seed FIRST_SEED[name] + k.
TASKS = {"hopper": {"env": "Hopper-v5", "medium": "actor_100000.pt", "expert": "actor_390000.pt", "steps": 200_000,
                    "ref": (REF_MIN, REF_MAX), "names": NAMES, "replay": "SAC's"}, **DISCRETE}
FIRST_SEED = {"medium": 0, "expert": 100_000, "random": 200_000}


@dataclass
class Args:
    task: str = "hopper"
    """hopper (Hopper-v5, D4RL's recipe), or a discrete task: lunarlander (LunarLander-v3, needs gymnasium[box2d]) or
    cartpole (CartPole-v1)"""
    datasets: tuple[str, ...] | None = None
    """default: all of the task's. hopper: medium, medium-replay, expert, medium-expert (medium-replay alone takes
    seconds: enough for a first run); discrete tasks: random, medium, medium-replay, expert"""
    seed: int = 5
    """seed of the behaviour policies' action noise (the recipe seeds the resets); 5 is closest to the results' data"""
    steps: int | None = None
    """environment steps of each rollout dataset (hopper 200,000; lunarlander 100,000; cartpole 50,000)"""


# ---- progress: a full build runs for minutes, so each stage says what it does and how far it is -------------------
EVERY = 3.0  # seconds between two lines of a running count
shown = {"at": 0.0, "width": 0}  # when the last line was printed; on a terminal, the width of a count line to overwrite


def say(line: str, count: bool = False):
    """Prints a progress line at once. A running count (count=True) comes at most every EVERY seconds; on a terminal
    it rewrites itself in place, and the next line overwrites it, so that a log file gets every line and a terminal
    only the current one."""
    now = time.monotonic()
    if count and now - shown["at"] < EVERY:
        return
    tty = sys.stdout.isatty()
    pad = " " * max(0, shown["width"] - len(line))
    print(("\r" if shown["width"] else "") + line + pad, end="" if count and tty else "\n", flush=True)
    shown.update(at=now, width=len(line) if count and tty else 0)


@contextmanager
def ticking(line: str):
    """For a minari call that reports nothing while it works: the line, then the seconds spent, every EVERY seconds."""
    say(line)
    start, done = time.monotonic(), threading.Event()

    def tick():
        while not done.wait(EVERY):
            say(f"{line}: {time.monotonic() - start:.0f} s", count=True)

    thread = threading.Thread(target=tick, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def writing(dataset_id: str, episodes: list):
    """The episodes, handed to minari one at a time with a running count: create_dataset_from_buffers writes each one
    as it takes it from the iterable (the data written are the same as from the list)."""
    steps = sum(len(ep.rewards) for ep in episodes)
    say(f"{dataset_id}: writing {len(episodes):,} episodes ({steps:,} steps)")
    for i, episode in enumerate(episodes):
        yield episode
        say(f"{dataset_id}: writing: episode {i + 1:,}/{len(episodes):,}", count=True)


def behaviour_policy(path: Path):
    """The SAC actor of the checkpoint: tanh(mean + std * eps), sampled, in Hopper's [-1, 1] action box."""
    net = nn.Sequential(nn.Linear(11, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 6))
    net.load_state_dict({k.removeprefix("net."): v for k, v in torch.load(path, weights_only=True).items()})
    return net


def q_policy(path: Path, env: gym.Env, noise: torch.Generator):
    """Epsilon-greedy in the saved Q (train_dqn.py's network), or the uniform random policy where path is None."""
    n = int(env.action_space.n)
    net = nn.Sequential(nn.Linear(env.observation_space.shape[0], 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                        nn.Linear(256, n))
    if path is not None:
        net.load_state_dict(torch.load(path, weights_only=True))
    epsilon = EPSILON if path is not None else 1.0

    def act(obs):
        explore, uniform = torch.rand(1, generator=noise).item(), torch.randint(n, (1,), generator=noise).item()
        with torch.no_grad():
            return uniform if explore < epsilon else int(net(torch.as_tensor(obs, dtype=torch.float32)).argmax())
    return act


def rollouts(dataset_id: str, actor_file: str, first_seed: int, steps: int, seed: int, task: str = "hopper") -> list:
    env_id = TASKS[task]["env"]
    say(f"{dataset_id}: loading the behaviour policy {actor_file or 'uniform random'} and {env_id}")
    env, noise = gym.make(env_id), torch.Generator().manual_seed(seed)
    if task in DISCRETE:
        policy = q_policy(actor_file and DATASETS / task / actor_file, env, noise)
    else:
        actor = behaviour_policy(HERE / actor_file)

        def policy(obs):
            with torch.no_grad():
                mean, log_std = actor(torch.as_tensor(obs, dtype=torch.float32)).chunk(2, -1)
                return torch.tanh(mean + log_std.clamp(-20, 2).exp() * torch.randn(3, generator=noise)).numpy()
    episodes, total, start = [], 0, time.monotonic()
    say(f"{dataset_id}: collecting episodes: {steps:,} steps")
    while total < steps:
        obs, _ = env.reset(seed=first_seed + len(episodes))
        o, a, r, term, trunc = [obs], [], [], [], []
        while True:
            action = policy(obs)
            obs, reward, terminated, truncated, _ = env.step(action)
            total += 1
            truncated = truncated or total == steps  # the collection's end cuts the last episode
            o.append(obs), a.append(action), r.append(reward), term.append(terminated), trunc.append(truncated)
            if terminated or truncated:
                break
            rate = total / max(time.monotonic() - start, 1e-9)
            say(f"{dataset_id}: collecting episodes: step {total:,}/{steps:,} ({100 * total / steps:.0f}%), "
                f"{len(episodes)} episodes done, {rate:.0f} steps/s, {(steps - total) / rate:.0f} s left", count=True)
        episodes.append(EpisodeBuffer(id=len(episodes), observations=o, actions=a, rewards=r, terminations=term,
                                      truncations=trunc))
    say(f"{dataset_id}: collected {total:,} steps, {len(episodes)} episodes, in {time.monotonic() - start:.0f} s")
    return episodes


def replay_episodes(task: str = "hopper") -> list:
    """The behaviour's replay buffer in order (SAC's, or the DQN's), cut at every termination or time limit; each
    episode's observations are its steps' observations followed by the next-observation of its last step."""
    z = dict(np.load(DATASETS / task / "replay.npz"))  # read each array once: indexing the archive decompresses it
    dtype = gym.make(TASKS[task]["env"]).observation_space.dtype
    ends = np.flatnonzero(z["term"] | z["trunc"]).tolist()
    if not ends or ends[-1] != len(z["rew"]) - 1:
        ends.append(len(z["rew"]) - 1)  # the unfinished last episode
    episodes, start = [], 0
    for end in ends:
        steps = slice(start, end + 1)
        trunc = z["trunc"][steps].copy()
        trunc[-1] = not z["term"][end]  # an episode that did not terminate ends in a truncation
        obs = np.concatenate([z["obs"][steps], z["nobs"][end:end + 1]]).astype(dtype)  # the environment's
        episodes.append(EpisodeBuffer(id=len(episodes), observations=list(obs),
                                      actions=list(z["act"][steps]), rewards=list(z["rew"][steps].astype(np.float64)),
                                      terminations=list(z["term"][steps]), truncations=list(trunc)))
        start = end + 1
    return episodes


def describe(name: str, task: str = "hopper") -> dict:
    if task in DISCRETE:
        what = {"random": "the uniform random policy", "medium": "a Double DQN stopped at a middling return, "
                f"epsilon-greedy ({EPSILON})", "expert": f"the Double DQN trained to expert return, epsilon-greedy "
                f"({EPSILON})", "medium-replay": "every transition the Double DQN saw up to the medium policy"}[name]
        return {"algorithm_name": name, "description": f"{DISCRETE[task]['env']} {name}: {what}. Reference scores are "
                "the random policy's and the greedy expert's mean returns.", "author": {"offline-rl reference scripts"},
                "author_email": {"none@example.com"}, "code_permalink": "benchmark/make_datasets.py"}
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


def summary(dataset_id: str) -> str:
    """The dataset as read back: its size and mean normalized episode score."""
    dataset = minari.load_dataset(dataset_id)
    low, high = dataset.storage.metadata["ref_min_score"], dataset.storage.metadata["ref_max_score"]
    returns = []
    for ep in dataset.iterate_episodes():
        returns.append(float(np.sum(ep.rewards)))
        say(f"{dataset_id}: reading it back: episode {len(returns):,}/{dataset.total_episodes:,}", count=True)
    score = 100 * (np.mean(returns) - low) / (high - low)
    return (f"{dataset_id}: {dataset.total_steps} transitions, {dataset.total_episodes} episodes, mean episode score "
            f"{score:.1f} (mean return {np.mean(returns):.1f})")


def main(args: Args):
    if args.task not in TASKS:
        raise SystemExit(f"make_datasets.py: error: unknown task '{args.task}'; choose from {', '.join(TASKS)}")
    task = TASKS[args.task]
    datasets = args.datasets or task["names"]
    unknown = set(datasets) - set(task["names"])
    if unknown:
        raise SystemExit(f"make_datasets.py: error: unknown dataset(s) {sorted(unknown)}; choose from {task['names']}")
    try:
        gym.make(task["env"])
    except Exception as e:  # Hopper without MuJoCo, LunarLander without Box2D
        raise SystemExit(f"make_datasets.py: error: cannot make {task['env']} ({type(e).__name__}: {e}); Hopper "
                         "needs `pip install gymnasium[mujoco]`, LunarLander `pip install gymnasium[box2d]`")
    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    local = minari.list_local_datasets()
    spec = gym.spec(task["env"])
    # medium-expert is made from the other two, so they come first when it is asked for.
    order = [n for n in task["names"] if n in datasets or (n in ("medium", "expert") and "medium-expert" in datasets)]
    for name in order:
        dataset_id = f"local/{args.task}/{name}-v0"
        if dataset_id in local:
            say(f"{dataset_id}: already under {root}, kept as it is")
            continue
        start = time.monotonic()
        if name == "medium-expert":
            parts = [minari.load_dataset(f"local/{args.task}/{n}-v0") for n in ("medium", "expert")]
            with ticking(f"{dataset_id}: combining medium and expert ({sum(p.total_steps for p in parts):,} steps)"):
                combined = minari.combine_datasets(parts, dataset_id)
            # Combining keeps the environment but drops the reference scores and the evaluation environment.
            combined.storage.update_metadata({"ref_min_score": task["ref"][0], "ref_max_score": task["ref"][1],
                                              "num_episodes_average_score": 100, "eval_env_spec": spec.to_json(),
                                              **describe(name, args.task)})
        else:
            if name == "medium-replay":
                say(f"{dataset_id}: reading {task['replay']} replay buffer, benchmark/datasets/{args.task}/replay.npz")
            episodes = (replay_episodes(args.task) if name == "medium-replay" else
                        rollouts(dataset_id, task.get(name), FIRST_SEED[name], args.steps or task["steps"], args.seed,
                                 args.task))
            minari.create_dataset_from_buffers(dataset_id, writing(dataset_id, episodes), env=spec, eval_env=spec,
                                               ref_min_score=task["ref"][0], ref_max_score=task["ref"][1],
                                               **describe(name, args.task))
        say(f"{dataset_id}: built under {root} in {time.monotonic() - start:.0f} s")
    for name in order:
        say(summary(f"local/{args.task}/{name}-v0"))


if __name__ == "__main__":
    main(tyro.cli(Args))
