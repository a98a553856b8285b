"""Model-based Offline Policy Optimization (MOPO): SAC on short rollouts of a learned dynamics model, with rewards
penalized by the model's uncertainty.

Yu, Thomas, Yu, Ermon, Zou, Levine, Finn, Ma (2020), "MOPO: Model-based Offline Policy Optimization",
arXiv:2005.13239. An ensemble of Gaussian dynamics models T(s', r | s, a) is fitted to the dataset. Every
--rollout-freq SAC steps, the current policy is rolled out in the model for h steps from dataset states, and each
model transition's reward is penalized by the ensemble's uncertainty, u(s, a) = max_i ||Sigma_i(s, a)||_F (Eq. 7-8):
    r~(s, a) = r^(s, a) - lambda * u(s, a)
SAC then trains on batches that mix a few real transitions with many model ones (Algorithm 2).
Run: python mopo.py --dataset-id mujoco/hopper/medium-replay-v0 --rollout-length 5 --penalty-coef 2.5
"""

import ctypes
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Optional

import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
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
    """save a checkpoint to runs/{run_name}/{exp_name}.pt at the end"""
    checkpoint: Optional[str] = None
    """path of a saved checkpoint: evaluate it and exit, training nothing"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name} (needs moviepy)"""

    # Algorithm specific arguments: the dynamics ensemble
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
    dynamics_max_epochs: Optional[int] = None
    """cap on dynamics training epochs (None: until 5 epochs pass without 1% hold-out improvement)"""
    dynamics_path: Optional[str] = None
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
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    target_entropy: Optional[float] = None
    """SAC's entropy target; None gives -|A|"""


def fail(message: str):
    """A user's mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args):
    if not 1 <= args.num_elites <= args.num_ensemble:
        fail(f"--num-elites must lie in [1, --num-ensemble], got {args.num_elites} of {args.num_ensemble}")
    if not 0.0 <= args.real_ratio <= 1.0:
        fail(f"--real-ratio must lie in [0, 1], got {args.real_ratio}")
    if args.penalty_coef < 0:
        fail(f"--penalty-coef must be >= 0, got {args.penalty_coef}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must lie in (0, 1], got {args.tau}")
    for name in ("total_steps", "batch_size", "eval_every", "log_every", "rollout_freq", "rollout_batch_size",
                 "rollout_length", "model_retain_epochs", "dynamics_batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.dynamics_max_epochs is not None and args.dynamics_max_epochs < 1:
        fail(f"--dynamics-max-epochs must be >= 1, got {args.dynamics_max_epochs}")
    if args.eval_episodes < 0:
        fail(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    if not args.hidden_dims or min(args.hidden_dims) < 1 or min(args.dynamics_hidden_dims, default=0) < 1:
        fail("--hidden-dims and --dynamics-hidden-dims need one or more positive sizes")


# ---- Data ------------------------------------------------------------------------------------------------------------
def load_minari(dataset_id: str, download: bool) -> minari.MinariDataset:
    """Load a dataset, turning Minari's exceptions into one line that says what to do."""
    root = os.environ.get("MINARI_DATASETS_PATH", "~/.minari/datasets")
    try:
        minari.dataset.minari_dataset.parse_dataset_id(dataset_id)
    except Exception:
        fail(f"'{dataset_id}' is not a Minari dataset id; ids look like 'mujoco/hopper/medium-v0'")
    local = minari.list_local_datasets()
    if dataset_id not in local and not download:
        known = ", ".join(sorted(local)) or "none"
        fail(f"dataset '{dataset_id}' not found under MINARI_DATASETS_PATH={root} and --no-download is set; "
             f"local datasets: {known}")
    try:
        return minari.load_dataset(dataset_id, download=download)
    except Exception as e:  # network errors, unknown remote ids, unreadable files
        known = ", ".join(sorted(local)) or "none"
        fail(f"could not load dataset '{dataset_id}' ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             f"MINARI_DATASETS_PATH={root} holds: {known}")


def check_spaces(observation_space: gym.Space, action_space: gym.Space):
    """Refuse what a Gaussian policy over a flat vector cannot handle."""
    if not isinstance(action_space, gym.spaces.Box):
        fail(f"MOPO here needs continuous (Box) actions; this dataset has {action_space}: pick a continuous one")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail("the action space is unbounded; MOPO's actions are rescaled to [-1, 1] and need finite Box bounds")
    if isinstance(observation_space, gym.spaces.Dict):
        if not all(isinstance(s, gym.spaces.Box) and len(s.shape) == 1 for s in observation_space.spaces.values()):
            fail(f"dict observations must hold flat Box entries to be concatenated; got {observation_space}")
    elif not (isinstance(observation_space, gym.spaces.Box) and len(observation_space.shape) == 1):
        fail(f"observations must be a flat Box vector (or a dict of them); got {observation_space}")


def flatten_observations(obs, observation_space: gym.Space) -> np.ndarray:
    """Dict observations (e.g. AntMaze's goal and state) are concatenated in the space's key order, which is the order
    gymnasium's FlattenObservation uses at evaluation."""
    if isinstance(observation_space, gym.spaces.Dict):
        return np.concatenate([np.asarray(obs[k]).reshape(len(obs[k]), -1) for k in observation_space.spaces], axis=1)
    return np.asarray(obs)


def episodes_to_transitions(episodes, observation_space: gym.Space) -> dict:
    """One flat transition set: s = obs[:-1] and s' = obs[1:] inside each episode, so no pair crosses an episode end.
    Only terminations stop bootstrapping; a time-limit truncation is not a terminal state."""
    parts = {"observations": [], "actions": [], "rewards": [], "next_observations": [], "terminals": []}
    episode_returns = []
    for ep in episodes:
        obs = flatten_observations(ep.observations, observation_space)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions).reshape(len(ep.actions), -1))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(np.asarray(ep.terminations))
        episode_returns.append(float(np.sum(ep.rewards)))
    data = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    data["episode_returns"] = np.asarray(episode_returns)
    return data


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map the Box bounds to [-1, 1], which the tanh mean of the policy assumes."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unscale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return low + (actions + 1.0) * 0.5 * (high - low)


# ---- Termination functions -------------------------------------------------------------------------------------------
# The model predicts states, not episode ends: rollouts stop where the real task would, judged on the predicted next
# state with the v5 environments' health checks (observations exclude the x position).
def hopper_done(next_obs: torch.Tensor) -> torch.Tensor:
    height, angle = next_obs[:, 0], next_obs[:, 1]
    in_range = torch.isfinite(next_obs).all(-1) & (next_obs[:, 1:].abs() < 100).all(-1)
    healthy = in_range & (height > 0.7) & (angle.abs() < 0.2)
    return ~healthy


def walker2d_done(next_obs: torch.Tensor) -> torch.Tensor:
    height, angle = next_obs[:, 0], next_obs[:, 1]
    return ~((height > 0.8) & (height < 2.0) & (angle > -1.0) & (angle < 1.0))


def ant_done(next_obs: torch.Tensor) -> torch.Tensor:
    height = next_obs[:, 0]
    return ~(torch.isfinite(next_obs).all(-1) & (height >= 0.2) & (height <= 1.0))


def never_done(next_obs: torch.Tensor) -> torch.Tensor:
    return torch.zeros(next_obs.shape[0], dtype=torch.bool, device=next_obs.device)


TERMINATION_FNS = {"Hopper": hopper_done, "Walker2d": walker2d_done, "Ant": ant_done, "HalfCheetah": never_done}


def termination_fn_for(env_id: str) -> Callable:
    name = env_id.split("/")[-1].split("-")[0]
    if name not in TERMINATION_FNS:
        print(f"warning: no termination function for {env_id}; model rollouts run without terminations")
    return TERMINATION_FNS.get(name, never_done)


# ---- The dynamics ensemble -------------------------------------------------------------------------------------------
class EnsembleDynamics(nn.Module):
    """num_ensemble Gaussian MLPs over [delta s, r] given standardized (s, a), as one network with stacked weights:
    each layer is a single baddbmm over all members. The log-variance is kept between learned bounds by a soft clamp
    (Chua et al. 2018, which MOPO's model follows), so the variance cannot collapse or explode off the data."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_ensemble: int, num_elites: int):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 2 * (obs_dim + 1)]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            # Truncated normal with std 1 / (2 sqrt(d_in)), the official (MBPO) initialization.
            w = torch.empty(num_ensemble, d_in, d_out)
            std = 1 / (2 * math.sqrt(d_in))
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
    """h steps of the current policy in the model from start_obs. Each next state and reward is sampled from one
    random elite; the reward is penalized by the whole ensemble's uncertainty; a predicted termination ends that
    branch. Returns the model transitions (rewards already penalized) and rollout statistics."""
    obs, out = start_obs, {k: [] for k in ("observations", "actions", "rewards", "next_observations", "terminals")}
    penalties, raw_rewards = [], []
    for _ in range(horizon):
        actions = policy(obs)
        mean, logvar = model(obs, actions)
        sample = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar)
        pick = model.elites[torch.randint(len(model.elites), (obs.shape[0],), device=obs.device)]
        chosen = sample[pick, torch.arange(obs.shape[0], device=obs.device)]
        next_obs, reward = obs + chosen[:, :-1], chosen[:, -1]
        penalty = uncertainty_penalty(logvar)
        done = done_fn(next_obs)
        for k, v in zip(out, (obs, actions, reward - penalty_coef * penalty, next_obs, done.float())):
            out[k].append(v)
        penalties.append(penalty)
        raw_rewards.append(reward)
        obs = next_obs[~done]
        if obs.shape[0] == 0:
            break
    data = {k: torch.cat(v) for k, v in out.items()}
    penalties, raw_rewards = torch.cat(penalties), torch.cat(raw_rewards)
    stats = {"model/penalty_mean": penalties.mean(), "model/penalty_max": penalties.max(),
             "model/reward_mean": raw_rewards.mean(), "model/termination_rate": data["terminals"].mean(),
             "model/rollout_transitions": torch.tensor(float(len(penalties)))}
    return {**data, "stats": stats}


class ModelBuffer:
    """A ring buffer of model transitions on the device, holding the last model_retain_epochs rollouts' worth."""

    def __init__(self, capacity: int, width: int, device: torch.device):
        self.table = torch.zeros(capacity, width, device=device)
        self.capacity, self.size, self.head = capacity, 0, 0

    def add(self, rows: torch.Tensor):
        rows = rows[-self.capacity:]
        idx = (self.head + torch.arange(len(rows), device=rows.device)) % self.capacity
        self.table[idx] = rows
        self.head = (self.head + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def sample(self, batch_size: int) -> torch.Tensor:
        return self.table[torch.randint(self.size, (batch_size,), device=self.table.device)]


def save_dynamics(model: EnsembleDynamics, path: str, dataset_id: str, holdout_mse: torch.Tensor, args: Args):
    torch.save({"algorithm": "mopo-dynamics", "state_dict": model.state_dict(), "dataset_id": dataset_id,
                "holdout_mse": holdout_mse.cpu(), "hidden_dims": list(args.dynamics_hidden_dims),
                "num_ensemble": args.num_ensemble}, path)


def load_dynamics(model: EnsembleDynamics, path: str, dataset_id: str) -> torch.Tensor:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"could not read the dynamics file '{path}' ({type(e).__name__}); pass one saved by mopo.py")
    if not isinstance(saved, dict) or saved.get("algorithm") != "mopo-dynamics":
        fail(f"'{path}' is not a dynamics ensemble saved by mopo.py")
    if saved["dataset_id"] != dataset_id:
        fail(f"the dynamics in '{path}' were trained on '{saved['dataset_id']}', not '{dataset_id}'")
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError:
        fail(f"the dynamics in '{path}' have another shape; match --num-ensemble, --num-elites and "
             "--dynamics-hidden-dims to it")
    return saved["holdout_mse"]


# ---- SAC networks ----------------------------------------------------------------------------------------------------
class TwinQ(nn.Module):
    """Q1 and Q2 as one network with stacked weights: each layer is a single batched operation over both
    members instead of two module calls."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_q: int = 2):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            # nn.Linear's default init per member; the output layer starts near zero, as rlkit's Q networks do.
            bound = 3e-3 if i == len(dims) - 2 else 1 / math.sqrt(d_in)
            self.weights.append(nn.Parameter(torch.empty(num_q, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, d_out).uniform_(-bound, bound)))
        self.num_q = num_q

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, detach_params: bool = False) -> torch.Tensor:
        """Q values of shape (num_q, batch). With detach_params, gradients reach the actions but not the weights:
        the policy's loss must not train the critic."""
        x = torch.cat([obs, actions], dim=-1).expand(self.num_q, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detach_params:
                w, b = w.detach(), b.detach()
            if i < len(self.weights) - 1:
                x = torch.relu_(torch.baddbmm(b, x, w))  # in place: baddbmm's backward needs only its inputs
            else:
                # One output unit as a product and a sum: as a matmul, its input gradient is an outer product that a
                # CPU's batched GEMM computes several times slower than this elementwise backward.
                x = (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)
        return x


class TanhGaussianPolicy(nn.Module):
    """SAC's policy: a = tanh(u), u ~ N(mu(s), sigma(s)), log-std clamped to [-5, 2] as in the official code.
    Evaluation acts with tanh(mu)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims):
        super().__init__()
        layers, d = [], obs_dim
        for h in hidden_dims:
            layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
            d = h
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(d, 2 * action_dim)  # mean and log-std
        nn.init.uniform_(self.head.weight, -1e-3, 1e-3)
        nn.init.uniform_(self.head.bias, -1e-3, 1e-3)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.head(self.trunk(obs)).chunk(2, dim=-1)
        return mean, log_std.clamp(-5.0, 2.0)

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(obs)[0])


def sample_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor):
    """Reparameterized samples a = tanh(mean + std * eps) and their log-density under the squashed Gaussian."""
    u = mean + log_std.exp() * torch.randn_like(mean)
    log_prob = (-0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    # log |d tanh(u) / du| = log(1 - tanh(u)^2), written in a form that stays finite for large |u|.
    log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
    return torch.tanh(u), log_prob


class SAC:
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        self.args = args
        self.actor = TanhGaussianPolicy(obs_dim, action_dim, args.hidden_dims).to(device)
        self.critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
        self.log_alpha = torch.zeros(1, device=device, requires_grad=True)
        # fused: one kernel per optimizer instead of a loop over parameters.
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr)
        self.actor_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, T_max=args.total_steps)

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
        policy_loss = (alpha * log_pi - self.critic(obs, new_actions, detach_params=True).min(0).values).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        (policy_loss + critic_loss).backward()
        self.actor_opt.step()
        self.critic_opt.step()
        self.actor_schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), a.tau)
        q = q.detach().mean(0)
        return {
            "losses/critic_loss": critic_loss.detach(),
            "losses/policy_loss": policy_loss.detach(),
            "losses/alpha_loss": alpha_loss.detach(),
            "losses/alpha": alpha.squeeze(),
            "values/q_real": q[:num_real].mean() if num_real else torch.zeros(()),
            "values/q_model": q[num_real:].mean() if num_real < len(q) else torch.zeros(()),
            "values/entropy": -log_pi.detach().mean(),
        }


# ---- Evaluation ------------------------------------------------------------------------------------------------------
def make_eval_env(make, video_folder: Optional[str], episodes_per_eval: int):
    """`make(**kwargs)` builds the environment: the dataset's recovered eval env, or the spec saved in a checkpoint."""
    try:
        env = make(render_mode="rgb_array") if video_folder else make()
    except Exception as e:
        fail(f"could not create the evaluation environment ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
             "MuJoCo tasks need `pip install gymnasium[mujoco]`")
    if isinstance(env.observation_space, gym.spaces.Dict):
        env = gym.wrappers.FlattenObservation(env)
    if video_folder:
        try:
            env = gym.wrappers.RecordVideo(env, video_folder, episode_trigger=lambda e: e % episodes_per_eval == 0)
        except gym.error.DependencyNotInstalled:
            fail("--capture-video needs moviepy (`pip install moviepy`), and MUJOCO_GL=egl without a display")
    return env


@torch.no_grad()
def evaluate(env, actor, stats: dict, episodes: int, seed: int, device) -> np.ndarray:
    """Deterministic policy (the mean action); episode i starts from reset(seed=seed + i), so every evaluation sees the
    same start states."""
    actor.eval()
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            x = (torch.as_tensor(obs, dtype=torch.float32, device=device) - stats["obs_mean"]) / stats["obs_std"]
            action = actor.act(x.unsqueeze(0))[0].cpu().numpy()
            action = unscale_actions(action, stats["action_low"], stats["action_high"])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
    actor.train()
    return np.asarray(returns)


def normalized_score(returns: np.ndarray, ref_min: Optional[float], ref_max: Optional[float]) -> Optional[float]:
    """minari.get_normalized_score's formula, times 100; None when the dataset has no reference scores."""
    if ref_min is None or ref_max is None:
        return None
    return float(100.0 * (np.mean(returns) - ref_min) / (ref_max - ref_min))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kB


def keep_freed_memory():
    """Every CPU update allocates and frees tensors of several MB (CQL: 31 actions per state through both critics).
    glibc hands blocks that large back to the kernel on free, so each update page-faults on fresh memory: about a
    fifth of CQL's CPU update time. Keeping freed blocks in the heap avoids it. glibc only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: serve blocks up to 1 GiB from the heap, not from fresh mappings
    libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of freed heap instead of returning it


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        fail(f"checkpoint '{path}' does not exist; pass the .pt file a training run saved under runs/<run_name>/")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"could not read checkpoint '{path}' ({type(e).__name__}); is it a file saved by this script?")
    if not isinstance(ckpt, dict) or ckpt.get("algorithm") != "mopo":
        fail(f"'{path}' is not a mopo.py checkpoint")
    return ckpt


def evaluate_checkpoint(args: Args, device: torch.device):
    if args.eval_episodes < 1:
        fail("--checkpoint evaluates the policy: give --eval-episodes 1 or more")
    ckpt = load_checkpoint(args.checkpoint)
    saved = ckpt["args"]
    env_spec = gym.envs.registration.EnvSpec.from_json(ckpt["env_spec"])
    # Only a --dataset-id typed on the command line is compared: the default must not refuse a Walker checkpoint.
    typed = any(a.split("=")[0] in ("--dataset-id", "--dataset_id") for a in sys.argv)
    if typed and args.dataset_id != saved["dataset_id"]:
        other = minari.list_local_datasets().get(args.dataset_id)
        other_env = gym.envs.registration.EnvSpec.from_json(other["env_spec"]).id if other else None
        if other_env != env_spec.id:
            fail(f"the checkpoint was trained on '{saved['dataset_id']}' ({env_spec.id}), not on '{args.dataset_id}' "
                 f"({other_env or 'not found locally'}); drop --dataset-id or pass the matching one")
    actor = TanhGaussianPolicy(ckpt["obs_dim"], ckpt["action_dim"], saved["hidden_dims"]).to(device)
    actor.load_state_dict(ckpt["actor"])
    stats = {k: ckpt[k].to(device) if k.startswith("obs") else ckpt[k].numpy() for k in
             ("obs_mean", "obs_std", "action_low", "action_high")}
    run_name = f"eval__{os.path.splitext(os.path.basename(args.checkpoint))[0]}__{args.seed}__{int(time.time())}"
    env = make_eval_env(lambda **kw: gym.make(env_spec, **kw), f"videos/{run_name}" if args.capture_video else None,
                        max(args.eval_episodes, 1))
    returns = evaluate(env, actor, stats, args.eval_episodes, args.seed, device)
    score = normalized_score(returns, ckpt["ref_min_score"], ckpt["ref_max_score"])
    line = f"{args.checkpoint}: {len(returns)} episodes, return {returns.mean():.1f} +- {returns.std():.1f}"
    print(line + (f", normalized score {score:.1f}" if score is not None else " (the dataset has no reference scores)"))


# ---- Main ------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    args = tyro.cli(Args)
    validate(args)
    keep_freed_memory()
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.checkpoint:
        evaluate_checkpoint(args, device)
        sys.exit(0)

    # Data: the real transitions live on the device in raw observation units (the dynamics model and the termination
    # functions work in them); SAC sees standardized observations.
    start = time.perf_counter()
    dataset = load_minari(args.dataset_id, args.download)
    check_spaces(dataset.spec.observation_space, dataset.spec.action_space)
    data = episodes_to_transitions(dataset.iterate_episodes(), dataset.spec.observation_space)
    low = dataset.spec.action_space.low.astype(np.float32)
    high = dataset.spec.action_space.high.astype(np.float32)
    data["actions"] = scale_actions(data["actions"], low, high)
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    if not args.normalize_states:
        obs_mean, obs_std = np.zeros_like(obs_mean), np.ones_like(obs_std)
    n = len(data["rewards"])
    table = torch.as_tensor(np.concatenate([data["observations"], data["actions"], data["rewards"][:, None],
                                            data["next_observations"], data["terminals"][:, None]], axis=1),
                            dtype=torch.float32, device=device)
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    del data
    split = [obs_dim, action_dim, 1, obs_dim, 1]
    real_obs, real_actions, real_rewards, real_next_obs, _ = table.split(split, dim=1)
    stats = {"obs_mean": torch.as_tensor(obs_mean, device=device), "obs_std": torch.as_tensor(obs_std, device=device),
             "action_low": low, "action_high": high}
    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    print(f"loaded {args.dataset_id}: {n} transitions, {dataset.total_episodes} episodes, obs {obs_dim}, "
          f"action {action_dim}, in {time.perf_counter() - start:.1f}s")
    if ref_min is None or ref_max is None:
        print(f"note: {args.dataset_id} has no reference scores (official mujoco/* datasets carry none); "
              "logging raw returns only, eval/normalized_score is not written")

    run_name = f"{args.dataset_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    while os.path.exists(f"runs/{run_name}"):  # never write into another run's folder
        run_name += "_"
    writer = SummaryWriter(f"runs/{run_name}")
    hparams = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hparams}")
    env = make_eval_env(lambda **kw: dataset.recover_environment(eval_env=True, **kw),
                        f"videos/{run_name}" if args.capture_video else None, max(args.eval_episodes, 1))
    # What the checkpoint needs to rebuild this environment without the dataset (rendering is chosen at load time).
    env_spec = env.unwrapped.spec
    env_spec = replace(env_spec, kwargs={k: v for k, v in env_spec.kwargs.items() if k != "render_mode"})
    done_fn = termination_fn_for(env_spec.id)

    # (1) The dynamics ensemble: loaded when --dynamics-path names an existing file, trained otherwise.
    timing = {"dynamics": 0.0, "rollouts": 0.0, "sac": 0.0, "eval": 0.0}
    phase = time.perf_counter()
    model = EnsembleDynamics(obs_dim, action_dim, args.dynamics_hidden_dims, args.num_ensemble, args.num_elites)
    model = model.to(device)
    if args.dynamics_path and os.path.exists(args.dynamics_path):
        holdout_mse = load_dynamics(model, args.dynamics_path, args.dataset_id).to(device)
        print(f"loaded the dynamics ensemble from {args.dynamics_path}")
        dynamics_file = args.dynamics_path
    else:
        targets = torch.cat([real_next_obs - real_obs, real_rewards], dim=1)
        holdout_mse = train_dynamics(model, real_obs, real_actions, targets, args, writer)
        dynamics_file = f"runs/{run_name}/dynamics.pt"
        save_dynamics(model, dynamics_file, args.dataset_id, holdout_mse, args)
        if args.dynamics_path:
            save_dynamics(model, args.dynamics_path, args.dataset_id, holdout_mse, args)
    timing["dynamics"] = time.perf_counter() - phase
    elites = model.elites.tolist()
    print(f"dynamics: hold-out MSE {' '.join(f'{v:.4f}' for v in holdout_mse.tolist())}, elites {elites}, "
          f"{timing['dynamics']:.0f}s")
    writer.add_text("dynamics", f"hold-out MSE per member: {holdout_mse.tolist()}; elites: {elites}")

    # (2) SAC on mixed batches, with a model rollout every rollout_freq steps (the first before the first update).
    agent = SAC(obs_dim, action_dim, args, device)
    buffer = ModelBuffer(args.rollout_batch_size * args.rollout_length * args.model_retain_epochs, sum(split), device)
    normalize = lambda obs: (obs - stats["obs_mean"]) / stats["obs_std"]  # noqa: E731
    policy = lambda obs: sample_tanh_gaussian(*agent.actor(normalize(obs)))[0]  # noqa: E731
    num_real = int(args.batch_size * args.real_ratio)  # 12 of 256, as OfflineRL-Kit rounds it
    scores, eval_time, interval_steps = [], 0.0, 0
    train_start = interval_start = time.perf_counter()
    for step in range(1, args.total_steps + 1):
        if (step - 1) % args.rollout_freq == 0:
            phase = time.perf_counter()
            starts = real_obs[torch.randint(n, (args.rollout_batch_size,), device=device)]
            fake = rollout(model, policy, starts, args.rollout_length, args.penalty_coef, done_fn)
            buffer.add(torch.cat([fake["observations"], fake["actions"], fake["rewards"][:, None],
                                  fake["next_observations"], fake["terminals"][:, None]], dim=1))
            rollout_stats = fake["stats"]
            timing["rollouts"] += time.perf_counter() - phase
        phase = time.perf_counter()
        rows = torch.cat([table[torch.randint(n, (num_real,), device=device)],
                          buffer.sample(args.batch_size - num_real)])
        obs, actions, rewards, next_obs, terminals = rows.split(split, dim=1)
        info = agent.update(normalize(obs), actions, rewards.squeeze(1), normalize(next_obs), terminals.squeeze(1),
                            num_real)
        timing["sac"] += time.perf_counter() - phase
        interval_steps += 1

        if step % args.log_every == 0 or step == args.total_steps:
            ups = interval_steps / (time.perf_counter() - interval_start)
            for k, v in {**info, **rollout_stats}.items():
                writer.add_scalar(k, v.item(), step)
            writer.add_scalar("charts/updates_per_second", ups, step)
            writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(device), step)
            writer.add_scalar("charts/model_buffer_size", buffer.size, step)
            for k, v in timing.items():
                writer.add_scalar(f"charts/time_{k}_s", v, step)
            interval_start, interval_steps = time.perf_counter(), 0

        if step % args.eval_every == 0 or step == args.total_steps:
            eval_start = time.perf_counter()
            returns = evaluate(env, agent.actor, stats, args.eval_episodes, args.seed, device)
            timing["eval"] += time.perf_counter() - eval_start
            line = f"step {step}/{args.total_steps}"
            if len(returns):
                writer.add_scalar("eval/return", returns.mean(), step)
                line += f" | return {returns.mean():8.1f}"
                score = normalized_score(returns, ref_min, ref_max)
                if score is not None:
                    writer.add_scalar("eval/normalized_score", score, step)
                    scores.append(score)
                    line += f" | score {score:5.1f}"
            elapsed = time.perf_counter() - train_start
            left = elapsed / step * (args.total_steps - step)
            ups = step / (timing["sac"] + timing["rollouts"])
            print(f"{line} | {ups:.0f} updates/s (rollouts included) | {left / 60:.1f} min left", flush=True)
            interval_start, interval_steps = time.perf_counter(), 0

    if scores:
        print(f"final score (mean of the last 3 evaluations): {np.mean(scores[-3:]):.1f}")
    print("wall-clock: " + ", ".join(f"{k} {v:.0f}s" for k, v in timing.items()))
    if args.save_model:
        path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save({
            "algorithm": "mopo",
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "actor": agent.actor.state_dict(),
            "critic": agent.critic.state_dict(),
            "target_critic": agent.target_critic.state_dict(),
            "log_alpha": agent.log_alpha.detach().cpu(),
            "obs_dim": obs_dim,
            "action_dim": action_dim,
            "obs_mean": stats["obs_mean"].cpu(),
            "obs_std": stats["obs_std"].cpu(),
            "action_low": torch.as_tensor(low),
            "action_high": torch.as_tensor(high),
            "env_spec": env_spec.to_json(),
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
        }, path)
        print(f"saved {path} (the dynamics ensemble: {dynamics_file})")
    env.close()
    writer.close()
