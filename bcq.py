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
    batch_size: int = 100
    """minibatch size (the paper's 100)"""
    eval_every: int = 5_000
    """gradient steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """gradient steps between loss logs"""
    normalize_states: bool = True
    """z-score observations with dataset statistics (CORL's choice; the official BCQ code does not)"""
    save_model: bool = True
    """save a checkpoint to runs/{run_name}/{exp_name}.pt at the end"""
    checkpoint: Optional[str] = None
    """path of a saved checkpoint: evaluate it and exit, training nothing"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name} (needs moviepy)"""

    # Algorithm specific arguments
    actor_lr: float = 1e-3
    """learning rate of the perturbation network"""
    critic_lr: float = 1e-3
    """learning rate of the twin Q networks"""
    vae_lr: float = 1e-3
    """learning rate of the conditional VAE"""
    hidden_dims: tuple[int, ...] = (400, 300)
    """hidden layer sizes of the perturbation and Q networks"""
    vae_hidden_dims: tuple[int, ...] = (750, 750)
    """hidden layer sizes of the VAE's encoder and decoder"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient (actor and critic targets)"""
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


def fail(message: str):
    """A user's mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args):
    if not 0.0 <= args.phi <= 1.0:
        fail(f"--phi must lie in [0, 1], got {args.phi} (the paper uses 0.05)")
    if not 0.0 <= args.lmbda <= 1.0:
        fail(f"--lmbda must lie in [0, 1], got {args.lmbda} (the paper uses 0.75)")
    if args.num_candidates < 1 or args.num_target_candidates < 1:
        fail("--num-candidates and --num-target-candidates must be >= 1")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must lie in (0, 1], got {args.tau}")
    for name in ("total_steps", "batch_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_episodes < 0:
        fail(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
    if not args.hidden_dims or min(args.hidden_dims) < 1 or not args.vae_hidden_dims or min(args.vae_hidden_dims) < 1:
        fail("--hidden-dims and --vae-hidden-dims need one or more positive sizes")


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
        fail(f"BCQ here needs continuous (Box) actions; this dataset has {action_space}: pick a continuous one")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail("the action space is unbounded; BCQ's actions are rescaled to [-1, 1] and need finite Box bounds")
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
def mlp(in_dim: int, hidden_dims, out_dim: int) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True)]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, out_dim))


class VAE(nn.Module):
    """Conditional VAE of the dataset's actions given the state (Section 4.1). Encoder (s, a) -> N(mu, sigma) over a
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

    def decode(self, obs: torch.Tensor, z: Optional[torch.Tensor] = None) -> torch.Tensor:
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
    members instead of two module calls. `member` evaluates one of them alone (the actor only needs Q1)."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_q: int = 2):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            bound = 1 / math.sqrt(d_in)  # nn.Linear's default init, per member
            self.weights.append(nn.Parameter(torch.empty(num_q, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(num_q, 1, d_out).uniform_(-bound, bound)))
        self.num_q = num_q

    def forward(self, obs: torch.Tensor, actions: torch.Tensor, member: Optional[int] = None,
                detach_params: bool = False) -> torch.Tensor:
        """Q values of shape (num_q, batch), or (1, batch) for one member. With detach_params, gradients reach the
        actions but not the weights: the actor's loss must not train the critic (and skips their weight gradients)."""
        members = slice(None) if member is None else slice(member, member + 1)
        x = torch.cat([obs, actions], dim=-1)
        x = x.expand(self.num_q if member is None else 1, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            w, b = w[members], b[members]
            if detach_params:
                w, b = w.detach(), b.detach()
            if i < len(self.weights) - 1:
                x = torch.relu_(torch.baddbmm(b, x, w))  # in place: baddbmm's backward needs only its inputs
            else:
                # One output unit as a product and a sum: as a matmul, its input gradient is an outer product that a
                # CPU's batched GEMM computes several times slower than this elementwise backward.
                x = (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)
        return x


# ---- Losses (paper equations) --------------------------------------------------------------------------------------
def vae_loss(recon: torch.Tensor, actions: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kl_weight: float):
    """Reconstruction MSE plus kl_weight * KL(N(mean, std) || N(0, 1)), both averaged over elements as in the
    official code. Returns (total, reconstruction, KL)."""
    recon_loss = F.mse_loss(recon, actions)
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


class BCQ:
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        self.args = args
        self.vae = VAE(obs_dim, action_dim, args.vae_hidden_dims).to(device)
        self.actor = Perturbation(obs_dim, action_dim, args.hidden_dims, args.phi).to(device)
        self.critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_actor = Perturbation(obs_dim, action_dim, args.hidden_dims, args.phi).to(device)
        self.target_critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_actor.load_state_dict(self.actor.state_dict())
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_actor.requires_grad_(False)
        self.target_critic.requires_grad_(False)
        # fused: one kernel per optimizer instead of a loop over parameters.
        self.vae_opt = torch.optim.Adam(self.vae.parameters(), lr=args.vae_lr, fused=True)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
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
            y = bcq_target(rewards, terminals, next_q, a.lmbda, a.discount)
        q = self.critic(obs, actions)
        critic_loss = (q - y).pow(2).mean(1).sum()  # the official sum of both members' MSE
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # (3) The perturbation network climbs Q1 from VAE samples (deterministic policy gradient, Eq. 10).
        with torch.no_grad():
            sampled = self.vae.decode(obs)
        perturbed = self.actor(obs, sampled)
        actor_loss = -self.critic(obs, perturbed, member=0, detach_params=True).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()

        # (4) Polyak averaging of both targets.
        with torch.no_grad():
            torch._foreach_lerp_(self.targets, self.online, a.tau)

        return {
            "losses/vae_loss": loss_vae.detach(),
            "losses/critic_loss": critic_loss.detach(),
            "losses/actor_loss": actor_loss.detach(),
            "values/vae_recon": recon_loss.detach(),
            "values/vae_kl": kl.detach(),
            "values/q_data": q.detach().mean(),
            "values/q_perturbed": -actor_loss.detach(),
            "values/perturbation": (perturbed.detach() - sampled).abs().mean(),
            "values/q_target": y.mean(),
        }

    @torch.no_grad()
    def act(self, obs: torch.Tensor, num_candidates: int) -> torch.Tensor:
        """Eq. 11 for a batch of states: n VAE candidates each, perturbed, the one with the highest Q1 kept."""
        batch = obs.shape[0]
        rep = obs.repeat_interleave(num_candidates, 0)
        candidates = self.actor(rep, self.vae.decode(rep))
        q1 = self.critic(rep, candidates, member=0).view(batch, num_candidates)
        best = q1.argmax(1)
        return candidates.view(batch, num_candidates, -1)[torch.arange(batch, device=obs.device), best]


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
def evaluate(env, policy, stats: dict, episodes: int, seed: int, device) -> np.ndarray:
    """policy(obs batch) -> actions; episode i starts from reset(seed=seed + i), so every evaluation sees the same start
    states. BCQ's policy samples VAE candidates, so its actions are random, but the argmax over Q1 makes them close
    to deterministic."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            x = (torch.as_tensor(obs, dtype=torch.float32, device=device) - stats["obs_mean"]) / stats["obs_std"]
            action = policy(x.unsqueeze(0))[0].cpu().numpy()
            action = unscale_actions(action, stats["action_low"], stats["action_high"])
            obs, reward, terminated, truncated, _ = env.step(action)
            total += float(reward)
            done = terminated or truncated
        returns.append(total)
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
    if not isinstance(ckpt, dict) or ckpt.get("algorithm") != "bcq":
        fail(f"'{path}' is not a bcq.py checkpoint")
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
    agent = BCQ(ckpt["obs_dim"], ckpt["action_dim"], Args(**{**saved, "checkpoint": None}), device)
    for name in ("vae", "actor", "critic"):
        getattr(agent, name).load_state_dict(ckpt[name])
    stats = {k: ckpt[k].to(device) if k.startswith("obs") else ckpt[k].numpy() for k in
             ("obs_mean", "obs_std", "action_low", "action_high")}
    run_name = f"eval__{os.path.splitext(os.path.basename(args.checkpoint))[0]}__{args.seed}__{int(time.time())}"
    env = make_eval_env(lambda **kw: gym.make(env_spec, **kw), f"videos/{run_name}" if args.capture_video else None,
                        max(args.eval_episodes, 1))
    torch.manual_seed(args.seed)
    returns = evaluate(env, lambda x: agent.act(x, saved["num_candidates"]), stats, args.eval_episodes, args.seed,
                       device)
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
    n = len(data["rewards"])
    # One (N, row) tensor: a minibatch is one gather, then views.
    table = torch.as_tensor(np.concatenate([
        (data["observations"] - obs_mean) / obs_std,
        data["actions"],
        data["rewards"][:, None],
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

    agent = BCQ(obs_dim, action_dim, args, device)
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
            returns = evaluate(env, lambda x: agent.act(x, args.num_candidates), stats, args.eval_episodes, args.seed,
                               device)
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
            "algorithm": "bcq",
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "vae": agent.vae.state_dict(),
            "actor": agent.actor.state_dict(),
            "critic": agent.critic.state_dict(),
            "target_actor": agent.target_actor.state_dict(),
            "target_critic": agent.target_critic.state_dict(),
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
        print(f"saved {path}")
    env.close()
    writer.close()
