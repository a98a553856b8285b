"""Conservative Q-Learning (CQL) on Soft Actor-Critic, for continuous actions.

Kumar, Zhou, Tucker, Levine (2020), "Conservative Q-Learning for Offline Reinforcement Learning", arXiv:2006.04779.
Offline, a Q function overestimates actions the data never tried, and the policy exploits exactly those errors. CQL
adds to SAC's Bellman error a regularizer that pushes Q down on actions from a wide proposal (uniform and current
policy) and up on the dataset's actions, so the learned Q lower-bounds the policy's value (CQL(H), Eq. 4):
    L_Q = alpha_cql * E_s[ log sum_a exp Q(s, a) - E_{a ~ data} Q(s, a) ] + 1/2 E[(Q(s, a) - B^pi Q_target(s, a))^2]
with the log-sum-exp estimated by importance sampling (Appendix F). The policy step is SAC's.
Run: python cql_continuous.py --dataset-id mujoco/hopper/medium-v0 --cql-alpha 5
"""

import ctypes
import math
import os
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from typing import Optional

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
    """number of gradient steps"""
    batch_size: int = 256
    """minibatch size"""
    eval_every: int = 5_000
    """gradient steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """gradient steps between loss logs"""
    normalize_states: bool = True
    """z-score observations with dataset statistics (CORL's choice; the official CQL code does not)"""
    save_model: bool = True
    """save a checkpoint to runs/{run_name}/{exp_name}.pt at the end"""
    checkpoint: Optional[str] = None
    """path of a saved checkpoint: evaluate it and exit, training nothing"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name} (needs moviepy)"""

    # Algorithm specific arguments
    actor_lr: float = 1e-4
    """policy learning rate (official code 1e-4; CORL uses 3e-5)"""
    critic_lr: float = 3e-4
    """learning rate of the twin Q networks"""
    alpha_lr: float = 1e-4
    """learning rate of the SAC entropy temperature (the official code uses the policy's)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the policy and Q networks (official: three layers of 256)"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    target_entropy: Optional[float] = None
    """SAC's entropy target; None gives -|A|"""
    cql_alpha: float = 5.0
    """weight of the conservative regularizer (the paper uses 5 or 10 on MuJoCo)"""
    cql_n_actions: int = 10
    """actions drawn per state from each proposal (uniform, pi(s), pi(s'))"""
    cql_temp: float = 1.0
    """temperature of the log-sum-exp"""
    importance_sampling: bool = True
    """CQL(H) with importance-sampled log-sum-exp (official min_q_version 3); off: the plain version 2"""
    lagrange_gap: float = 0.0
    """> 0 turns on the Lagrange variant: alpha' is tuned so the weighted gap stays at this value (5 or 10)"""
    backup_entropy: bool = False
    """subtract alpha * log pi(a'|s') in the Q target (SAC's soft backup); off: the official deterministic backup"""
    max_q_backup: bool = False
    """target from the max over cql_n_actions policy actions at s' (the paper's AntMaze setting)"""
    bc_steps: int = 0
    """policy steps of behaviour cloning (alpha * log pi - log pi(a_data)) before SAC's loss (official: 40000)"""
    reward_scale: float = 1.0
    """rewards are multiplied by this..."""
    reward_bias: float = 0.0
    """...and then shifted by this (the official AntMaze setting: scale 4, bias -2)"""


def fail(message: str):
    """A user's mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args):
    if args.cql_alpha < 0:
        fail(f"--cql-alpha must be >= 0, got {args.cql_alpha} (the paper uses 5 or 10)")
    if args.cql_n_actions < 1:
        fail(f"--cql-n-actions must be >= 1, got {args.cql_n_actions}")
    if args.cql_temp <= 0:
        fail(f"--cql-temp must be > 0, got {args.cql_temp}")
    if args.lagrange_gap < 0:
        fail(f"--lagrange-gap must be >= 0 (0 turns the Lagrange variant off), got {args.lagrange_gap}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must lie in (0, 1], got {args.tau}")
    for name in ("total_steps", "batch_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_episodes < 0 or args.bc_steps < 0:
        fail("--eval-episodes and --bc-steps must be >= 0")
    if not args.hidden_dims or min(args.hidden_dims) < 1:
        fail(f"--hidden-dims needs one or more positive sizes, got {args.hidden_dims}")


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
        fail(f"CQL here needs continuous (Box) actions; this dataset has {action_space}: pick a continuous one")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail("the action space is unbounded; CQL's actions are rescaled to [-1, 1] and need finite Box bounds")
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


# ---- Networks --------------------------------------------------------------------------------------------------
class TwinQ(nn.Module):
    """Q1 and Q2 as one network with stacked weights: each layer is a single batched operation over both
    members. CQL evaluates 31 actions per state, so this one call carries almost all of the update's arithmetic."""

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


def sample_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor, n: Optional[int] = None):
    """Reparameterized samples a = tanh(mean + std * eps) and their log-density. With n, draws n actions per state
    from one network pass (shape (batch, n, A)); the official code re-runs the network on n copies of each state,
    which gives the same distribution at n times the cost."""
    if n is not None:
        mean, log_std = mean.unsqueeze(1).expand(-1, n, -1), log_std.unsqueeze(1).expand(-1, n, -1)
    u = mean + log_std.exp() * torch.randn_like(mean)
    log_prob = (-0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    # log |d tanh(u) / du| = log(1 - tanh(u)^2), written in a form that stays finite for large |u|.
    log_prob = log_prob - (2 * (math.log(2) - u - F.softplus(-2 * u))).sum(-1)
    return torch.tanh(u), log_prob


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a|s) of given actions in (-1, 1), for the behaviour-cloning warm start."""
    actions = actions.clamp(-1 + 1e-6, 1 - 1e-6)
    u = torch.atanh(actions)
    log_prob = (-0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    return log_prob - torch.log(1 - actions.pow(2) + 1e-6).sum(-1)


# ---- Losses (paper equations) --------------------------------------------------------------------------------------
def cql_logsumexp(q_rand, q_pi, q_pi_next, q_data, action_dim: int, log_pi, log_pi_next, temp: float,
                  importance_sampling: bool) -> torch.Tensor:
    """The soft maximum of Q over actions at each state, log sum_a exp(Q(s, a) / temp) * temp (Eq. 4's first term).
    q_rand, q_pi, q_pi_next: (num_q, batch, n) values at s of uniform actions, pi(s) actions and pi(s') actions.
    With importance sampling (Appendix F) each sample is divided by its proposal density: uniform on [-1, 1]^d has
    log-density d * log(0.5), a policy sample its log pi; the data action is left out. Without it (official version 2)
    the 3n samples and the data action enter unweighted. Returns (num_q, batch)."""
    if importance_sampling:
        cat = torch.cat([q_rand - action_dim * math.log(0.5), q_pi_next - log_pi_next, q_pi - log_pi], dim=-1)
    else:
        cat = torch.cat([q_rand, q_data.unsqueeze(-1), q_pi_next, q_pi], dim=-1)
    return torch.logsumexp(cat / temp, dim=-1) * temp


def sac_target(rewards, terminals, next_q, discount: float, alpha=None, next_log_pi=None) -> torch.Tensor:
    """r + gamma * (1 - terminal) * (min_i Q_target_i(s', a') [- alpha * log pi(a'|s')]). CQL's official code drops
    the entropy term (a deterministic backup) unless asked for it."""
    if alpha is not None:
        next_q = next_q - alpha * next_log_pi
    return rewards + discount * (1.0 - terminals) * next_q


class CQL:
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        self.args = args
        self.action_dim = action_dim
        self.actor = TanhGaussianPolicy(obs_dim, action_dim, args.hidden_dims).to(device)
        self.critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.target_entropy = -float(action_dim) if args.target_entropy is None else args.target_entropy
        self.log_alpha = torch.zeros(1, device=device, requires_grad=True)
        self.log_alpha_prime = torch.zeros(1, device=device, requires_grad=True)
        # fused: one kernel per optimizer instead of a loop over parameters.
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=args.alpha_lr)
        self.alpha_prime_opt = torch.optim.Adam([self.log_alpha_prime], lr=args.critic_lr)
        self.steps = 0

    def losses(self, obs, actions, rewards, next_obs, terminals, policy_sample=None) -> dict:
        """Every loss of one step, as tensors with their graphs: the policy's (SAC, or the BC warm start), the critic's
        (Bellman error plus the conservative term) and alpha''s. All sampled actions and their log-probs enter the
        critic's loss detached. policy_sample = (mean, log_std, action, log_pi) of pi(.|s), drawn here if not given."""
        a, n, batch = self.args, self.args.cql_n_actions, obs.shape[0]
        mean, log_std, new_actions, log_pi = policy_sample or (*self.actor(obs), None, None)
        if new_actions is None:
            new_actions, log_pi = sample_tanh_gaussian(mean, log_std)
        alpha = self.log_alpha.detach().exp()

        # The policy maximizes min Q - alpha * log pi (SAC); the critic's weights are detached so this loss trains the
        # policy alone. The optional warm start clones the data's actions instead.
        if self.steps < a.bc_steps:
            policy_loss = (alpha * log_pi - tanh_gaussian_log_prob(mean, log_std, actions)).mean()
        else:
            q_new = self.critic(obs, new_actions, detach_params=True).min(0).values
            policy_loss = (alpha * log_pi - q_new).mean()

        # The Bellman target from the target critics at policy actions at s'.
        with torch.no_grad():
            next_mean, next_log_std = self.actor(next_obs)
            if a.max_q_backup:
                next_actions, _ = sample_tanh_gaussian(next_mean, next_log_std, n)
                next_q = self.target_critic(next_obs.repeat_interleave(n, 0), next_actions.reshape(batch * n, -1))
                next_q, next_log_pi = next_q.view(2, batch, n).max(-1).values.min(0).values, None
            else:
                next_actions, next_log_pi = sample_tanh_gaussian(next_mean, next_log_std)
                next_q = self.target_critic(next_obs, next_actions).min(0).values
            q_target = sac_target(rewards, terminals, next_q, a.discount,
                                  alpha if a.backup_entropy and not a.max_q_backup else None, next_log_pi)

            # Proposal actions for the log-sum-exp, all evaluated at s: uniform, pi(s) and pi(s').
            rand_actions = torch.empty(batch, n, self.action_dim, device=obs.device).uniform_(-1, 1)
            pi_actions, pi_log_pi = sample_tanh_gaussian(mean.detach(), log_std.detach(), n)
            pi_next_actions, pi_next_log_pi = sample_tanh_gaussian(next_mean, next_log_std, n)

        # The critic: every (s, a) pair this step needs goes through both Q networks in one batched call.
        all_actions = torch.cat([actions.unsqueeze(1), rand_actions, pi_actions, pi_next_actions], dim=1)
        q_all = self.critic(obs.repeat_interleave(1 + 3 * n, 0), all_actions.reshape(batch * (1 + 3 * n), -1))
        q_all = q_all.view(2, batch, 1 + 3 * n)
        q_data, q_rand, q_pi, q_pi_next = q_all[..., 0], *q_all[..., 1:].split(n, dim=-1)
        # Each member's plain MSE, as the official code has it (no 1/2: it sets the scale cql_alpha is tuned against).
        bellman = (q_data - q_target).pow(2).mean(1).sum()
        logsumexp = cql_logsumexp(q_rand, q_pi, q_pi_next, q_data, self.action_dim, pi_log_pi, pi_next_log_pi,
                                  a.cql_temp, a.importance_sampling)
        gap = (logsumexp - q_data).mean(1)  # per Q network: soft max over actions minus the value of the data's
        conservative = a.cql_alpha * gap
        if a.lagrange_gap > 0:
            # Lagrange variant: alpha' grows while the weighted gap exceeds the target and shrinks below it.
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            alpha_prime_loss = -(alpha_prime * (conservative.detach() - a.lagrange_gap)).mean()
            conservative = alpha_prime.detach() * (conservative - a.lagrange_gap)
        else:
            alpha_prime, alpha_prime_loss = torch.ones_like(self.log_alpha_prime), torch.zeros((), device=obs.device)
        return {"policy_loss": policy_loss, "critic_loss": bellman + conservative.sum(), "bellman": bellman,
                "conservative": conservative.sum(), "alpha_prime_loss": alpha_prime_loss, "alpha_prime": alpha_prime,
                "alpha": alpha, "log_pi": log_pi, "q_data": q_data, "q_rand": q_rand, "q_pi": q_pi,
                "logsumexp": logsumexp, "gap": gap, "q_target": q_target}

    def update(self, obs, actions, rewards, next_obs, terminals) -> dict:
        """One step on alpha, then the policy, the critics and alpha', in the official trainer's order. Returns
        detached tensors only: reading them (a host sync) is left to the caller at log time."""
        # SAC's temperature first, towards the entropy target; the policy's loss then uses the updated alpha.
        mean, log_std = self.actor(obs)
        new_actions, log_pi = sample_tanh_gaussian(mean, log_std)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        out = self.losses(obs, actions, rewards, next_obs, terminals, (mean, log_std, new_actions, log_pi))
        # The losses share no parameters (the critic's weights are detached in the policy's, everything but alpha' in
        # alpha''s), so one backward pass gives each network exactly its own gradient.
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        self.alpha_prime_opt.zero_grad(set_to_none=True)
        (out["policy_loss"] + out["critic_loss"] + out["alpha_prime_loss"]).backward()
        self.actor_opt.step()
        self.critic_opt.step()
        if self.args.lagrange_gap > 0:
            self.alpha_prime_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), self.args.tau)
        self.steps += 1

        return {
            "losses/critic_loss": out["critic_loss"].detach(),
            "losses/bellman_loss": out["bellman"].detach(),
            "losses/cql_loss": out["conservative"].detach(),
            "losses/policy_loss": out["policy_loss"].detach(),
            "losses/alpha_loss": alpha_loss.detach(),
            "losses/alpha": out["alpha"].squeeze(),
            "losses/alpha_prime": out["alpha_prime"].detach().squeeze(),
            "values/q_data": out["q_data"].detach().mean(),
            "values/q_random": out["q_rand"].detach().mean(),
            "values/q_policy": out["q_pi"].detach().mean(),
            "values/q_ood": out["logsumexp"].detach().mean(),
            "values/cql_gap": out["gap"].detach().mean(),
            "values/q_target": out["q_target"].mean(),
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
    if not isinstance(ckpt, dict) or ckpt.get("algorithm") != "cql_continuous":
        fail(f"'{path}' is not a cql_continuous.py checkpoint")
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

    # Data: everything lives on the device as float32 from here on.
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
    scale = args.reward_scale
    n = len(data["rewards"])
    # One (N, row) tensor: a minibatch is one gather, then views.
    table = torch.as_tensor(np.concatenate([
        (data["observations"] - obs_mean) / obs_std,
        data["actions"],
        (data["rewards"] * scale + args.reward_bias)[:, None],
        (data["next_observations"] - obs_mean) / obs_std,
        data["terminals"][:, None],
    ], axis=1), dtype=torch.float32, device=device)
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    del data
    split = [obs_dim, action_dim, 1, obs_dim, 1]
    stats = {"obs_mean": torch.as_tensor(obs_mean, device=device), "obs_std": torch.as_tensor(obs_std, device=device),
             "action_low": low, "action_high": high}
    metadata = dataset.storage.metadata
    ref_min, ref_max = metadata.get("ref_min_score"), metadata.get("ref_max_score")
    print(f"loaded {args.dataset_id}: {n} transitions, {dataset.total_episodes} episodes, obs {obs_dim}, "
          f"action {action_dim}, reward scale {scale:.4g}, in {time.perf_counter() - start:.1f}s")
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

    agent = CQL(obs_dim, action_dim, args, device)
    scores, eval_time, interval_steps = [], 0.0, 0
    train_start = interval_start = time.perf_counter()
    for step in range(1, args.total_steps + 1):
        idx = torch.randint(n, (args.batch_size,), device=device)
        obs, actions, rewards, next_obs, terminals = table[idx].split(split, dim=1)
        info = agent.update(obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1))
        interval_steps += 1

        if step % args.log_every == 0 or step == args.total_steps:
            ups = interval_steps / (time.perf_counter() - interval_start)
            for k, v in info.items():
                writer.add_scalar(k, v.item(), step)
            writer.add_scalar("charts/updates_per_second", ups, step)
            writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(device), step)
            interval_start, interval_steps = time.perf_counter(), 0

        if step % args.eval_every == 0 or step == args.total_steps:
            eval_start = time.perf_counter()
            returns = evaluate(env, agent.actor, stats, args.eval_episodes, args.seed, device)
            eval_time += time.perf_counter() - eval_start
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
            print(f"{line} | {(step / (elapsed - eval_time)):.0f} updates/s | {left / 60:.1f} min left", flush=True)
            interval_start, interval_steps = time.perf_counter(), 0

    if scores:
        print(f"final score (mean of the last 3 evaluations): {np.mean(scores[-3:]):.1f}")
    if args.save_model:
        path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save({
            "algorithm": "cql_continuous",
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "actor": agent.actor.state_dict(),
            "critic": agent.critic.state_dict(),
            "target_critic": agent.target_critic.state_dict(),
            "log_alpha": agent.log_alpha.detach().cpu(),
            "log_alpha_prime": agent.log_alpha_prime.detach().cpu(),
            "obs_dim": obs_dim,
            "action_dim": action_dim,
            "obs_mean": stats["obs_mean"].cpu(),
            "obs_std": stats["obs_std"].cpu(),
            "action_low": torch.as_tensor(low),
            "action_high": torch.as_tensor(high),
            "reward_scale": scale,
            "reward_bias": args.reward_bias,
            "env_spec": env_spec.to_json(),
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
        }, path)
        print(f"saved {path}")
    env.close()
    writer.close()
