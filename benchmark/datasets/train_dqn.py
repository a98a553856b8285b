"""How the behaviour material of the discrete datasets was made: Double DQN trained online, its Q network saved every
--save-every environment steps with the score of its behaviour policy, and every transition it saw.

    python benchmark/datasets/train_dqn.py --env-id LunarLander-v3 --steps 200000 --out /tmp/dqn_lunarlander

The files in benchmark/datasets/{lunarlander,cartpole}/ are the checkpoints and replay prefix picked from such a run
(their README says which); make_datasets.py only reads them, so a fresh clone rebuilds the datasets without this
training. The settings are RL Baselines3 Zoo's tuned DQN for LunarLander (256-256 MLP, Adam 6.3e-4, batch 128, one
update per environment step from the first, a hard target copy every 250 updates, epsilon from 1 to 0.1 over the
first 12% of the steps) with Double DQN's target and a buffer that keeps every transition.

The behaviour policy of a checkpoint is epsilon-greedy in its Q with --behaviour-epsilon (0.1): make_datasets.py acts
the same way, so the scores logged here are the datasets' behaviour scores.
"""

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro


@dataclass
class Args:
    env_id: str = "LunarLander-v3"
    steps: int = 200_000
    """environment steps"""
    seed: int = 0
    out: str = "dqn_run"
    save_every: int = 10_000
    """environment steps between checkpoints (each scored over --eval-episodes behaviour episodes)"""
    eval_episodes: int = 20
    behaviour_epsilon: float = 0.1
    lr: float = 6.3e-4
    batch_size: int = 128
    target_every: int = 250
    """updates between hard target copies"""
    explore_fraction: float = 0.12
    final_epsilon: float = 0.1
    discount: float = 0.99


def q_network(obs_dim: int, n_actions: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, n_actions))


def behaviour_returns(q: nn.Module, env_id: str, episodes: int, epsilon: float, seed: int) -> np.ndarray:
    env, rng, returns = gym.make(env_id), np.random.default_rng(seed), []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        total, done = 0.0, False
        while not done:
            if rng.random() < epsilon:
                action = int(rng.integers(env.action_space.n))
            else:
                with torch.no_grad():
                    action = int(q(torch.as_tensor(obs, dtype=torch.float32)).argmax())
            obs, reward, terminated, truncated, _ = env.step(action)
            total += reward
            done = terminated or truncated
        returns.append(total)
    return np.array(returns)


def main(args: Args):
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env, rng = gym.make(args.env_id), np.random.default_rng(args.seed)
    obs_dim, n = env.observation_space.shape[0], env.action_space.n
    q, target = q_network(obs_dim, n), q_network(obs_dim, n)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=args.lr)
    buf = {"obs": np.zeros((args.steps, obs_dim), np.float32), "nobs": np.zeros((args.steps, obs_dim), np.float32),
           "act": np.zeros(args.steps, np.int64), "rew": np.zeros(args.steps, np.float32),
           "term": np.zeros(args.steps, bool), "trunc": np.zeros(args.steps, bool)}
    log = csv.writer(open(out / "log.csv", "w", newline=""))
    log.writerow(["step", "mean_return", "std_return"])
    obs, _ = env.reset(seed=args.seed)
    updates, start, episode_return, recent = 0, time.monotonic(), 0.0, []
    for t in range(args.steps):
        epsilon = max(args.final_epsilon, 1 - (1 - args.final_epsilon) * t / (args.explore_fraction * args.steps))
        if rng.random() < epsilon:
            action = int(rng.integers(n))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs)).argmax())
        next_obs, reward, terminated, truncated, _ = env.step(action)
        for key, value in zip(buf, (obs, next_obs, action, reward, terminated, truncated)):
            buf[key][t] = value
        episode_return += reward
        obs = next_obs
        if terminated or truncated:
            recent = (recent + [episode_return])[-20:]
            obs, episode_return = env.reset()[0], 0.0
        if t + 1 >= args.batch_size:
            i = torch.as_tensor(rng.integers(t + 1, size=args.batch_size))
            o, no = torch.as_tensor(buf["obs"])[i], torch.as_tensor(buf["nobs"])[i]
            a, r = torch.as_tensor(buf["act"])[i], torch.as_tensor(buf["rew"])[i]
            done = torch.as_tensor(buf["term"])[i].float()
            with torch.no_grad():  # Double DQN: the online net picks, the target net evaluates
                y = r + args.discount * (1 - done) * target(no).gather(1, q(no).argmax(1, keepdim=True)).squeeze(1)
            loss = F.smooth_l1_loss(q(o).gather(1, a[:, None]).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            updates += 1
            if updates % args.target_every == 0:
                target.load_state_dict(q.state_dict())
        if (t + 1) % args.save_every == 0:
            torch.save(q.state_dict(), out / f"q_{t + 1}.pt")
            returns = behaviour_returns(q, args.env_id, args.eval_episodes, args.behaviour_epsilon, 10**6 + t)
            log.writerow([t + 1, f"{returns.mean():.2f}", f"{returns.std():.2f}"])
            print(f"step {t + 1}: behaviour return {returns.mean():.1f} +- {returns.std():.1f}, training episodes "
                  f"{np.mean(recent):.1f}, {(t + 1) / (time.monotonic() - start):.0f} steps/s", flush=True)
    np.savez_compressed(out / "replay.npz", **buf)


if __name__ == "__main__":
    main(tyro.cli(Args))
