"""Implicit Q-Learning (IQL): offline RL that never queries the value of an action outside the dataset.

Kostrikov, Nair, Levine (2021), "Offline Reinforcement Learning with Implicit Q-Learning", arXiv:2110.06169.
A state value V(s) is fitted by expectile regression to Q(s, a) over the dataset's actions only, so V approximates
the best in-distribution action's value (Eq. 5); Q is fitted to r + gamma * V(s') (Eq. 6); the policy is extracted by
advantage-weighted regression (Eq. 7):
    L_V  = E[ |tau - 1(Q(s,a) - V(s) < 0)| (Q(s,a) - V(s))^2 ]
    L_Q  = E[ (r + gamma * (1 - done) * V(s') - Q(s,a))^2 ]
    L_pi = -E[ min(exp(beta * (Q(s,a) - V(s))), 100) * log pi(a|s) ]
Run: python iql.py --dataset-id mujoco/hopper/medium-v0 --expectile 0.7 --temperature 3.0
"""

import ctypes
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
    """z-score observations with dataset statistics (CORL's choice; the official IQL code does not)"""
    save_model: bool = True
    """save a checkpoint to runs/{run_name}/{exp_name}.pt at the end"""
    checkpoint: Optional[str] = None
    """path of a saved checkpoint: evaluate it and exit, training nothing"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name} (needs moviepy)"""

    # Algorithm specific arguments
    actor_lr: float = 3e-4
    """actor learning rate (decayed to 0 by a cosine schedule over total_steps)"""
    critic_lr: float = 3e-4
    """learning rate of the twin Q networks"""
    value_lr: float = 3e-4
    """learning rate of V"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of every network"""
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    expectile: float = 0.7
    """expectile tau of the value loss, in (0, 1): 0.5 is a mean, towards 1 a max (locomotion 0.7, AntMaze 0.9)"""
    temperature: float = 3.0
    """inverse temperature beta of the advantage weights: 0 is behaviour cloning (locomotion 3, AntMaze 10)"""
    max_weight: float = 100.0
    """clip of the advantage weights exp(beta * A)"""
    dropout: float = 0.0
    """dropout rate of the actor's hidden layers (Adroit/Kitchen 0.1)"""
    normalize_reward: bool = True
    """scale rewards by 1000 / (max - min episode return), the paper's locomotion setting"""
    reward_shift: float = 0.0
    """added to every reward after scaling (AntMaze: -1 with --no-normalize-reward)"""


def fail(message: str):
    """A user's mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args):
    if not 0.0 < args.expectile < 1.0:
        fail(f"--expectile must lie in (0, 1), got {args.expectile} (the paper: 0.7 for locomotion, 0.9 for AntMaze)")
    if args.temperature < 0:
        fail(f"--temperature must be >= 0, got {args.temperature}")
    if not 0.0 < args.tau <= 1.0:
        fail(f"--tau must lie in (0, 1], got {args.tau}")
    if not 0.0 <= args.dropout < 1.0:
        fail(f"--dropout must lie in [0, 1), got {args.dropout}")
    for name in ("total_steps", "batch_size", "eval_every", "log_every"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_episodes < 0:
        fail(f"--eval-episodes must be >= 0, got {args.eval_episodes}")
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
        fail(f"IQL here needs continuous (Box) actions; this dataset has {action_space}: pick a continuous one")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail("the action space is unbounded; IQL's actions are rescaled to [-1, 1] and need finite Box bounds")
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


def reward_scale(episode_returns: np.ndarray) -> float:
    """The official locomotion setting: rewards * 1000 / (max episode return - min episode return)."""
    spread = float(np.max(episode_returns) - np.min(episode_returns)) if len(episode_returns) > 1 else 0.0
    return 1000.0 / spread if spread > 0 else 1.0


def scale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Map the Box bounds to [-1, 1], which the tanh mean of the policy assumes."""
    return 2.0 * (actions - low) / (high - low) - 1.0


def unscale_actions(actions: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    return low + (actions + 1.0) * 0.5 * (high - low)


# ---- Networks --------------------------------------------------------------------------------------------------------
def mlp(in_dim: int, hidden_dims, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    layers, d = [], in_dim
    for h in hidden_dims:
        layers += [nn.Linear(d, h), nn.ReLU(inplace=True)] + ([nn.Dropout(dropout)] if dropout > 0 else [])
        d = h
    layers.append(nn.Linear(d, out_dim))
    # The official code initializes every layer orthogonally with gain sqrt(2) and zero biases.
    for m in layers:
        if isinstance(m, nn.Linear):
            nn.init.orthogonal_(m.weight, gain=np.sqrt(2))
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class TwinQ(nn.Module):
    """Q1 and Q2 as one network with stacked weights: each layer is a single batched operation over both
    members instead of two module calls, which halves the per-op overhead that dominates small networks."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_q: int = 2):
        super().__init__()
        dims = [obs_dim + action_dim, *hidden_dims, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            w = torch.empty(num_q, d_in, d_out)
            for i in range(num_q):
                nn.init.orthogonal_(w[i].T, gain=np.sqrt(2))  # same init as one nn.Linear per member
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(num_q, 1, d_out)))
        self.num_q = num_q

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Returns Q values of shape (num_q, batch)."""
        x = torch.cat([obs, actions], dim=-1).expand(self.num_q, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i < len(self.weights) - 1:
                x = torch.relu_(torch.baddbmm(b, x, w))  # in place: baddbmm's backward needs only its inputs
            else:
                # One output unit as a product and a sum: as a matmul, its input gradient is an outer product that a
                # CPU's batched GEMM computes several times slower than this elementwise backward.
                x = (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)
        return x


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, hidden_dims):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 1)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1)


class GaussianPolicy(nn.Module):
    """The official IQL actor: mean tanh(f(s)), a state-independent log-std parameter clipped to [-5, 2], no tanh
    squashing of the samples. Evaluation acts with the mean."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, dropout: float = 0.0):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, action_dim, dropout)
        self.log_std = nn.Parameter(torch.zeros(action_dim))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(obs))

    def log_prob(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        mean = self(obs)
        log_std = self.log_std.clamp(-5.0, 2.0)
        z = (actions - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * np.log(2 * np.pi)).sum(-1)


# ---- Losses (paper equations) ----------------------------------------------------------------------------------------
def expectile_loss(diff: torch.Tensor, expectile: float) -> torch.Tensor:
    """Eq. 5, elementwise: |tau - 1(u < 0)| * u^2 with u = Q(s,a) - V(s); weight tau above V, 1 - tau below."""
    weight = torch.where(diff > 0, expectile, 1.0 - expectile)
    return weight * diff.pow(2)


def advantage_weights(advantage: torch.Tensor, temperature: float, max_weight: float) -> torch.Tensor:
    """Eq. 7: exp(beta * A), clipped above as in the official code so a few large advantages cannot dominate."""
    return torch.exp(temperature * advantage).clamp(max=max_weight)


def td_target(rewards: torch.Tensor, terminals: torch.Tensor, next_v: torch.Tensor, discount: float) -> torch.Tensor:
    """Eq. 6: r + gamma * (1 - terminal) * V(s'); V replaces max_a' Q(s', a'), so no out-of-data action is queried."""
    return rewards + discount * (1.0 - terminals) * next_v


class IQL:
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        self.args = args
        self.actor = GaussianPolicy(obs_dim, action_dim, args.hidden_dims, args.dropout).to(device)
        self.critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.value = ValueNet(obs_dim, args.hidden_dims).to(device)
        self.target_critic = TwinQ(obs_dim, action_dim, args.hidden_dims).to(device)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        # fused: one kernel per optimizer instead of a loop over parameters (8% more updates/s on a CPU).
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=args.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr, fused=True)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=args.value_lr, fused=True)
        self.actor_schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.actor_opt, T_max=args.total_steps)

    def update(self, obs, actions, rewards, next_obs, terminals) -> dict:
        """One gradient step on V, then the actor and Q, in the official code's order. Returns detached tensors only:
        reading them (a host sync) is left to the caller at log time."""
        a = self.args
        with torch.no_grad():
            target_q = self.target_critic(obs, actions).min(0).values  # min over the twin targets

        # (1) V by expectile regression towards the target Q of the dataset's actions (Eq. 5).
        v = self.value(obs)
        value_loss = expectile_loss(target_q - v, a.expectile).mean()
        self.value_opt.zero_grad(set_to_none=True)
        value_loss.backward()
        self.value_opt.step()

        # (2) The updated V gives the advantage for the actor and V(s') for the Q target; one pass over [s; s'].
        with torch.no_grad():
            v_obs, v_next = self.value(torch.cat([obs, next_obs])).chunk(2)
            advantage = target_q - v_obs
            weights = advantage_weights(advantage, a.temperature, a.max_weight)
            q_target = td_target(rewards, terminals, v_next, a.discount)

        # (3) Advantage-weighted regression (Eq. 7) and the Q regression (Eq. 6). The two losses share no parameters,
        # so one backward pass through their sum gives each network exactly its own gradient.
        actor_loss = -(weights * self.actor.log_prob(obs, actions)).mean()
        q = self.critic(obs, actions)
        critic_loss = (q - q_target).pow(2).mean(1).sum()  # the official sum of both members' MSE
        self.actor_opt.zero_grad(set_to_none=True)
        self.critic_opt.zero_grad(set_to_none=True)
        (actor_loss + critic_loss).backward()
        self.actor_opt.step()
        self.critic_opt.step()
        self.actor_schedule.step()

        # (4) Polyak averaging of the target Q networks.
        with torch.no_grad():
            torch._foreach_lerp_(list(self.target_critic.parameters()), list(self.critic.parameters()), a.tau)

        return {
            "losses/value_loss": value_loss.detach(),
            "losses/actor_loss": actor_loss.detach(),
            "losses/critic_loss": critic_loss.detach(),
            "values/q_data": q.detach().mean(),
            "values/v": v.detach().mean(),
            "values/advantage_mean": advantage.mean(),
            "values/advantage_std": advantage.std(),
            "values/weight_mean": weights.mean(),
            "values/weight_clipped_frac": (weights >= a.max_weight).float().mean(),
            "charts/actor_lr": torch.tensor(self.actor_schedule.get_last_lr()[0]),
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
            action = actor(x.unsqueeze(0))[0].cpu().numpy()
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
    if not isinstance(ckpt, dict) or ckpt.get("algorithm") != "iql":
        fail(f"'{path}' is not an iql.py checkpoint")
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
    actor = GaussianPolicy(ckpt["obs_dim"], ckpt["action_dim"], saved["hidden_dims"], saved["dropout"]).to(device)
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
    # The official code clips dataset actions slightly inside the bounds before their log-likelihood is taken.
    data["actions"] = np.clip(scale_actions(data["actions"], low, high), -1 + 1e-5, 1 - 1e-5)
    obs_mean, obs_std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    if not args.normalize_states:
        obs_mean, obs_std = np.zeros_like(obs_mean), np.ones_like(obs_std)
    scale = reward_scale(data["episode_returns"]) if args.normalize_reward else 1.0
    n = len(data["rewards"])
    # One (N, row) tensor: a minibatch is one gather, then views.
    table = torch.as_tensor(np.concatenate([
        (data["observations"] - obs_mean) / obs_std,
        data["actions"],
        (data["rewards"] * scale + args.reward_shift)[:, None],
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

    agent = IQL(obs_dim, action_dim, args, device)
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
            "algorithm": "iql",
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "actor": agent.actor.state_dict(),
            "critic": agent.critic.state_dict(),
            "target_critic": agent.target_critic.state_dict(),
            "value": agent.value.state_dict(),
            "obs_dim": obs_dim,
            "action_dim": action_dim,
            "obs_mean": stats["obs_mean"].cpu(),
            "obs_std": stats["obs_std"].cpu(),
            "action_low": torch.as_tensor(low),
            "action_high": torch.as_tensor(high),
            "reward_scale": scale,
            "env_spec": env_spec.to_json(),
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
        }, path)
        print(f"saved {path}")
    env.close()
    writer.close()
