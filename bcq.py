"""Batch-Constrained deep Q-learning (BCQ) for continuous actions.

Fujimoto, Meger, Precup (2019), "Off-Policy Deep Reinforcement Learning without Exploration", arXiv:1812.02900.
Offline, Q-learning's max over actions picks actions the data never contains, whose values are pure extrapolation.
BCQ only considers actions close to the data: a conditional VAE G(s) models the dataset's actions, a perturbation
network xi(s, a) shifts a sampled action by at most phi, and the policy is the best of n such candidates (Eq. 11):
    pi(s) = argmax_{a_i + xi(s, a_i)} Q1(s, a_i + xi(s, a_i)),   a_i ~ G(s), i = 1..n
Critic targets use the same candidates with a soft clipped double Q (Eq. 13):
    y = r + gamma * (1 - done) * max_{a_i} [lambda * min(Q1', Q2') + (1 - lambda) * max(Q1', Q2')](s', a_i)
Run: python bcq.py --dataset-id mujoco/hopper/medium-v0 --phi 0.05
"""

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
    batch_size: int = 100
    """minibatch size (the paper's 100)"""
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

    # Algorithm specific arguments
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient (actor and critic targets)"""
    actor_lr: float = 1e-3
    """learning rate of the perturbation network"""
    critic_lr: float = 1e-3
    """learning rate of the twin Q networks (Adam for every network, as in the official code)"""
    vae_lr: float = 1e-3
    """learning rate of the conditional VAE"""
    hidden_dims: tuple[int, ...] = (400, 300)
    """hidden layer sizes of the perturbation and Q networks"""
    vae_hidden_dims: tuple[int, ...] = (750, 750)
    """hidden layer sizes of the VAE's encoder and decoder"""
    phi: float = 0.05
    """largest perturbation, as a fraction of the action range's half-width"""
    lmbda: float = 0.75
    """weight of min(Q1, Q2) in the soft clipped double-Q target; 1 is clipped double Q"""
    num_candidates: int = 100
    """actions sampled from the VAE and perturbed when acting (the official code: 100; some versions 10)"""
    num_target_candidates: int = 10
    """actions sampled per next state for the critic target"""
    kl_weight: float = 0.5
    """weight of the KL term in the VAE loss"""


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
def mlp(in_dim: int, hidden_dims, out_dim: int) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


class VAE(nn.Module):
    """Conditional VAE of the dataset's actions given the state (Section 4.2). Encoder (s, a) -> N(mu, sigma) over a
    latent of size 2|A|; decoder (s, z) -> tanh, so decoded actions stay inside [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims):
        super().__init__()
        self.latent_dim = 2 * action_dim
        self.encoder = mlp(obs_dim + action_dim, hidden_dims, 2 * self.latent_dim)
        self.decoder = mlp(obs_dim + self.latent_dim, hidden_dims, action_dim)

    def forward(self, obs: torch.Tensor, actions: torch.Tensor):
        mean, log_std = self.encoder(torch.cat([obs, actions], -1)).chunk(2, dim=-1)
        std = log_std.clamp(-4, 15).exp()  # the official clamp, for numerical stability
        z = mean + std * torch.randn_like(std)
        return self.decode(obs, z), mean, std

    def decode(self, obs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        if z is None:
            # Sampling from the prior: the latent is clipped to [-0.5, 0.5], so only likely actions come out.
            z = torch.randn(obs.shape[0], self.latent_dim, device=obs.device).clamp(-0.5, 0.5)
        return torch.tanh(self.decoder(torch.cat([obs, z], -1)))


class Perturbation(nn.Module):
    """xi_phi(s, a): a shift of at most phi (in units of the [-1, 1] action range), added to a and clamped to it."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, phi: float):
        super().__init__()
        self.net = mlp(obs_dim + action_dim, hidden_dims, action_dim)
        self.phi = phi

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        shift = self.phi * torch.tanh(self.net(torch.cat([obs, actions], -1)))
        return (actions + shift).clamp(-1.0, 1.0)


class TwinQ(nn.Module):
    """Q1 and Q2 as one network with stacked weights: each layer is a single batched operation over both
    members instead of two module calls, which halves the per-op overhead that dominates small networks."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_q: int = 2):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1 / np.sqrt(d_in)  # nn.Linear's default init, per member
            self.weights.append(nn.Parameter(torch.empty(num_q, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, d_out).uniform_(-bound, bound)))
        self.num_q = num_q

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, member: int | None = None,
                detach_params: bool = False) -> torch.Tensor:
        """Q values of shape (num_q, batch), or (1, batch) for one member (the actor needs Q1 only). With
        detach_params, gradients reach the actions but not the weights: the actor's loss must not train the critic
        (and skips their weight gradients)."""
        members = slice(None) if member is None else slice(member, member + 1)
        params = [(w[members], b[members]) for w, b in zip(self.weights, self.biases)]
        if detach_params:
            params = [(w.detach(), b.detach()) for w, b in params]
        x = torch.cat([obs, actions], dim=-1).expand(self.num_q if member is None else 1, -1, -1)
        for i, (w, b) in enumerate(params):
            if i < len(self.weights) - 1:
                x = torch.relu_(torch.baddbmm(b, x, w))  # in place: baddbmm's backward needs only its inputs
            else:
                # One output unit as a product and a sum: as a matmul, its input gradient is an outer product that a
                # CPU's batched GEMM computes several times slower than this elementwise backward.
                x = (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)
        return x


# ---- The algorithm: losses (paper equations), then the agent and its update -----------------------------------------
def vae_loss(recon: torch.Tensor, actions: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kl_weight: float):
    """Reconstruction MSE plus kl_weight * KL(N(mean, std) || N(0, 1)), both averaged over elements as in the
    official code. Returns (total, reconstruction, KL)."""
    recon_loss = (recon - actions).pow(2).mean()
    kl = -0.5 * (1 + torch.log(std.pow(2)) - mean.pow(2) - std.pow(2)).mean()
    return recon_loss + kl_weight * kl, recon_loss, kl


def soft_clipped_double_q(q: torch.Tensor, lmbda: float) -> torch.Tensor:
    """Eq. 13's convex combination over the two target networks (q: (2, ...)): lambda weights the pessimistic one."""
    return lmbda * q.min(0).values + (1.0 - lmbda) * q.max(0).values


def bcq_target(rewards, terminals, next_q: torch.Tensor, lmbda: float, discount: float) -> torch.Tensor:
    """next_q: (2, batch, n) target values of n perturbed VAE candidates per next state. The soft clipped double Q of
    each candidate, then the max over candidates, bootstrapped unless the transition terminated."""
    value = soft_clipped_double_q(next_q, lmbda).max(-1).values
    return rewards + discount * (1.0 - terminals) * value


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args = args
        self.vae = VAE(obs_dim, action_dim, args.vae_hidden_dims)
        self.actor = Perturbation(obs_dim, action_dim, args.hidden_dims, args.phi)
        self.critic = TwinQ(obs_dim, action_dim, args.hidden_dims)
        self.target_actor = Perturbation(obs_dim, action_dim, args.hidden_dims, args.phi)
        self.target_critic = TwinQ(obs_dim, action_dim, args.hidden_dims)
        for target, online in ((self.target_actor, self.actor), (self.target_critic, self.critic)):
            target.load_state_dict(online.state_dict())
            target.requires_grad_(False)
        self.to(device)
        # fused: one kernel per optimizer (about 8% more updates/s on a CPU); capturable: cuda_graph can capture it.
        adam = {"fused": True, "capturable": device.type == "cuda" and args.cudagraphs}
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, **adam)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, **adam)
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=args.vae_lr, **adam)
        self.online = list(self.actor.parameters()) + list(self.critic.parameters())
        self.targets = list(self.target_actor.parameters()) + list(self.target_critic.parameters())

    def update(self, obs, actions, rewards, next_obs, terminals) -> dict:
        """One step on the VAE, then the critics, then the perturbation network, in the official code's order (each
        uses the networks the previous ones just updated). Returns detached tensors only."""
        a, batch = self.args, obs.shape[0]

        # (1) The generative model of the data's actions.
        recon, mean, std = self.vae(obs, actions)
        loss_vae, recon_loss, kl = vae_loss(recon, actions, mean, std, a.kl_weight)
        self.vae_opt.zero_grad(set_to_none=True)
        loss_vae.backward()
        self.vae_opt.step()

        # (2) The critics, towards the best of n perturbed VAE candidates at s' under the target networks (Eq. 13).
        with torch.no_grad():
            n = a.num_target_candidates
            next_rep = next_obs.repeat_interleave(n, 0)
            next_actions = self.target_actor(next_rep, self.vae.decode(next_rep))
            next_q = self.target_critic(next_rep, next_actions).view(2, batch, n)
            q_target = bcq_target(rewards, terminals, next_q, a.lmbda, a.discount)
        q = self.critic(obs, actions)
        critic_loss = (q - q_target).pow(2).mean(1).sum()  # the official sum of both members' MSE
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # (3) The perturbation network climbs Q1 from VAE samples (deterministic policy gradient, Eq. 12).
        with torch.no_grad():
            sampled = self.vae.decode(obs)
        perturbed = self.actor(obs, sampled)
        actor_loss = -self.critic(obs, perturbed, member=0, detach_params=True).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        # (4) Polyak averaging of the target networks.
        with torch.no_grad():
            torch._foreach_lerp_(self.targets, self.online, a.tau)

        return {
            "losses/critic_loss": critic_loss.detach(),
            "losses/actor_loss": actor_loss.detach(),
            "values/q_data": q.detach().mean(),
            "losses/vae_loss": loss_vae.detach(),
            "values/vae_recon": recon_loss.detach(),
            "values/vae_kl": kl.detach(),
            "values/q_perturbed": -actor_loss.detach(),
            "values/perturbation": (perturbed.detach() - sampled).abs().mean(),
            "values/q_target": q_target.mean(),
        }

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Eq. 11 for a batch of states: n VAE candidates each, perturbed, the one with the highest Q1 kept. The
        candidates are random, but the argmax over Q1 makes the policy close to deterministic."""
        batch, n = obs.shape[0], self.args.num_candidates
        rep = obs.repeat_interleave(n, 0)
        candidates = self.actor(rep, self.vae.decode(rep))
        best = self.critic(rep, candidates, member=0).view(batch, n).argmax(1)
        return candidates.view(batch, n, -1)[torch.arange(batch, device=obs.device), best]


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


# ---- Main ------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    stop = stop_on_signals({})
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    validate(args, {
        f"--tau must lie in (0, 1], got {args.tau}": 0.0 < args.tau <= 1.0,
        f"--phi must lie in [0, 1], got {args.phi} (the paper uses 0.05)": 0.0 <= args.phi <= 1.0,
        f"--lmbda must lie in [0, 1], got {args.lmbda} (the paper uses 0.75)": 0.0 <= args.lmbda <= 1.0,
        "--num-candidates and --num-target-candidates must be >= 1": min(args.num_candidates,
                                                                          args.num_target_candidates) >= 1,
        f"--vae-hidden-dims needs positive sizes, got {args.vae_hidden_dims}": min(args.vae_hidden_dims, default=0) > 0,
    })
    args, ckpt = load_checkpoint(args) if args.checkpoint or args.resume else (args, {})
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if args.checkpoint:
        sys.exit(evaluate_checkpoint(args, ckpt, device))

    data, task = load_data(args, device)
    table, split = transition_table(data, task)
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
    train_step = cuda_graph(lambda: agent.update(*minibatch(table, split, args.batch_size)), args, device)
    loop = restore(ckpt, agent) if ckpt else {"step": 0, "scores": [], "elapsed": 0.0, "carry": {}}
    step, scores, eval_time, interval_steps, last = loop["step"], loop["scores"], 0.0, 0, args.total_steps
    first, train_start, interval_start = step, time.perf_counter(), time.perf_counter()  # this session's stretch
    carry = lambda: {}  # what BCQ keeps between steps beyond the agent and its optimizers: nothing  # noqa: E731
    state = lambda: {"step": step, "last": last, "scores": scores, "carry": carry(),  # noqa: E731
                     "elapsed": loop["elapsed"] + time.perf_counter() - train_start}  # the loop's part of a checkpoint
    stop["armed"] = True  # from here on, SIGTERM and SIGINT stop the run after a whole step, saved
    for step in range(step + 1, last + 1):
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
