"""Advantage-Weighted Regression (AWR), offline: weighted behaviour cloning with weights exp(advantage / beta).

Peng, Kumar, Zhang, Levine (2019), "Advantage-Weighted Regression: Simple and Scalable Off-Policy Reinforcement
Learning", arXiv:1910.00177. Each iteration fits a state value V to TD(lambda) returns of the data's episodes, then
regresses the policy onto the data's actions, each weighted by how much better than V its return was (Alg. 1):
    V     <- argmin E[ (R^lambda(s, a) - V(s))^2 ]
    pi    <- argmax E[ log pi(a|s) * min(exp((R^lambda(s, a) - V(s)) / beta), w_max) ]
On a fixed dataset the "replay buffer" is the whole dataset; beta -> infinity gives behaviour cloning.
Run: python awr.py --dataset-id mujoco/hopper/medium-v0 --temperature 1.0
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
    """number of policy gradient steps (value steps are counted separately)"""
    batch_size: int = 256
    """minibatch size"""
    eval_every: int = 5_000
    """policy gradient steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation"""
    log_every: int = 1_000
    """gradient steps between loss logs"""
    normalize_states: bool = True
    """z-score observations with dataset statistics (the original code does this too)"""
    save_model: bool = True
    """save a checkpoint to runs/{run_name}/{exp_name}.pt at the end"""
    checkpoint: Optional[str] = None
    """path of a saved checkpoint: evaluate it and exit, training nothing"""
    capture_video: bool = False
    """record the first episode of every evaluation to videos/{run_name} (needs moviepy)"""

    # Algorithm specific arguments
    actor_lr: float = 5e-5
    """policy learning rate (SGD with momentum, as in the original code)"""
    value_lr: float = 0.01
    """value-function learning rate (SGD with momentum)"""
    momentum: float = 0.9
    """SGD momentum of both optimizers"""
    hidden_dims: tuple[int, ...] = (128, 64)
    """hidden layer sizes of the policy and value networks"""
    discount: float = 0.99
    """discount factor gamma"""
    td_lambda: float = 0.95
    """lambda of the TD(lambda) returns that V is fitted to"""
    temperature: float = 1.0
    """beta in exp(A / beta); a very large value (1e6) makes every weight 1: behaviour cloning"""
    max_weight: float = 20.0
    """clip of the advantage weights"""
    normalize_advantages: bool = True
    """standardize advantages over the dataset before weighting (the original code does)"""
    value_steps: int = 200
    """value-function gradient steps per iteration"""
    policy_steps: int = 1000
    """policy gradient steps per iteration"""
    fixed_std: Optional[float] = 0.4
    """the policy's fixed standard deviation in [-1, 1] action units (0.4 for locomotion); None learns a log-std"""
    action_bound_weight: float = 10.0
    """weight of the penalty on the policy mean leaving the action bounds"""


def fail(message: str):
    """A user's mistake: one line on stderr, no traceback, exit code 2."""
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def validate(args: Args):
    if args.temperature <= 0:
        fail(f"--temperature must be > 0, got {args.temperature} (1e6 gives behaviour cloning)")
    if not 0.0 <= args.td_lambda <= 1.0:
        fail(f"--td-lambda must lie in [0, 1], got {args.td_lambda}")
    if not 0.0 <= args.discount < 1.0:
        fail(f"--discount must lie in [0, 1), got {args.discount}")
    if args.fixed_std is not None and args.fixed_std <= 0:
        fail(f"--fixed-std must be > 0 (or None to learn it), got {args.fixed_std}")
    for name in ("total_steps", "batch_size", "eval_every", "log_every", "value_steps", "policy_steps"):
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
        fail(f"AWR here needs continuous (Box) actions; this dataset has {action_space}: pick a continuous one")
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        fail("the action space is unbounded; AWR's actions are rescaled to [-1, 1] and need finite Box bounds")
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
    parts = {"observations": [], "actions": [], "rewards": [], "next_observations": [], "terminals": [], "ends": []}
    episode_returns = []
    for ep in episodes:
        obs = flatten_observations(ep.observations, observation_space)
        parts["observations"].append(obs[:-1])
        parts["next_observations"].append(obs[1:])
        parts["actions"].append(np.asarray(ep.actions).reshape(len(ep.actions), -1))
        parts["rewards"].append(np.asarray(ep.rewards))
        parts["terminals"].append(np.asarray(ep.terminations))
        parts["ends"].append(np.arange(len(ep.rewards)) == len(ep.rewards) - 1)  # the episode's last transition
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
    layers.append(nn.Linear(d, out_dim))
    for m in layers:  # TensorFlow's default (Glorot) init, which the original code uses
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return nn.Sequential(*layers)


class ValueNet(nn.Module):
    """V(s) = f(s) / (1 - gamma): the network works on the scale of a per-step reward, as the original's value
    normalizer arranges, so one learning rate suits any discount."""

    def __init__(self, obs_dim: int, hidden_dims, discount: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, 1)
        self.scale = 1.0 / (1.0 - discount)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs).squeeze(-1) * self.scale


class GaussianPolicy(nn.Module):
    """A Gaussian with an unsquashed mean and either a fixed std (the original's choice) or a learned, state-independent
    log-std. Evaluation acts with the mean, clipped to the action bounds."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, fixed_std: Optional[float]):
        super().__init__()
        self.net = mlp(obs_dim, hidden_dims, action_dim)
        last = self.net[-1]
        nn.init.uniform_(last.weight, -0.01, 0.01)  # the original's small initial output scale
        self.log_std = nn.Parameter(torch.full((action_dim,), math.log(fixed_std or 1.0)),
                                    requires_grad=fixed_std is None)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def log_prob(self, mean: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        z = (actions - mean) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


# ---- Losses (paper equations) --------------------------------------------------------------------------------------
def td_lambda_returns(rewards, next_values, terminals, ends, episode, position, grid: tuple[int, int],
                      discount: float, lam: float) -> torch.Tensor:
    """TD(lambda) returns of every transition, computed backwards inside each episode:
        R_t = r_t + gamma * ((1 - lambda) * V(s_{t+1}) + lambda * R_{t+1}),
        R_T = r_T + gamma * V(s_{T+1}) at an episode's last transition, with V = 0 after a termination,
    so a time-limit truncation bootstraps from V of its last next-state. The recursion R_t = c_t + a_t * R_{t+1} runs
    over time steps (the longest episode's length), each step vectorized across all episodes of the dataset.
    All inputs are (N,) tensors; episode and position locate each transition in a grid of (episodes, longest length)."""
    bootstrap = (1.0 - terminals) * next_values
    c = rewards + discount * bootstrap * ((1.0 - lam) + lam * ends)
    a = discount * lam * (1.0 - ends)
    num_episodes, length = grid
    c_grid = torch.zeros(num_episodes, length, dtype=c.dtype, device=c.device)
    a_grid = torch.zeros_like(c_grid)
    c_grid[episode, position] = c
    a_grid[episode, position] = a
    returns = torch.zeros_like(c_grid)
    following = torch.zeros(num_episodes, dtype=c.dtype, device=c.device)
    for t in range(length - 1, -1, -1):
        following = c_grid[:, t] + a_grid[:, t] * following
        returns[:, t] = following
    return returns[episode, position]


def advantage_weights(advantages: torch.Tensor, temperature: float, max_weight: float, normalize: bool):
    """w = min(exp(A / beta), w_max), with A standardized over the dataset first when normalize is set (the original
    code's default, which makes beta = 1 work across tasks). Returns the weights and the advantages' mean and std."""
    mean, std = advantages.mean(), advantages.std()
    if normalize:
        advantages = (advantages - mean) / (std + 1e-5)
    return torch.exp(advantages / temperature).clamp(max=max_weight), mean, std


def action_bound_penalty(mean: torch.Tensor) -> torch.Tensor:
    """0.5 * E[sum of squared violations of [-1, 1] by the policy mean]: the original keeps the unsquashed mean
    inside the action bounds with this soft penalty."""
    violation = (mean - 1.0).clamp(min=0).pow(2) + (-1.0 - mean).clamp(min=0).pow(2)
    return 0.5 * violation.sum(-1).mean()


class AWR:
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        self.args = args
        self.actor = GaussianPolicy(obs_dim, action_dim, args.hidden_dims, args.fixed_std).to(device)
        self.value = ValueNet(obs_dim, args.hidden_dims, args.discount).to(device)
        self.actor_opt = torch.optim.SGD([p for p in self.actor.parameters() if p.requires_grad], lr=args.actor_lr,
                                         momentum=args.momentum)
        self.value_opt = torch.optim.SGD(self.value.parameters(), lr=args.value_lr, momentum=args.momentum)

    @torch.no_grad()
    def returns(self, data: dict, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
        """V(s) and the TD(lambda) returns under the current V, for the whole dataset. Inside an episode s' is the
        next transition's s, so V(s') is V(s) shifted by one; only each episode's final s' needs its own pass."""
        v = torch.cat([self.value(x) for x in data["observations"].split(chunk)])
        v_next = torch.roll(v, -1)
        v_next[data["ends"].bool()] = self.value(data["final_observations"])
        returns = td_lambda_returns(data["rewards"], v_next, data["terminals"], data["ends"], data["episode"],
                                    data["position"], data["grid"], self.args.discount, self.args.td_lambda)
        return v, returns

    def value_step(self, obs, targets) -> torch.Tensor:
        # The original's 0.5 * MSE on the normalized scale, i.e. on V * (1 - gamma).
        loss = 0.5 * ((targets - self.value(obs)) / self.value.scale).pow(2).mean()
        self.value_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.value_opt.step()
        return loss.detach()

    def policy_step(self, obs, actions, weights) -> dict:
        mean = self.actor(obs)
        weighted_nll = -(weights * self.actor.log_prob(mean, actions)).mean()
        bound = action_bound_penalty(mean)
        loss = weighted_nll + self.args.action_bound_weight * bound
        self.actor_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.actor_opt.step()
        return {"losses/actor_loss": weighted_nll.detach(), "losses/action_bound_penalty": bound.detach()}


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
    """Deterministic policy (the mean action, clipped to the bounds); episode i starts from reset(seed=seed + i), so
    every evaluation sees the same start states."""
    actor.eval()
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            x = (torch.as_tensor(obs, dtype=torch.float32, device=device) - stats["obs_mean"]) / stats["obs_std"]
            action = actor(x.unsqueeze(0))[0].clamp(-1.0, 1.0).cpu().numpy()
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
    if not isinstance(ckpt, dict) or ckpt.get("algorithm") != "awr":
        fail(f"'{path}' is not an awr.py checkpoint")
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
    actor = GaussianPolicy(ckpt["obs_dim"], ckpt["action_dim"], saved["hidden_dims"], saved["fixed_std"])
    actor = actor.to(device)
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
    n = len(data["rewards"])
    # Where each transition sits in its episode, for the backward TD(lambda) pass.
    ends = data["ends"].astype(bool)
    episode = np.concatenate([[0], np.cumsum(ends)[:-1]])
    starts = np.flatnonzero(np.concatenate([[True], ends[:-1]]))
    position = np.arange(n) - starts[episode]
    as_tensor = lambda x, dtype=torch.float32: torch.as_tensor(x, dtype=dtype, device=device)  # noqa: E731
    tensors = {
        "observations": as_tensor((data["observations"] - obs_mean) / obs_std),
        "final_observations": as_tensor((data["next_observations"][ends] - obs_mean) / obs_std),
        "actions": as_tensor(data["actions"]),
        "rewards": as_tensor(data["rewards"]),
        "terminals": as_tensor(data["terminals"]),
        "ends": as_tensor(data["ends"]),
        "episode": as_tensor(episode, torch.long),
        "position": as_tensor(position, torch.long),
        "grid": (int(episode[-1]) + 1, int(position.max()) + 1),
    }
    obs_dim, action_dim = data["observations"].shape[1], data["actions"].shape[1]
    del data
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

    agent = AWR(obs_dim, action_dim, args, device)
    obs_all, actions_all = tensors["observations"], tensors["actions"]
    scores, step, value_steps = [], 0, 0
    timing = {"value": 0.0, "eval": 0.0, "returns": 0.0}
    train_start = interval_start = time.perf_counter()
    interval_steps = 0
    while step < args.total_steps:
        # (1) Fit V to the TD(lambda) returns of the current V (Alg. 1's critic step).
        phase = time.perf_counter()
        _, targets = agent.returns(tensors)
        timing["returns"] = time.perf_counter() - phase
        for _ in range(args.value_steps):
            idx = torch.randint(n, (args.batch_size,), device=device)
            value_loss = agent.value_step(obs_all[idx], targets[idx])
        value_steps += args.value_steps
        timing["value"] += time.perf_counter() - phase

        # (2) Advantages of the data's actions under the refitted V, and their weights.
        v, returns = agent.returns(tensors)
        weights, adv_mean, adv_std = advantage_weights(returns - v, args.temperature, args.max_weight,
                                                       args.normalize_advantages)
        diagnostics = {
            "values/advantage_mean": adv_mean,  # before standardization
            "values/advantage_std": adv_std,
            "values/v": v.mean(),
            "values/weight_mean": weights.mean(),
            "values/weight_clipped_frac": (weights >= args.max_weight).float().mean(),
            # Kish's effective sample size, as a fraction of the dataset: 1 is uniform weights (BC).
            "values/weight_ess": weights.sum().pow(2) / weights.pow(2).sum() / n,
            "losses/value_loss": value_loss,
        }

        # (3) Advantage-weighted regression of the policy onto the data's actions (Alg. 1's actor step).
        for _ in range(min(args.policy_steps, args.total_steps - step)):
            idx = torch.randint(n, (args.batch_size,), device=device)
            info = agent.policy_step(obs_all[idx], actions_all[idx], weights[idx])
            step += 1
            interval_steps += 1

            if step % args.log_every == 0 or step == args.total_steps:
                ups = interval_steps / (time.perf_counter() - interval_start)
                for k, val in {**info, **diagnostics}.items():
                    writer.add_scalar(k, val.item(), step)
                writer.add_scalar("charts/updates_per_second", ups, step)
                writer.add_scalar("charts/value_steps", value_steps, step)
                writer.add_scalar("charts/value_updates_per_second", value_steps / timing["value"], step)
                writer.add_scalar("charts/returns_seconds", timing["returns"], step)
                writer.add_scalar("charts/peak_memory_mb", peak_memory_mb(device), step)
                interval_start, interval_steps = time.perf_counter(), 0

            if step % args.eval_every == 0 or step == args.total_steps:
                eval_start = time.perf_counter()
                returns_eval = evaluate(env, agent.actor, stats, args.eval_episodes, args.seed, device)
                timing["eval"] += time.perf_counter() - eval_start
                line = f"step {step}/{args.total_steps}"
                if len(returns_eval):
                    writer.add_scalar("eval/return", returns_eval.mean(), step)
                    line += f" | return {returns_eval.mean():8.1f}"
                    score = normalized_score(returns_eval, ref_min, ref_max)
                    if score is not None:
                        writer.add_scalar("eval/normalized_score", score, step)
                        scores.append(score)
                        line += f" | score {score:5.1f}"
                elapsed = time.perf_counter() - train_start
                left = elapsed / step * (args.total_steps - step)
                print(f"{line} | {step / (elapsed - timing['eval']):.0f} policy updates/s (value fitting included) | "
                      f"{left / 60:.1f} min left", flush=True)
                interval_start, interval_steps = time.perf_counter(), 0

    if scores:
        print(f"final score (mean of the last 3 evaluations): {np.mean(scores[-3:]):.1f}")
    if args.save_model:
        path = f"runs/{run_name}/{args.exp_name}.pt"
        torch.save({
            "algorithm": "awr",
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(args).items()},
            "actor": agent.actor.state_dict(),
            "value": agent.value.state_dict(),
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
