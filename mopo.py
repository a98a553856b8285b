"""Model-based Offline Policy Optimization (MOPO): SAC on short rollouts of a learned dynamics model, with rewards
penalized by the model's uncertainty.

Yu, Thomas, Yu, Ermon, Zou, Levine, Finn, Ma (2020), "MOPO: Model-based Offline Policy Optimization",
arXiv:2005.13239. An ensemble of Gaussian dynamics models T(s', r | s, a) is fitted to the dataset. Every
--rollout-freq SAC steps, the current policy is rolled out in the model for h steps from dataset states, and each
model transition's reward is penalized by the ensemble's uncertainty, u(s, a) = max_i ||Sigma_i(s, a)||_F (Eq. 7-8):
    r~(s, a) = r^(s, a) - lambda * u(s, a)
SAC then trains on batches that mix a few real transitions with many model ones (Algorithm 2).
Run: python mopo.py --dataset-id local/hopper/medium-replay-v0 --rollout-length 5 --penalty-coef 2.5
"""

import ctypes
import math
import os
import random
import resource
import signal
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.export.passes import move_to_device_pass
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed for torch, numpy, random and the evaluation episodes"""
    torch_deterministic: bool = True
    """sets `torch.backends.cudnn.deterministic`"""
    cuda: bool = True
    """use CUDA when available"""
    cudagraphs: bool = True
    """on CUDA, capture the training step once in a CUDA graph and replay it (ignored on CPU)"""
    dataset_id: str = "mujoco/hopper/medium-v0"
    """Minari dataset id (local datasets are found under MINARI_DATASETS_PATH)"""
    download: bool = True
    """let Minari download the dataset if it is not found locally"""
    total_steps: int = 1_000_000
    """number of SAC gradient steps"""
    batch_size: int = 256
    """minibatch size"""
    eval_every: int = 5_000
    """gradient steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """gradient steps between loss logs"""
    normalize_states: bool = True
    """z-score observations for the SAC networks (the dynamics model always standardizes its own inputs)"""
    save_model: bool = True
    """save a checkpoint to runs/{run_name}/{exp_name}.pt, and the policy to {exp_name}_policy.pt2, at the end"""
    save_every: int = 50_000
    """gradient steps between checkpoints that --resume continues from (0: only at the end and when stopped)"""
    resume: str | None = None
    """folder runs/<run_name> of a stopped run: continue it exactly where its checkpoint left it, with its arguments"""
    checkpoint: str | None = None
    """path of a saved checkpoint: evaluate it on its own environment and exit, training nothing"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name} (needs moviepy)"""

    # Algorithm specific arguments
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    # The dynamics ensemble
    num_ensemble: int = 7
    """dynamics models in the ensemble"""
    num_elites: int = 5
    """models with the lowest hold-out error, used to sample rollouts"""
    dynamics_hidden_dims: tuple[int, ...] = (200, 200, 200, 200)
    """hidden layer sizes of each dynamics model (swish activations)"""
    dynamics_lr: float = 1e-3
    """learning rate of the dynamics ensemble"""
    dynamics_batch_size: int = 256
    """minibatch size of dynamics training"""
    dynamics_max_epochs: int | None = None
    """cap on dynamics training epochs (None: until 5 epochs pass without 1% hold-out improvement)"""
    dynamics_path: str | None = None
    """load a trained ensemble from this file if it exists, else train one and save it there"""
    # Rollouts
    rollout_freq: int = 1000
    """SAC steps between model rollouts"""
    rollout_batch_size: int = 50_000
    """dataset states each rollout starts from"""
    rollout_length: int = 5
    """model steps per rollout, h (the paper's hopper settings: 5)"""
    penalty_coef: float = 2.5
    """lambda of the uncertainty penalty (hopper-medium-replay: 2.5; 0 turns the penalty off)"""
    model_retain_epochs: int = 5
    """rollouts kept in the model buffer, in units of one rollout"""
    real_ratio: float = 0.05
    """fraction of each SAC batch drawn from the dataset; the rest comes from model rollouts"""
    # SAC
    actor_lr: float = 1e-4
    """policy learning rate (decayed to 0 by a cosine schedule over total_steps, as in OfflineRL-Kit)"""
    critic_lr: float = 3e-4
    """learning rate of the twin Q networks"""
    alpha_lr: float = 3e-4
    """learning rate of SAC's entropy temperature"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of the policy and Q networks"""
    target_entropy: float | None = None
    """SAC's entropy target; None gives -|A|"""


# ---- Data ------------------------------------------------------------------------------------------------------------
def episodes_to_transitions(episodes, observation_space: gym.Space) -> dict:
    """s = obs[:-1] and s' = obs[1:] inside each episode (no pair crosses an episode end); only terminations stop
    bootstrapping (a time-limit truncation is not terminal); dict observations concatenated in the space's key order."""
    parts = {"observations": [], "actions": [], "rewards": [], "next_observations": [], "terminals": []}
    for ep in episodes:
        obs = ep.observations
        if isinstance(observation_space, gym.spaces.Dict):
            obs = np.concatenate([np.asarray(obs[k]).reshape(len(obs[k]), -1) for k in observation_space.spaces], 1)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions).reshape(len(ep.actions), -1))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(np.asarray(ep.terminations))
    return {**{k: np.concatenate(v).astype(np.float32) for k, v in parts.items()},
            "episode_returns": np.array([np.sum(r) for r in parts["rewards"]]),
            "episode_lengths": np.array([len(r) for r in parts["rewards"]])}


def minibatch(table: torch.Tensor, split: list, batch_size: int) -> tuple:
    """Transitions drawn uniformly with replacement on the device; rewards and terminals come out as (batch,)."""
    idx = torch.randint(len(table), (batch_size,), device=table.device)
    obs, actions, rewards, next_obs, terminals, *more = table[idx].split(split, dim=1)  # more: extra columns (--calql)
    return obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1), *(c.squeeze(1) for c in more)


# ---- Networks --------------------------------------------------------------------------------------------------------
class EnsembleDynamics(nn.Module):
    """num_ensemble Gaussian MLPs over [delta s, r] given standardized (s, a), as one network with stacked weights:
    each layer is a single baddbmm over all members. The log-variance is kept between learned bounds by a soft clamp
    (Chua et al. 2018, which MOPO's model follows), so the variance cannot collapse or explode off the data."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_ensemble: int, num_elites: int):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 2 * (obs_dim + 1)]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(num_ensemble, d_in, d_out)
            std = 1 / (2 * math.sqrt(d_in))  # a truncated normal, the official (MBPO) initialization
            nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_ensemble, 1, d_out)))
        self.max_logvar = nn.Parameter(torch.full((1, 1, obs_dim + 1), 0.5))
        self.min_logvar = nn.Parameter(torch.full((1, 1, obs_dim + 1), -10.0))
        # L2 penalty per layer, growing with depth (2.5e-5 ... 1e-4 for the default four hidden layers).
        self.weight_decays = [2.5e-5 * min(i + 1, 3) if i < len(dims) - 2 else 1e-4 for i in range(len(dims) - 1)]
        self.register_buffer("input_mean", torch.zeros(obs_dim + action_dim))
        self.register_buffer("input_std", torch.ones(obs_dim + action_dim))
        self.register_buffer("elites", torch.arange(num_elites))
        self.num_ensemble = num_ensemble

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """obs, actions: (batch, d) shared by all members, or (num_ensemble, batch, d) one batch per member.
        Returns the mean and log-variance of [delta s, r], each (num_ensemble, batch, obs_dim + 1)."""
        x = (torch.cat([obs, actions], dim=-1) - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.expand(self.num_ensemble, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = F.silu(x)  # swish
        mean, logvar = x.chunk(2, dim=-1)
        return mean, soft_clamp_logvar(logvar, self.min_logvar, self.max_logvar)

    def decay_loss(self) -> torch.Tensor:
        return sum(d * 0.5 * w.pow(2).sum() for d, w in zip(self.weight_decays, self.weights))


def soft_clamp_logvar(logvar, min_logvar, max_logvar):
    """A smooth clamp into (min_logvar, max_logvar) that keeps gradients flowing to both bounds."""
    logvar = max_logvar - F.softplus(max_logvar - logvar)
    return min_logvar + F.softplus(logvar - min_logvar)


class TwinQ(nn.Module):
    """Q1 and Q2 as one network with stacked weights: each layer is a single batched operation over both
    members instead of two module calls, which halves the per-op overhead that dominates small networks."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_q: int = 2):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound = 3e-3 if i == len(dims) - 2 else 1 / math.sqrt(d_in)  # nn.Linear's default; rlkit's small output
            self.weights.append(nn.Parameter(torch.empty(num_q, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, d_out).uniform_(-bound, bound)))
        self.num_q = num_q

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """(num_q, batch) values. detach_params: gradients reach the actions, not the weights (the policy's loss)."""
        x = torch.cat([obs, actions], dim=-1).expand(self.num_q, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            w, b = (w.detach(), b.detach()) if detach_params else (w, b)
            if i < len(self.weights) - 1:
                x = torch.relu_(torch.baddbmm(b, x, w))  # in place: baddbmm's backward needs only its inputs
            else:
                # One output unit as a product and a sum: as a matmul, its input gradient is an outer product that a
                # CPU's batched GEMM computes several times slower than this elementwise backward.
                x = (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)
        return x


class TanhGaussianPolicy(nn.Module):
    """SAC's policy: a = tanh(u), u ~ N(mu(s), sigma(s)), log-std clamped to [-5, 2] as in the official code."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims):
        super().__init__()
        layers = [nn.Linear(d_in, d_out) for d_in, d_out in zip([obs_dim, *hidden_dims], hidden_dims)]
        self.trunk = nn.Sequential(*[m for linear in layers for m in (linear, nn.ReLU(inplace=True))])
        self.head = nn.Linear(hidden_dims[-1], 2 * action_dim)  # mean and log-std
        nn.init.uniform_(self.head.weight, -1e-3, 1e-3)
        nn.init.uniform_(self.head.bias, -1e-3, 1e-3)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.head(self.trunk(obs)).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)


# ---- The algorithm: the dynamics ensemble's training and rollouts, then SAC on the mixed data ---------------------
# The model predicts states, not episode ends: rollouts stop where the real task would, judged on the predicted next
# state with the v5 environments' health checks (observations exclude the x position).
def hopper_done(next_obs: torch.Tensor) -> torch.Tensor:
    height, angle = next_obs[:, 0], next_obs[:, 1]
    in_range = torch.isfinite(next_obs).all(-1) & (next_obs[:, 1:].abs() < 100).all(-1)
    return ~(in_range & (height > 0.7) & (angle.abs() < 0.2))


def walker2d_done(next_obs: torch.Tensor) -> torch.Tensor:
    height, angle = next_obs[:, 0], next_obs[:, 1]
    return ~((height > 0.8) & (height < 2.0) & (angle > -1.0) & (angle < 1.0))


def ant_done(next_obs: torch.Tensor) -> torch.Tensor:
    return ~(torch.isfinite(next_obs).all(-1) & (next_obs[:, 0] >= 0.2) & (next_obs[:, 0] <= 1.0))  # the height


def never_done(next_obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)


TERMINATION_FNS = {"Hopper": hopper_done, "Walker2d": walker2d_done, "Ant": ant_done, "HalfCheetah": never_done}


def termination_fn_for(env_id: str) -> Callable:
    name = env_id.split("/")[-1].split("-")[0]
    if name not in TERMINATION_FNS:
        print(f"warning: no termination function for {env_id}; model rollouts run without terminations")
    return TERMINATION_FNS.get(name, never_done)


def dynamics_loss(model: EnsembleDynamics, obs, actions, targets) -> torch.Tensor:
    """Gaussian negative log-likelihood of each member on its own batch (summed over members), plus the term that
    tightens the log-variance bounds and the per-layer weight decay."""
    mean, logvar = model(obs, actions)
    nll = ((mean - targets).pow(2) * torch.exp(-logvar) + logvar).mean((1, 2)).sum()
    return nll + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum()) + model.decay_loss()


def train_dynamics(model: EnsembleDynamics, obs, actions, targets, args: Args, writer) -> torch.Tensor:
    """Fits the ensemble; returns each member's hold-out MSE. A hold-out set of min(20%, 1000) transitions decides
    when to stop (5 epochs without a 1% improvement of any member) and which members are elites; each member keeps
    its best parameters. Every member sees its own bootstrap resample of the training set."""
    n = obs.shape[0]
    holdout = int(min(0.2 * n, 1000))
    perm = torch.randperm(n, device=obs.device)
    train_idx, hold_idx = perm[holdout:], perm[:holdout]
    inputs = torch.cat([obs[train_idx], actions[train_idx]], dim=-1)
    model.input_mean.copy_(inputs.mean(0))
    model.input_std.copy_(inputs.std(0) + 1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=args.dynamics_lr)
    best = torch.full((model.num_ensemble,), float("inf"), device=obs.device)
    saved = [p.detach().clone() for p in model.parameters()]
    epoch, stale, n_train = 0, 0, len(train_idx)
    while True:
        boot = train_idx[torch.randint(n_train, (model.num_ensemble, n_train), device=obs.device)]
        for start in range(0, n_train, args.dynamics_batch_size):
            b = boot[:, start:start + args.dynamics_batch_size]
            loss = dynamics_loss(model, obs[b], actions[b], targets[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            mse = (model(obs[hold_idx], actions[hold_idx])[0] - targets[hold_idx]).pow(2).mean((1, 2))
            improved = mse < 0.99 * best  # a 1% relative improvement (always true against the initial inf)
            best = torch.where(improved, mse, best)
            for p, keep in zip(model.parameters(), saved):
                if p.shape[0] == model.num_ensemble:  # per-member tensors: keep the improved members' weights
                    keep[improved] = p.detach()[improved]
        epoch += 1
        stale = 0 if bool(improved.any()) else stale + 1
        for i, value in enumerate(mse.tolist()):
            writer.add_scalar(f"dynamics/holdout_mse_{i}", value, epoch)
        print(f"dynamics epoch {epoch}: hold-out MSE " + " ".join(f"{v:.4f}" for v in mse.tolist()), flush=True)
        if stale >= 5 or (args.dynamics_max_epochs is not None and epoch >= args.dynamics_max_epochs):
            break
    with torch.no_grad():
        for p, keep in zip(model.parameters(), saved):
            if p.shape[0] == model.num_ensemble:
                p.copy_(keep)
        model.elites.copy_(torch.argsort(best)[: args.num_elites])
    return best


def uncertainty_penalty(logvar: torch.Tensor) -> torch.Tensor:
    """u(s, a) = max over members of the norm of the predicted standard deviation (Eq. 8 with the Frobenius norm of a
    diagonal covariance's square root). logvar: (num_ensemble, batch, d) -> (batch,)."""
    return torch.exp(0.5 * logvar).norm(dim=-1).max(0).values


@torch.no_grad()
def rollout(model: EnsembleDynamics, policy: Callable, start_obs: torch.Tensor, horizon: int, penalty_coef: float,
            done_fn: Callable) -> dict:
    """h steps of the policy in the model from start_obs: next state and reward sampled from a random elite, the reward
    penalized by the whole ensemble's uncertainty, a predicted termination ending the branch; plus statistics."""
    keys = ("observations", "actions", "rewards", "next_observations", "terminals", "penalties", "raw_rewards")
    obs, out = start_obs, {k: [] for k in keys}
    for _ in range(horizon):
        actions = policy(obs)
        mean, logvar = model(obs, actions)
        sample = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        pick = model.elites[torch.randint(len(model.elites), (obs.shape[0],), device=obs.device)]
        chosen = sample[pick, torch.arange(obs.shape[0], device=obs.device)]
        next_obs, reward = obs + chosen[:, :-1], chosen[:, -1]
        penalty = uncertainty_penalty(logvar)
        done = done_fn(next_obs)
        for k, v in zip(keys, (obs, actions, reward - penalty_coef * penalty, next_obs, done.float(), penalty, reward)):
            out[k].append(v)
        obs = next_obs[~done]
        if obs.shape[0] == 0:
            break
    data = {k: torch.cat(v) for k, v in out.items()}
    stats = {"model/penalty_mean": data["penalties"].mean(), "model/penalty_max": data["penalties"].max(),
             "model/reward_mean": data["raw_rewards"].mean(), "model/termination_rate": data["terminals"].mean(),
             "model/rollout_transitions": len(data["rewards"])}
    return {**data, "stats": stats}


class ModelBuffer:
    """A ring buffer of model transitions on the device, in transition_table's layout, holding the last
    model_retain_epochs rollouts' worth. Its fill level is kept on the device too, where a captured step reads it."""

    def __init__(self, capacity: int, width: int, device: torch.device):
        self.table, self.filled = torch.zeros(capacity, width, device=device), torch.zeros((), device=device)
        self.capacity, self.size, self.head = capacity, 0, 0

    def add(self, rows: torch.Tensor):
        rows = rows[-self.capacity:]
        idx = (self.head + torch.arange(len(rows), device=rows.device)) % self.capacity
        self.table[idx] = rows
        self.head = (self.head + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)
        self.filled.fill_(self.size)

    def sample(self, split: list, batch_size: int) -> tuple:
        """A minibatch of the filled rows, as minibatch() draws one from the dataset."""
        idx = (torch.rand(batch_size, dtype=torch.float64, device=self.table.device) * self.filled).long()
        obs, actions, rewards, next_obs, terminals = self.table[idx].split(split, dim=1)
        return obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1)


def sample_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor):
    """Reparameterized samples a = tanh(mean + std * eps) and their log-density under the squashed Gaussian."""
    u = mean + log_std.exp() * torch.randn_like(mean)
    log_prob = (-0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    # log |d tanh(u) / du| = log(1 - tanh(u)^2), written in a form that stays finite for large |u|.
    log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
    return torch.tanh(u), log_prob


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args = args
        self.actor = TanhGaussianPolicy(obs_dim, action_dim, args.hidden_dims)
        self.critic = TwinQ(obs_dim, action_dim, args.hidden_dims)
        self.target_critic = TwinQ(obs_dim, action_dim, args.hidden_dims)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
        self.log_alpha = nn.Parameter(torch.zeros(1))
        self.register_buffer("steps", torch.zeros(()))  # updates so far, counted on the device like everything else
        self.register_buffer("actor_lr", torch.tensor(args.actor_lr))  # a tensor, so a captured step reads its schedule
        self.to(device)
        # fused: one kernel per optimizer (about 8% more updates/s on a CPU); capturable: cuda_graph can capture it.
        adam = {"fused": True, "capturable": device.type == "cuda" and args.cudagraphs}
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=self.actor_lr, **adam)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], args.alpha_lr, capturable=adam["capturable"])
        self.online, self.targets = list(self.critic.parameters()), list(self.target_critic.parameters())

    def update(self, obs, actions, rewards, next_obs, terminals, num_real: int) -> dict:
        """One SAC step on a batch whose first num_real rows are real transitions. Returns detached tensors only."""
        a = self.args
        mean, log_std = self.actor(obs)
        new_actions, log_pi = sample_tanh_gaussian(mean, log_std)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()
        alpha = self.log_alpha.detach().exp()

        with torch.no_grad():
            next_actions, next_log_pi = sample_tanh_gaussian(*self.actor(next_obs))
            next_q = self.target_critic(next_obs, next_actions).min(0).values - alpha * next_log_pi
            q_target = rewards + a.discount * (1.0 - terminals) * next_q
        q = self.critic(obs, actions)
        critic_loss = (q - q_target).pow(2).mean(1).sum()
        # The critic's weights are detached here, so the policy's loss trains the policy alone and one backward pass
        # through both losses gives each network its own gradient.
        actor_loss = (alpha * log_pi - self.critic(obs, new_actions, detach_params=True).min(0).values).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        (actor_loss + critic_loss).backward()
        self.actor_opt.step()
        self.critic_opt.step()
        self.steps += 1  # the actor's learning rate decays on a cosine to 0 at total_steps, as in OfflineRL-Kit
        self.actor_lr.copy_(a.actor_lr * (1 + torch.cos(np.pi * (self.steps / a.total_steps).clamp(max=1))) / 2)
        with torch.no_grad():
            torch._foreach_lerp_(self.targets, self.online, a.tau)
        q = q.detach().mean(0)
        return {
            "losses/critic_loss": critic_loss.detach(),
            "losses/actor_loss": actor_loss.detach(),
            "losses/alpha_loss": alpha_loss.detach(),
            "losses/alpha": alpha.squeeze(),
            "values/q_real": q[:num_real].mean() if num_real else torch.zeros(()),
            "values/q_model": q[num_real:].mean() if num_real < len(q) else torch.zeros(()),
            "values/entropy": -log_pi.detach().mean(),
            "charts/actor_lr": self.actor_lr,
        }

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Evaluation acts with the mean action, tanh(mu)."""
        return torch.tanh(self.actor(obs)[0])


# ---- Evaluation ------------------------------------------------------------------------------------------------------
def make_eval_envs(task: dict, n: int, video_folder: str | None) -> list:
    """n copies of the task's evaluation environment, time limit included; the first records video when asked to."""
    spec = gym.envs.registration.EnvSpec.from_json(task["env_spec"])
    if spec.max_episode_steps is None and n:
        print(f"note: {spec.id} has no time limit in its spec; evaluation episodes end after 1000 steps")
    try:
        envs = [gym.make(spec, render_mode="rgb_array" if video_folder and i == 0 else None) for i in range(n)]
        if video_folder and n:
            import moviepy  # noqa: F401  (RecordVideo checks it only after making its folder)
            envs[0].reset(seed=0)
            envs[0].render()  # a missing renderer (pygame, OpenGL) fails here, not at the first evaluation's end
            envs[0] = gym.wrappers.RecordVideo(envs[0], video_folder, episode_trigger=lambda _: True)
    except Exception as e:
        fail(f"could not create {spec.id} for evaluation ({type(e).__name__}: {str(e).splitlines()[0]}); MuJoCo needs "
             "`pip install gymnasium[mujoco]`, --capture-video needs moviepy and, without a display, MUJOCO_GL=egl")
    return [gym.wrappers.FlattenObservation(e) if isinstance(e.observation_space, gym.spaces.Dict) else e for e in envs]


@torch.no_grad()
def evaluate(policy, envs: list, task: dict, seed: int, discount: float = 1.0) -> np.ndarray:
    """One episode per environment, stepped together: one policy call (standardized observations to actions in [-1, 1])
    per time step for the unfinished ones. Episode i starts from reset(seed=seed + i) and ends at the time limit.
    Returns each episode's return, discounted when a discount is given (fqe.py's ground truth)."""
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, running, low, high = np.zeros(len(envs)), list(range(len(envs))), task["action_low"], task["action_high"]
    for t in range(gym.envs.registration.EnvSpec.from_json(task["env_spec"]).max_episode_steps or 1000):
        x = torch.as_tensor(np.stack([obs[i] for i in running]), dtype=torch.float32, device=low.device)
        actions = policy((x - task["obs_mean"]) / task["obs_std"])
        for i, action in zip(list(running), (low + (actions + 1.0) * 0.5 * (high - low)).cpu().numpy()):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            returns[i] += float(reward) * discount**t
            if terminated or truncated:
                running.remove(i)
        if not running:
            break
    if isinstance(envs[0], gym.wrappers.RecordVideo) and envs[0].recording:  # gymnasium writes a video at the next
        envs[0].stop_recording()  # reset or at close: the last evaluation's would be lost
    return returns


def normalized_score(returns: np.ndarray, task: dict) -> float | None:
    """minari.get_normalized_score's formula, times 100; None when the dataset has no reference scores."""
    if task["ref_min_score"] is None or task["ref_max_score"] is None:
        return None
    return float(100.0 * (np.mean(returns) - task["ref_min_score"]) / (task["ref_max_score"] - task["ref_min_score"]))


# ---- Harness: loading, user errors, checkpoints, CUDA graphs; not the algorithm, the same text in every script ---
def fail(message: str):
    """A user's mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args, rules: dict):
    """Refuses impossible arguments before anything loads. rules maps a message to its condition; a script's own win."""
    for name in ("total_steps", "batch_size", "eval_every", "log_every"):
        rules.setdefault(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}", getattr(args, name) > 0)
    rules[f"--eval-episodes must be >= 0, got {args.eval_episodes}"] = args.eval_episodes >= 0
    rules[f"--hidden-dims needs positive sizes, got {args.hidden_dims}"] = min(args.hidden_dims, default=0) > 0
    for message in (message for message, ok in rules.items() if not ok):
        fail(message)  # the first rule broken


def load_minari(dataset_id: str, download: bool) -> minari.MinariDataset:
    """minari.load_dataset; its errors, and spaces these policies cannot handle, become one line saying what to do."""
    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    if not dataset_id.rpartition("-v")[2].isdigit():
        fail(f"'{dataset_id}' is not a dataset id: ids end in -v and a version, as in 'mujoco/hopper/medium-v0'")
    download = download and not dataset_id.startswith("local/")  # built on this machine: the hub has none of these
    try:
        dataset = minari.load_dataset(dataset_id, download=download)
    except Exception as e:  # unknown ids, network errors, unreadable files
        why = "not found locally" if isinstance(e, FileNotFoundError) and not download else \
            f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        fail(f"could not load dataset '{dataset_id}' ({why}); MINARI_DATASETS_PATH={root} holds: "
             f"{', '.join(sorted(minari.list_local_datasets())) or 'none'}. Offline, --no-download uses local data; "
             "`python benchmark/make_datasets.py` builds local/hopper/*, its `--datasets medium-replay` in seconds")
    obs_space, space = dataset.spec.observation_space, dataset.spec.action_space
    if not isinstance(space, gym.spaces.Box):
        fail(f"{Args.exp_name}.py needs Box actions, '{dataset_id}' has {space}: try bcq_discrete.py, cql_discrete.py")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        fail(f"the action space is unbounded; {Args.exp_name}.py rescales actions to [-1, 1] and needs finite bounds")
    if not all(isinstance(s, gym.spaces.Box) and len(s.shape) == 1 for s in
               (obs_space.spaces.values() if isinstance(obs_space, gym.spaces.Dict) else [obs_space])):
        fail(f"observations must be a flat Box vector (or a dict of them, concatenated); got {obs_space}")
    return dataset


def load_data(args: Args, device: torch.device) -> tuple[dict, dict]:
    """The transitions (numpy), actions rescaled from the Box bounds to [-1, 1], and the task: all that evaluation needs
    besides the policy (env spec with time limit, observation statistics, action bounds, reference scores)."""
    dataset = load_minari(args.dataset_id, args.download)
    data = episodes_to_transitions(dataset.iterate_episodes(), dataset.spec.observation_space)
    low, high = dataset.spec.action_space.low.astype(np.float32), dataset.spec.action_space.high.astype(np.float32)
    data["actions"] = 2.0 * (data["actions"] - low) / (high - low) - 1.0
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    if not args.normalize_states:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    meta, stats = dataset.storage.metadata, {"obs_mean": mean, "obs_std": std, "action_low": low, "action_high": high}
    task = {"dataset_id": args.dataset_id, "env_spec": meta.get("eval_env_spec") or meta.get("env_spec"),
            "ref_min_score": meta.get("ref_min_score"), "ref_max_score": meta.get("ref_max_score"),
            **{k: torch.as_tensor(v, device=device) for k, v in stats.items()}}
    on = f"cpu{' (no GPU found)' * args.cuda}, threads: {torch.get_num_threads()}" if device.type == "cpu" else device
    print(f"loaded {args.dataset_id}: {len(data['rewards'])} transitions, {dataset.total_episodes} episodes; runs on "
          f"{on}" + ("" if task["ref_min_score"] is not None and task["ref_max_score"] is not None else "; it has no "
                     "reference scores (official mujoco/* datasets carry none): returns are raw, not normalized"))
    return data, task


def transition_table(data: dict, task: dict, standardize: bool = True) -> tuple[torch.Tensor, list]:
    """All transitions as one (N, row) tensor on the device (a minibatch is one gather), observations standardized."""
    t = lambda key: torch.as_tensor(data[key], device=task["obs_mean"].device)  # noqa: E731
    mean, std = (task["obs_mean"], task["obs_std"]) if standardize else (0.0, 1.0)
    columns = [(t("observations") - mean) / std, t("actions"), t("rewards")[:, None],
               (t("next_observations") - mean) / std, t("terminals")[:, None]]
    return torch.cat(columns, 1), [c.shape[1] for c in columns]


def save_checkpoint(path: str, agent: nn.Module, args: Args, task: dict, loop: dict):
    """What --checkpoint needs (networks, arguments, task) and what --resume needs (optimizers, RNG states, the loop's
    state), then the policy alone (export_policy); each file written aside, synced, then renamed over the old one."""
    numpy_rng = np.random.get_state()
    ckpt = {"algorithm": Args.exp_name, "agent": agent.state_dict(), "args": asdict(args), "loop": loop,
            "task": {k: v.cpu() if torch.is_tensor(v) else v for k, v in task.items()},
            "optimizers": {k: v.state_dict() for k, v in vars(agent).items() if isinstance(v, torch.optim.Optimizer)},
            "rng": [random.getstate(), (numpy_rng[0], numpy_rng[1].tolist(), *numpy_rng[2:]), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []]}
    for file, save in ((path, lambda f: torch.save(ckpt, f)),  # the checkpoint first: the run's work is kept
                       (path[:-3] + "_policy.pt2", lambda f: torch.export.save(export_policy(agent, task), f))):
        with open(f"{file}.tmp", "wb") as f:
            save(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{file}.tmp", file)
    print(f"saved {path} and its policy at step {loop['step']}", flush=True)


def export_policy(agent: nn.Module, task: dict) -> torch.export.ExportedProgram:
    """The policy for torch.export.load(path).module(): raw observations in, environment actions out; traced once."""
    if "exported" not in vars(agent):
        low, high, mean, std = (task[k] for k in ("action_low", "action_high", "obs_mean", "obs_std"))
        agent.forward = lambda obs: low + (agent.act((obs - mean) / std) + 1.0) * 0.5 * (high - low)  # the program
        agent.exported = move_to_device_pass(torch.export.export(  # any batch size; on the CPU, any machine loads it
            agent, (mean.repeat(2, 1),), dynamic_shapes=({0: torch.export.Dim("batch")},)), "cpu")
    for name, value in agent.state_dict().items():  # this save's weights
        agent.exported.state_dict[name].data.copy_(value)
    return agent.exported


def load_checkpoint(args: Args) -> tuple[Args, dict]:
    """--checkpoint's file, or --resume's run and its arguments, which no argument given now may change: a checkpoint
    this script saved, or one line saying what is wrong."""
    if args.checkpoint and (args.resume or args.eval_episodes < 1):
        fail("--checkpoint evaluates a saved policy: it needs --eval-episodes >= 1, and no --resume")
    name = os.path.basename(os.path.normpath(args.resume or "")).split("__")  # {dataset}__{exp_name}__{seed}__{time}
    path = args.checkpoint or os.path.join(args.resume, f"{name[1] if len(name) == 4 else args.exp_name}.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        algorithm = ckpt["algorithm"] if args.checkpoint or ckpt["loop"] else None  # resuming needs the loop's state
    except Exception as e:  # no such file, not a checkpoint, or one without the training state
        fail(f"could not load '{path}' ({type(e).__name__}): pass a checkpoint {Args.exp_name}.py saved under "
             "runs/<run_name>/ (to --resume: that folder)")
    if algorithm != Args.exp_name:
        fail(f"'{path}' was saved by {algorithm}.py, not by {Args.exp_name}.py: pass it to {algorithm}.py")
    given = {k: v for k, v in vars(args).items() if v != getattr(Args(), k)}  # as far as the defaults tell
    changed = [k for k, v in given.items() if args.resume and v != ckpt["args"].get(k) and k not in
               ("resume", "cuda", "cudagraphs", "download", "save_every", "capture_video")]  # these leave the run as is
    if changed:
        fail(f"--{changed[0].replace('_', '-')} {given[changed[0]]} would change the run, which has "
             f"{ckpt['args'].get(changed[0])}: a resumed run keeps its arguments" + ("; the learning-rate schedule "
             "and the last evaluation follow the total: start a new run" * (changed[0] == "total_steps")))
    if args.resume and ckpt["loop"]["step"] >= ckpt["loop"].get("last", ckpt["args"]["total_steps"]):  # finished
        sys.exit(print(f"{args.resume} has finished its {ckpt['loop']['step']} steps: nothing to resume"))
    return (Args(**{**ckpt["args"], **given}) if args.resume else args), ckpt


def restore(ckpt: dict, agent: nn.Module) -> dict:
    """--resume: the agent, its optimizers and the RNG states as saved; returns the loop's state."""
    agent.load_state_dict(ckpt["agent"])
    for name, saved in ckpt["optimizers"].items():
        groups = getattr(agent, name).param_groups  # live: a scheduled learning rate is the agent's tensor, just loaded
        getattr(agent, name).load_state_dict(saved)
        getattr(agent, name).param_groups = groups
    python, (kind, key, *rest), cpu, cuda = ckpt["rng"]
    random.setstate(python)
    np.random.set_state((kind, np.array(key, dtype=np.uint32), *rest))
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_initialized():
        torch.cuda.set_rng_state_all(cuda)
    return ckpt["loop"]


def stop_on_signals(stop: dict) -> dict:
    """SIGTERM (a cluster's notice before it preempts a job; `timeout`) and SIGINT (Ctrl-C): in training (stop["armed"])
    the first sets stop["signal"], the loop saves after its step and exits 143 or 130; a second or early one exits."""
    def handler(signum, frame):
        if not stop.get("armed") or "signal" in stop:
            os._exit(128 + signum)
        stop["signal"] = signum
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)
    return stop


def cuda_graph(step, args: Args, device: torch.device, warmup: int = 3):
    """On CUDA, step (no arguments, tensors out) replayed from one CUDA graph: its first `warmup` calls run eagerly on a
    side stream (real updates, which create the optimizers' state), the next is captured, and each call replays it."""
    if device.type != "cuda" or not args.cudagraphs:
        return step
    graph, side, outputs = torch.cuda.CUDAGraph(), torch.cuda.Stream(), []

    def run():
        if len(outputs) < warmup:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), warnings.catch_warnings(action="ignore"):  # capturable optimizers warn here
                outputs.append(step())
            torch.cuda.current_stream().wait_stream(side)
        elif len(outputs) == warmup:  # capture records the kernels without running them; the replay runs them
            with torch.cuda.graph(graph):
                outputs.append(step())
        if len(outputs) > warmup:
            graph.replay()
        return outputs[-1]  # after the capture, static tensors that every replay rewrites
    return run


def evaluate_checkpoint(args: Args, ckpt: dict, device: torch.device):
    """--checkpoint: the saved agent on its own environment (--eval-episodes, --seed and --capture-video apply)."""
    task = {k: v.to(device) if torch.is_tensor(v) else v for k, v in ckpt["task"].items()}
    try:
        agent = Agent(len(task["obs_mean"]), len(task["action_low"]), Args(**ckpt["args"]), device)
        agent.load_state_dict(ckpt["agent"])
    except Exception as e:  # arguments or networks that this version of the script no longer has
        fail(f"could not rebuild the agent of '{args.checkpoint}' ({type(e).__name__}): an earlier version of "
             f"{Args.exp_name}.py saved it; evaluate it with that version")
    video_folder = f"videos/eval__{Args.exp_name}__{args.seed}__{int(time.time())}" if args.capture_video else None
    returns = evaluate(agent.act, make_eval_envs(task, args.eval_episodes, video_folder), task, args.seed)
    score, env_id = normalized_score(returns, task), gym.envs.registration.EnvSpec.from_json(task["env_spec"]).id
    print(f"{args.checkpoint} (trained on {task['dataset_id']}), evaluated in {env_id}: {len(returns)} episodes, "
          f"return {returns.mean():.1f} +- {returns.std():.1f}"
          + (f", normalized score {score:.1f}" if score is not None else " (the dataset has no reference scores)"))


def keep_freed_memory():
    """CQL's updates and MOPO's rollouts allocate and free tensors of many MB, which glibc hands back to the kernel on
    free, so the next step page-faults on fresh memory. Kept in the heap, they are reused: on one CPU thread CQL's
    update ran 1.2-1.5x and MOPO's rollout 1.7x as fast (IQL, AWR and BCQ gain nothing). glibc only."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl): nothing to tune
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap, not from fresh mappings
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of returning it


def save_dynamics(model: nn.Module, path: str, dataset_id: str, holdout_mse: torch.Tensor):
    torch.save({"state_dict": model.state_dict(), "dataset_id": dataset_id, "holdout_mse": holdout_mse.cpu()}, path)


def load_dynamics(model: nn.Module, path: str, dataset_id: str) -> torch.Tensor:
    """A trained ensemble from --dynamics-path, refused in one line unless mopo.py saved it for this dataset."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["dataset_id"] != dataset_id:
            raise ValueError(f"it was trained on '{saved['dataset_id']}', not on '{dataset_id}'")
        model.load_state_dict(saved["state_dict"])
    except Exception as e:
        fail(f"could not load the dynamics ensemble '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             "pass one mopo.py saved for this dataset, with the same --num-ensemble and --dynamics-hidden-dims")
    return saved["holdout_mse"]


# ---- Main ------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    stop = stop_on_signals({})
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    validate(args, {
        f"--num-elites must lie in [1, --num-ensemble], got {args.num_elites} of {args.num_ensemble}":
            1 <= args.num_elites <= args.num_ensemble,
        f"--real-ratio must lie in [0, 1], got {args.real_ratio}": 0.0 <= args.real_ratio <= 1.0,
        f"--penalty-coef must be >= 0, got {args.penalty_coef}": args.penalty_coef >= 0,
        f"--tau must lie in (0, 1], got {args.tau}": 0.0 < args.tau <= 1.0,
        "--rollout-freq, --rollout-batch-size, --rollout-length, --model-retain-epochs and --dynamics-batch-size must "
        "be >= 1": min(args.rollout_freq, args.rollout_batch_size, args.rollout_length, args.model_retain_epochs,
                       args.dynamics_batch_size) >= 1,
        f"--dynamics-max-epochs must be >= 1, got {args.dynamics_max_epochs}":
            args.dynamics_max_epochs is None or args.dynamics_max_epochs >= 1,
        "--dynamics-hidden-dims needs positive sizes": min(args.dynamics_hidden_dims, default=0) > 0,
    })
    args, ckpt = load_checkpoint(args) if args.checkpoint or args.resume else (args, {})
    keep_freed_memory()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.checkpoint:
        sys.exit(evaluate_checkpoint(args, ckpt, device))

    data, task = load_data(args, device)
    # The dynamics model and the termination functions work in raw observation units; SAC standardizes its inputs.
    table, split = transition_table(data, task, standardize=False)
    real_obs, real_actions, real_rewards, real_next_obs, _ = table.split(split, dim=1)
    run_name = f"{args.dataset_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = args.resume or f"runs/{run_name}"
    while os.path.exists(run_dir) and not args.resume:  # never write into another run's folder
        run_dir += "_"
    video_folder = f"videos/{os.path.basename(os.path.normpath(run_dir))}" if args.capture_video else None
    envs = make_eval_envs(task, args.eval_episodes, video_folder)
    # A resumed run continues its curves: TensorBoard drops whatever was logged after the checkpoint's step.
    writer = SummaryWriter(run_dir, purge_step=ckpt["loop"]["step"] + 1 if ckpt else None)
    hyperparameters = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")

    # (1) The dynamics ensemble: loaded when --dynamics-path names an existing file, trained otherwise.
    model = EnsembleDynamics(*split[:2], args.dynamics_hidden_dims, args.num_ensemble, args.num_elites).to(device)
    if ckpt:  # a resumed run carries its ensemble
        model.load_state_dict(ckpt["loop"]["carry"]["model"])
        holdout_mse = ckpt["loop"]["carry"]["holdout_mse"].to(device)
    elif args.dynamics_path and os.path.exists(args.dynamics_path):
        holdout_mse = load_dynamics(model, args.dynamics_path, args.dataset_id).to(device)
    else:
        targets = torch.cat([real_next_obs - real_obs, real_rewards], dim=1)
        holdout_mse = train_dynamics(model, real_obs, real_actions, targets, args, writer)
        for path in filter(None, (f"{run_dir}/dynamics.pt", args.dynamics_path)):
            save_dynamics(model, path, args.dataset_id, holdout_mse)
    print(f"dynamics hold-out MSE {' '.join(f'{v:.4f}' for v in holdout_mse.tolist())}, elites {model.elites.tolist()}")
    writer.add_text("dynamics", f"hold-out MSE per member: {holdout_mse.tolist()}; elites: {model.elites.tolist()}")

    # (2) SAC on mixed batches, with a model rollout every rollout_freq steps (the first before the first update).
    agent = Agent(split[0], split[1], args, device)
    buffer = ModelBuffer(args.rollout_batch_size * args.rollout_length * args.model_retain_epochs, sum(split), device)
    normalize = lambda obs: (obs - task["obs_mean"]) / task["obs_std"]  # noqa: E731
    policy = lambda obs: sample_tanh_gaussian(*agent.actor(normalize(obs)))[0]  # noqa: E731
    done_fn = termination_fn_for(gym.envs.registration.EnvSpec.from_json(task["env_spec"]).id)
    num_real = int(args.batch_size * args.real_ratio)  # 12 of 256, as OfflineRL-Kit rounds it

    def sac_step():  # a batch of num_real dataset rows and batch_size - num_real model rows
        real, fake = minibatch(table, split, num_real), buffer.sample(split, args.batch_size - num_real)
        obs, actions, rewards, next_obs, terminals = (torch.cat(pair) for pair in zip(real, fake))
        return agent.update(normalize(obs), actions, rewards, normalize(next_obs), terminals, num_real)

    train_step = cuda_graph(sac_step, args, device)
    loop = restore(ckpt, agent) if ckpt else {"step": 0, "scores": [], "elapsed": 0.0, "carry": {}}
    step, scores, eval_time, interval_steps, last = loop["step"], loop["scores"], 0.0, 0, args.total_steps
    first, train_start, interval_start = step, time.perf_counter(), time.perf_counter()  # this session's stretch
    carry = lambda: {"model": model.state_dict(), "holdout_mse": holdout_mse,  # noqa: E731
                     "rows": buffer.table[:buffer.size].clone(), "head": buffer.head, "rollout_info": rollout_info}
    if loop["carry"]:  # a resumed run: the model buffer (rows and ring position) and the last rollout's statistics
        buffer.add(loop["carry"]["rows"].to(device))
        buffer.head, rollout_info = loop["carry"]["head"], loop["carry"]["rollout_info"]
    state = lambda: {"step": step, "last": last, "scores": scores, "carry": carry(),  # noqa: E731
                     "elapsed": loop["elapsed"] + time.perf_counter() - train_start}  # the loop's part of a checkpoint
    stop["armed"] = True  # from here on, SIGTERM and SIGINT stop the run after a whole step, saved
    for step in range(step + 1, last + 1):
        if (step - 1) % args.rollout_freq == 0:  # Algorithm 2: h model steps of the policy from data states
            rollout_start = time.perf_counter()
            starts = real_obs[torch.randint(len(table), (args.rollout_batch_size,), device=device)]
            model_data = rollout(model, policy, starts, args.rollout_length, args.penalty_coef, done_fn)
            buffer.add(torch.cat([model_data["observations"], model_data["actions"], model_data["rewards"][:, None],
                                  model_data["next_observations"], model_data["terminals"][:, None]], dim=1))
            rollout_info = {**model_data["stats"], "charts/model_buffer_size": buffer.size,
                            "charts/rollout_seconds": time.perf_counter() - rollout_start}
        info = {**train_step(), **rollout_info}
        interval_steps += 1
        if step % args.log_every == 0 or step == last:
            logged = {k: float(v) for k, v in info.items()}  # the loop's only host sync, once per log_every steps
            logged["charts/updates_per_second"] = interval_steps / (time.perf_counter() - interval_start)
            logged["charts/peak_memory_mb"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
                                               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
            for k, v in logged.items():
                writer.add_scalar(k, v, step)
            interval_start, interval_steps = time.perf_counter(), 0
        if envs and (step % args.eval_every == 0 or step == last):
            eval_start = time.perf_counter()
            returns = evaluate(agent.act, envs, task, args.seed)
            eval_time += time.perf_counter() - eval_start
            score, line = normalized_score(returns, task), f"step {step}/{last}" + " online" * (step > args.total_steps)
            writer.add_scalar("eval/return", returns.mean(), step)
            line += f" | return {returns.mean():8.1f}"
            if score is not None:
                writer.add_scalar("eval/normalized_score", score, step)
                scores.append(score)
                line += f" | score {score:5.1f}"
            elapsed, done = time.perf_counter() - train_start, step - first  # a resumed run: since it resumed
            left = elapsed / done * (last - step)
            print(f"{line} | {done / (elapsed - eval_time):.0f} updates/s | {left / 60:.1f} min left", flush=True)
            interval_start, interval_steps = time.perf_counter(), 0
        stopping = stop.get("signal")  # read once: one arriving between two reads would stop the run unsaved
        if stopping or (args.save_every > 0 and step % args.save_every == 0 and step < last):
            writer.flush()  # the curves up to this step, which a resumed run continues
            save_checkpoint(f"{run_dir}/{args.exp_name}.pt", agent, args, task, state())
            interval_start, interval_steps = time.perf_counter(), 0
        if stopping:
            writer.close()
            print(f"{signal.Signals(stopping).name} at step {step}/{last}: continue with "
                  f"python {sys.argv[0]} --resume {run_dir}", flush=True)
            sys.exit(128 + stopping)

    if scores:
        averaged = f"mean of the last {len(scores[-3:])} evaluations" if len(scores) > 1 else "its only evaluation"
        print(f"final score ({averaged}): {np.mean(scores[-3:]):.1f}")
    if args.save_model:
        save_checkpoint(f"{run_dir}/{args.exp_name}.pt", agent, args, task, state())
    writer.close()
