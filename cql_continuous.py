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
import signal
import sys
import time
import warnings
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
    """z-score observations with dataset statistics (CORL's choice; the official code does not)"""
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
    online_steps: int = 0
    """fine-tuning: environment steps after the offline updates, each followed by --utd updates (0: offline only)"""
    utd: int = 1
    """updates per online environment step (the update-to-data ratio)"""
    online_ratio: float | None = None
    """share of each batch from online rows (0.5: symmetric); default: all rows alike, or online only from scratch"""

    # Algorithm specific arguments
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    actor_lr: float = 1e-4
    """policy learning rate (official code 1e-4; CORL uses 3e-5)"""
    critic_lr: float = 3e-4
    """learning rate of the twin Q networks"""
    alpha_lr: float = 1e-4
    """learning rate of the SAC entropy temperature (the official code uses the policy's)"""
    hidden_dims: tuple[int, ...] = (256, 256, 256)
    """hidden layer sizes of the policy and Q networks (official: three layers of 256)"""
    target_entropy: float | None = None
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
    calql: bool = False
    """Cal-QL: the regularizer's policy-action Q values no lower than the data's Monte Carlo return-to-go"""


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


def returns_to_go(rewards: np.ndarray, lengths, discount: float) -> np.ndarray:
    """Cal-QL's G(s_t) = sum_k gamma^k r_(t+k) to the end of s_t's episode, truncated or not: nothing bootstrapped."""
    out, ends, g = np.zeros_like(rewards), set(np.cumsum(lengths) - 1), 0.0
    for i in range(len(rewards) - 1, -1, -1):
        g = out[i] = rewards[i] + discount * g * (i not in ends)
    return out


def minibatch(table: torch.Tensor, split: list, batch_size: int) -> tuple:
    """Transitions drawn uniformly with replacement on the device; rewards and terminals come out as (batch,)."""
    idx = torch.randint(len(table), (batch_size,), device=table.device)
    obs, actions, rewards, next_obs, terminals, *more = table[idx].split(split, dim=1)  # more: extra columns (--calql)
    return obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1), *(c.squeeze(1) for c in more)


# ---- Networks --------------------------------------------------------------------------------------------------------
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


def sample_tanh_gaussian(mean: torch.Tensor, log_std: torch.Tensor, n: int | None = None):
    """Reparameterized samples a = tanh(mean + std * eps) and their log-density; with n, n actions per state (batch,
    n, A) from one network pass (the official code re-runs the network on n copies of each state: n times the cost)."""
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


# ---- The algorithm: losses (paper equations), then the agent and its update -----------------------------------------
def cql_logsumexp(q_rand, q_pi, q_pi_next, q_data, action_dim: int, log_pi, log_pi_next, temp: float,
                  importance_sampling: bool) -> torch.Tensor:
    """Eq. 4's first term, log sum_a exp(Q(s, a) / temp) * temp per state, from (num_q, batch, n) values at s of
    uniform (q_rand), pi(s) (q_pi) and pi(s') (q_pi_next) actions. With importance sampling (Appendix F) each is
    divided by its proposal density (uniform on [-1, 1]^d: d * log(0.5); a policy sample: its log pi) and the data
    action is left out; without it (official version 2) the 3n samples and the data action enter unweighted."""
    if importance_sampling:
        cat = torch.cat([q_rand - action_dim * math.log(0.5), q_pi_next - log_pi_next, q_pi - log_pi], dim=-1)
    else:
        cat = torch.cat([q_rand, q_data.unsqueeze(-1), q_pi_next, q_pi], dim=-1)
    return torch.logsumexp(cat / temp, dim=-1) * temp


def sac_target(rewards, terminals, next_q, discount: float, alpha=None, next_log_pi=None) -> torch.Tensor:
    """r + gamma * (1 - terminal) * (min_i Q_target_i(s', a') [- alpha * log pi(a'|s')]): official CQL drops the
    entropy term (a deterministic backup) unless asked for it."""
    if alpha is not None:
        next_q = next_q - alpha * next_log_pi
    return rewards + discount * (1.0 - terminals) * next_q


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
        self.log_alpha_prime = nn.Parameter(torch.zeros(1))
        self.register_buffer("steps", torch.zeros(()))  # updates so far, counted on the device like everything else
        self.to(device)
        # fused: one kernel per optimizer (about 8% more updates/s on a CPU); capturable: cuda_graph can capture it.
        adam = {"fused": True, "capturable": device.type == "cuda" and args.cudagraphs}
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, **adam)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], args.alpha_lr, capturable=adam["capturable"])
        self.alpha_prime_opt = torch.optim.Adam([self.log_alpha_prime], args.critic_lr, capturable=adam["capturable"])
        self.online, self.targets = list(self.critic.parameters()), list(self.target_critic.parameters())

    def losses(self, obs, actions, rewards, next_obs, terminals, policy_sample=None, rtg=None) -> dict:
        """The step's losses with their graphs: the policy's (SAC, or the BC warm start), the critic's (Bellman error
        plus the conservative term, sampled actions and log-probs detached) and alpha''s; policy_sample = (mean,
        log_std, action, log_pi) of pi(.|s), drawn here if not given."""
        a, n, (batch, action_dim) = self.args, self.args.cql_n_actions, actions.shape
        mean, log_std = policy_sample[:2] if policy_sample else self.actor(obs)
        new_actions, log_pi = policy_sample[2:] if policy_sample else sample_tanh_gaussian(mean, log_std)
        alpha = self.log_alpha.detach().exp()

        # The policy maximizes min Q - alpha * log pi (SAC); the critic's weights are detached so this loss trains the
        # policy alone. The optional warm start clones the data's actions for the first bc_steps updates instead.
        policy_loss = (alpha * log_pi - self.critic(obs, new_actions, detach_params=True).min(0).values).mean()
        if a.bc_steps > 0:
            bc_loss = (alpha * log_pi - tanh_gaussian_log_prob(mean, log_std, actions)).mean()
            policy_loss = torch.where(self.steps < a.bc_steps, bc_loss, policy_loss)

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
            rand_actions = torch.empty(batch, n, action_dim, device=obs.device).uniform_(-1, 1)
            pi_actions, pi_log_pi = sample_tanh_gaussian(mean.detach(), log_std.detach(), n)
            pi_next_actions, pi_next_log_pi = sample_tanh_gaussian(next_mean, next_log_std, n)

        # The critic: every (s, a) pair this step needs goes through both Q networks in one batched call.
        all_actions = torch.cat([actions.unsqueeze(1), rand_actions, pi_actions, pi_next_actions], dim=1)
        q_all = self.critic(obs.repeat_interleave(1 + 3 * n, 0), all_actions.reshape(batch * (1 + 3 * n), -1))
        q_all = q_all.view(2, batch, 1 + 3 * n)
        q_data, q_rand, q_pi, q_pi_next = q_all[..., 0], *q_all[..., 1:].split(n, dim=-1)
        if rtg is not None:  # Cal-QL: the policy actions' values pushed down no lower than the data's return-to-go
            floor = rtg[:, None]
            q_pi, q_pi_next, below = q_pi.clamp(min=floor), q_pi_next.clamp(min=floor), (q_pi < floor).float().mean()
        # Each member's plain MSE, as the official code has it (no 1/2: it sets the scale cql_alpha is tuned against).
        bellman = (q_data - q_target).pow(2).mean(1).sum()
        logsumexp = cql_logsumexp(q_rand, q_pi, q_pi_next, q_data, action_dim, pi_log_pi, pi_next_log_pi, a.cql_temp,
                                  a.importance_sampling)
        gap = (logsumexp - q_data).mean(1)  # per Q network: soft max over actions minus the value of the data's
        conservative = a.cql_alpha * gap
        if a.lagrange_gap > 0:
            # Lagrange variant: alpha' grows while the weighted gap exceeds the target and shrinks below it.
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            alpha_prime_loss = -(alpha_prime * (conservative.detach() - a.lagrange_gap)).mean()
            conservative = alpha_prime.detach() * (conservative - a.lagrange_gap)
        else:
            alpha_prime, alpha_prime_loss = torch.ones_like(self.log_alpha_prime), obs.new_zeros(())
        # The three losses with their graphs, then the step's diagnostics under their logging tags.
        conservative = conservative.sum()
        return {"policy_loss": policy_loss, "critic_loss": bellman + conservative, "conservative": conservative,
                "alpha_prime_loss": alpha_prime_loss, "gap": gap, "losses/bellman_loss": bellman.detach(),
                "losses/alpha": alpha.squeeze(), "losses/alpha_prime": alpha_prime.detach().squeeze(),
                "values/q_data": q_data.detach().mean(), "values/q_random": q_rand.detach().mean(),
                "values/q_policy": q_pi.detach().mean(), "values/q_ood": logsumexp.detach().mean(),
                "values/cql_gap": gap.detach().mean(), "values/q_target": q_target.mean(),
                **({"values/calql_floored": below} if rtg is not None else {})}

    def update(self, obs, actions, rewards, next_obs, terminals, rtg=None) -> dict:
        """One step on alpha, then the policy, the critics and alpha', in the official trainer's order."""
        # SAC's temperature first, towards the entropy target; the policy's loss then uses the updated alpha.
        mean, log_std = self.actor(obs)
        new_actions, log_pi = sample_tanh_gaussian(mean, log_std)
        alpha_loss = -(self.log_alpha * (log_pi.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        out = self.losses(obs, actions, rewards, next_obs, terminals, (mean, log_std, new_actions, log_pi), rtg)
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
            torch._foreach_lerp_(self.targets, self.online, self.args.tau)
        self.steps += 1
        return {
            "losses/critic_loss": out["critic_loss"].detach(),
            "losses/actor_loss": out["policy_loss"].detach(),
            "losses/cql_loss": out["conservative"].detach(),
            "losses/alpha_loss": alpha_loss.detach(),
            "values/entropy": -log_pi.detach().mean(),
            **{k: v for k, v in out.items() if "/" in k},
        }

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Evaluation acts with the mean action, tanh(mu)."""
        return torch.tanh(self.actor(obs)[0])

    def explore(self, obs: torch.Tensor) -> torch.Tensor:  # fine-tuning collects with draws from SAC's own policy
        return sample_tanh_gaussian(*self.actor(obs))[0]


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


def online_minibatch(table, split: list, batch_size: int, filled: torch.Tensor, offline: int, online_ratio):
    """minibatch from a table that grows online: uniform over its filled rows (a count on the device) or, with
    online_ratio, that share of the batch from the online rows once there are any. Integer draws: float32 rounds up."""
    share = round(batch_size * (online_ratio or 0))  # the batch's last rows: online ones, once there are any
    tail = (torch.arange(batch_size, device=table.device) >= batch_size - share) & (filled > offline)
    lo, hi = torch.where(tail, offline, 0), torch.where(tail, filled, filled if online_ratio is None else offline)
    idx = lo + torch.randint(2**62, (batch_size,), device=table.device) % (hi - lo)
    obs, actions, rewards, next_obs, terminals, *more = table[idx].split(split, dim=1)
    return obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1), *(c.squeeze(1) for c in more)


def collect(agent: nn.Module, table: torch.Tensor, online: dict, task: dict, writer, step: int):
    """Fine-tuning: one exploration step in online["env"], made the table's next row the way the dataset's rows were."""
    mean, std, low, high = (task[k] for k in ("obs_mean", "obs_std", "action_low", "action_high"))
    if online["obs"] is None:  # episodes seeded apart from the evaluation's (seed + i)
        online["obs"] = online["env"].reset(seed=online["seed"] + online["episodes"])[0]
    obs = (torch.as_tensor(online["obs"], dtype=torch.float32, device=mean.device) - mean) / std
    action = agent.explore(obs[None])[0].detach()
    online["obs"], reward, terminated, truncated, _ = online["env"].step(
        (low + (action + 1.0) * 0.5 * (high - low)).cpu().numpy())
    next_obs = (torch.as_tensor(online["obs"], dtype=torch.float32, device=mean.device) - mean) / std
    r, done = obs.new_tensor([float(reward) * online["scale"] + online["shift"], terminated]).split(1)  # not truncated
    table[online["rows"], :2 * len(obs) + len(action) + 2] = torch.cat([obs, action, r, next_obs, done])
    online["filled"] += 1
    online["rows"] += 1
    if terminated or truncated:
        writer.add_scalar("charts/env_steps", online["rows"] - online["offline_rows"], step)
        online.update({"obs": None, "episodes": online["episodes"] + 1})


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


# ---- Main ------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    stop = stop_on_signals({})
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    validate(args, {
        f"--tau must lie in (0, 1], got {args.tau}": 0.0 < args.tau <= 1.0,
        f"--cql-alpha must be >= 0, got {args.cql_alpha} (the paper: 5 or 10)": args.cql_alpha >= 0,
        "--cql-n-actions must be >= 1 and --cql-temp > 0": args.cql_n_actions >= 1 and args.cql_temp > 0,
        "--lagrange-gap (0: off) and --bc-steps must be >= 0": min(args.lagrange_gap, args.bc_steps) >= 0,
        f"--total-steps must be >= 1, got {args.total_steps}": args.total_steps > 0 or args.online_steps > 0,
        "--online-steps and --total-steps must be >= 0": min(args.online_steps, args.total_steps) >= 0,
        "--online-ratio must lie in [0, 1] and --utd be >= 1": 0 <= (args.online_ratio or 0) <= 1 and args.utd >= 1,
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
    rewards = data["rewards"] * args.reward_scale + args.reward_bias
    table, split = transition_table({**data, "rewards": rewards}, task)
    online = {"obs": None, "rows": len(table), "offline_rows": len(table), "episodes": 0, "scale": args.reward_scale,
              "shift": args.reward_bias, "seed": args.seed + 10**6, "filled": torch.tensor(len(table), device=device),
              "env": make_eval_envs(task, 1, None)[0] if args.online_steps else None}  # the training environment
    if args.calql:  # one more column, G; -inf (no floor) in an online row until its episode has ended
        g = torch.as_tensor(returns_to_go(rewards, data["episode_lengths"], args.discount), device=device)
        table, split = torch.cat([table, g[:, None]], 1), [*split, 1]
    table = torch.cat([table, table.new_full((args.online_steps, table.shape[1]), -torch.inf)])  # room for online rows
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

    agent = Agent(split[0], split[1], args, device)
    ratio = 1.0 if args.online_ratio is None and args.total_steps == 0 else args.online_ratio  # from scratch: online
    sample = lambda: online_minibatch(  # noqa: E731  (offline only: minibatch, the published runs' draws, bit for bit)
        table, split, args.batch_size, online["filled"], online["offline_rows"], ratio
    ) if args.online_steps else minibatch(table, split, args.batch_size)
    train_step = cuda_graph(lambda: agent.update(*sample()), args, device)
    loop = restore(ckpt, agent) if ckpt else {"step": 0, "scores": [], "elapsed": 0.0, "carry": {}}
    step, scores, eval_time, interval_steps = loop["step"], loop["scores"], 0.0, 0
    last = args.total_steps + args.online_steps * args.utd  # offline updates, then the online phase's
    first, train_start, interval_start = step, time.perf_counter(), time.perf_counter()  # this session's stretch
    carry = lambda: {"online": table[online["offline_rows"]:online["rows"]].cpu(),  # noqa: E731
                     "episodes": online["episodes"]}  # what CQL keeps between steps besides the agent
    if loop["carry"]:  # resumed: the online rows come back; the episode that was in progress starts over
        online.update(episodes=loop["carry"]["episodes"], rows=online["rows"] + len(loop["carry"]["online"]))
        table[online["offline_rows"]:online["rows"]] = loop["carry"]["online"]
        online["filled"].fill_(online["rows"])
    episode_start = online["rows"]  # Cal-QL: where the running episode's rows begin
    state = lambda: {"step": step, "last": last, "scores": scores, "carry": carry(),  # noqa: E731
                     "elapsed": loop["elapsed"] + time.perf_counter() - train_start}  # the loop's part of a checkpoint
    stop["armed"] = True  # from here on, SIGTERM and SIGINT stop the run after a whole step, saved
    for step in range(step + 1, last + 1):
        if step > args.total_steps and (step - args.total_steps - 1) % args.utd == 0:  # online: one environment step
            collect(agent, table, online, task, writer, step)
            if args.calql and online["obs"] is None:  # an episode ended: its rows get their return-to-go
                ep, episode_start = table[episode_start:online["rows"]], online["rows"]  # ep: a view of the table
                ep[:, -1] = ep.new_tensor(returns_to_go(ep[:, sum(split[:2])].cpu().numpy(), [len(ep)], args.discount))
        info = train_step()
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
