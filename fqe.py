"""Fitted Q Evaluation (FQE): the value of a trained policy, estimated from logged data alone, with no simulator.

Le, Voloshin, Yue (2019), "Batch Policy Learning under Constraints", arXiv:1903.08738, for continuous actions as in
Paine et al. (2020), arXiv:2007.09055, and the DOPE benchmark, Fu et al. (2021), arXiv:2103.16596. Q is regressed onto
its own Bellman backup under the evaluated policy pi, on the dataset's transitions only, and the policy's discounted
value J(pi) is Q averaged over the dataset's episode starts:
    L_Q   = E_D[ (r + gamma * (1 - done) * Q'(s', pi(s')) - Q(s, a))^2 ],     J(pi) ~ mean_{s0 in D} Q(s0, pi(s0))
Uncertainty by the bootstrap over episodes (Kostrikov, Nachum 2020, arXiv:2007.13609): fit b counts each episode
w_b ~ Multinomial(E, 1/E) times, and the spread of the fits' estimates gives a 95% interval.
Run: python fqe.py --policy runs/<run_name>/iql_policy.pt2 --dataset-id mujoco/hopper/medium-v0
"""

import logging
import os
import random
import resource
import signal
import sys
import time
import warnings
from dataclasses import dataclass

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
    """seed for torch, numpy, random, the bootstrap resamples and the Monte Carlo episodes"""
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
    total_steps: int = 100_000
    """number of gradient steps (DOPE runs 1M; on Hopper at gamma 0.99 the estimate climbs for about 30k steps)"""
    batch_size: int = 256
    """minibatch size"""
    eval_every: int = 5_000
    """gradient steps between estimates of J(pi)"""
    eval_episodes: int = 0
    """episodes of pi in the dataset's environment at the end: the Monte Carlo value beside the estimate (0: none)"""
    log_every: int = 1_000
    """gradient steps between loss logs"""
    normalize_states: bool = True
    """z-score observations for the Q networks (DOPE's choice; the policy always sees raw observations)"""

    # Algorithm specific arguments
    policy: str | None = None
    """the policy to evaluate: a runs/<run_name>/{script}_policy.pt2 that the training scripts export"""
    discount: float = 0.99
    """discount factor gamma of the value estimated"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    critic_lr: float = 3e-4
    """learning rate of the Q networks (AdamW)"""
    weight_decay: float = 1e-5
    """decoupled weight decay per step, as DOPE's TF-Addons AdamW applies it (not scaled by the learning rate)"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of each Q network"""
    num_bootstrap: int = 10
    """bootstrap fits beside the full-data fit, for the interval (0: the estimate alone)"""
    normalize_reward: bool = True
    """fit rewards divided by their std (minus their mean if no episode terminates), as DOPE; estimates in raw units"""
    clip_targets: bool = True
    """clip targets to [min r, max r] / (1 - gamma), the range any policy's value lies in (DOPE)"""


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


# ---- Networks --------------------------------------------------------------------------------------------------------
class StackedQ(nn.Module):
    """The Q networks of all fits with stacked weights (fit 0 on the whole dataset, the others on bootstrap resamples):
    each layer is one batched matmul over every fit. DOPE's initialization: weights uniform within 1 / sqrt(fan_in),
    the output layer's within sqrt(0.03 / fan_in) so that Q starts near 0; zero biases. With n_actions discrete
    actions, DQN's head: Q(s, .) for every action from the state alone, and Q(s, a) gathered from it."""

    def __init__(self, obs_dim: int, action_dim: int, hidden_dims, num_q: int, n_actions: int = 0):
        super().__init__()
        dims = [obs_dim + action_dim * (not n_actions), *hidden_dims, n_actions or 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            bound = (0.03 / d_in) ** 0.5 if i == len(dims) - 2 else d_in**-0.5
            self.weights.append(nn.Parameter(torch.empty(num_q, d_in, d_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.zeros(num_q, 1, d_out)))
        self.num_q, self.n_actions = num_q, n_actions

    def forward(self, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Returns Q values of shape (num_q, batch); discrete actions come as their index mapped to [-1, 1]."""
        x = (obs if self.n_actions else torch.cat([obs, actions], dim=-1)).expand(self.num_q, -1, -1)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if i < len(self.weights) - 1:
                x = torch.relu_(torch.baddbmm(b, x, w))  # in place: baddbmm's backward needs only its inputs
            elif self.n_actions:
                index = ((actions + 1.0) * 0.5 * (self.n_actions - 1)).round().long().expand(self.num_q, -1, -1)
                x = torch.baddbmm(b, x, w).gather(2, index).squeeze(2)
            else:
                # One output unit as a product and a sum: as a matmul, its input gradient is an outer product that a
                # CPU's batched GEMM computes several times slower than this elementwise backward.
                x = (x * w.transpose(1, 2)).sum(-1) + b.squeeze(-1)
        return x


# ---- The algorithm: the Bellman target of pi, the bootstrap, then the fit and its estimate ---------------------------
def fqe_target(rewards, terminals, next_q: torch.Tensor, discount: float, low: float, high: float) -> torch.Tensor:
    """r + gamma * (1 - done) * Q'(s', pi(s')), pi's action at s' (the data's would back up the behaviour's value);
    only a termination stops bootstrapping; clipped to [low, high], every policy's value range, as DOPE."""
    return (rewards + discount * (1.0 - terminals) * next_q).clamp(low, high)


def bootstrap_weights(lengths: torch.Tensor, num_bootstrap: int) -> torch.Tensor:
    """(episodes, 1 + num_bootstrap) counts: the full-data fit counts each episode once; each bootstrap fit draws the
    dataset's E episodes with replacement, E times, and counts how often it drew each one."""
    draws = torch.randint(len(lengths), (num_bootstrap, len(lengths)), device=lengths.device)
    counts = torch.zeros(num_bootstrap, len(lengths), device=lengths.device).scatter_add_(1, draws, torch.ones_like(
        draws, dtype=torch.float32))
    return torch.cat([torch.ones(len(lengths), 1, device=lengths.device), counts.T], 1)


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device, n_actions: int = 0):
        super().__init__()
        self.args = args
        self.critic = StackedQ(obs_dim, action_dim, args.hidden_dims, 1 + args.num_bootstrap, n_actions)
        self.target_critic = StackedQ(obs_dim, action_dim, args.hidden_dims, 1 + args.num_bootstrap, n_actions)
        self.target_critic.load_state_dict(self.critic.state_dict())
        self.target_critic.requires_grad_(False)
        self.to(device)
        # PyTorch's AdamW decays by lr * weight_decay per step, DOPE's by weight_decay alone: hence the division.
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=args.critic_lr, fused=True,
                                            weight_decay=args.weight_decay / args.critic_lr,
                                            capturable=device.type == "cuda" and args.cudagraphs)
        self.online, self.targets = list(self.critic.parameters()), list(self.target_critic.parameters())

    def update(self, obs, actions, rewards, next_obs, terminals, next_actions, weights, low, high) -> dict:
        """One regression step of every fit towards its target network's backup; weights (batch, fits) are each
        transition's bootstrap counts. Q is the network's output / (1 - gamma), so that the network works on the scale
        of one step's reward whatever gamma is (DOPE)."""
        scale = 1.0 / (1.0 - self.args.discount)
        with torch.no_grad():
            next_q = self.target_critic(next_obs, next_actions) * scale
            q_target = fqe_target(rewards, terminals, next_q, self.args.discount, low, high)
        q = self.critic(obs, actions) * scale
        weights = weights.T  # (fits, batch)
        td_loss = (weights * (q - q_target).pow(2)).sum(1) / weights.sum(1).clamp(min=1.0)  # each fit's weighted MSE
        self.critic_opt.zero_grad(set_to_none=True)
        td_loss.sum().backward()
        self.critic_opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.targets, self.online, self.args.tau)
        return {"losses/td_loss": td_loss[0].detach(), "values/q_data": q[0].detach().mean(),
                "losses/td_loss_bootstrap": td_loss[1:].detach().mean() if len(td_loss) > 1 else torch.zeros(()),
                "values/q_target": q_target[0].mean()}

    @torch.no_grad()
    def estimate(self, start_obs: torch.Tensor, start_actions: torch.Tensor, start_weights: torch.Tensor):
        """Each fit's J(pi): its target network's Q(s0, pi(s0)) averaged over the episode starts it counts, as DOPE."""
        q = self.target_critic(start_obs, start_actions) / (1.0 - self.args.discount)
        return (q * start_weights.T).sum(1) / start_weights.sum(0)


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


# ---- Harness: loading, user errors, CUDA graphs; not the algorithm, the training scripts' text, then load_policy -
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
    if not isinstance(space, (gym.spaces.Box, gym.spaces.Discrete)) or getattr(space, "n", 2) < 2:
        fail(f"{Args.exp_name}.py needs Box actions or at least two Discrete ones, '{dataset_id}' has {space}")
    if isinstance(space, gym.spaces.Box) and not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        fail(f"the action space is unbounded; {Args.exp_name}.py rescales actions to [-1, 1] and needs finite bounds")
    if not all(isinstance(s, gym.spaces.Box) and len(s.shape) == 1 for s in
               (obs_space.spaces.values() if isinstance(obs_space, gym.spaces.Dict) else [obs_space])):
        fail(f"observations must be a flat Box vector (or a dict of them, concatenated); got {obs_space}")
    return dataset


def load_data(args: Args, device: torch.device) -> tuple[dict, dict]:
    """The transitions (numpy), actions rescaled from the Box bounds (or a Discrete space's first and last index) to
    [-1, 1], and the task: all that evaluation needs besides the policy (env spec with time limit, observation
    statistics, action bounds, reference scores, the number of discrete actions or 0)."""
    dataset = load_minari(args.dataset_id, args.download)
    data = episodes_to_transitions(dataset.iterate_episodes(), dataset.spec.observation_space)
    space, n = dataset.spec.action_space, int(getattr(dataset.spec.action_space, "n", 0))
    low, high = (space.low, space.high) if not n else (np.array([space.start]), np.array([space.start + n - 1]))
    low, high = low.astype(np.float32), high.astype(np.float32)
    data["actions"] = 2.0 * (data["actions"] - low) / (high - low) - 1.0
    mean, std = data["observations"].mean(0), data["observations"].std(0) + 1e-3
    if not args.normalize_states:
        mean, std = np.zeros_like(mean), np.ones_like(std)
    meta, stats = dataset.storage.metadata, {"obs_mean": mean, "obs_std": std, "action_low": low, "action_high": high}
    task = {"dataset_id": args.dataset_id, "env_spec": meta.get("eval_env_spec") or meta.get("env_spec"),
            "ref_min_score": meta.get("ref_min_score"), "ref_max_score": meta.get("ref_max_score"), "n_actions": n,
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


def load_policy(path: str, device: torch.device, load) -> tuple:
    """The exported program (raw observations in, environment actions out), checked before load() reads the dataset
    and then against it; returns data, task and the policy as the scripts' act (standardized observations to [-1, 1]
    actions), or one line saying what is wrong."""
    logging.getLogger("torch.export").setLevel(logging.ERROR)  # a file it cannot read: a warning with a traceback
    try:
        program = move_to_device_pass(torch.export.load(path), device)
    except Exception as e:  # no such file, or not a torch.export program
        fail(f"could not load the policy '{path}' ({type(e).__name__}): pass the <script>_policy.pt2 that a training "
             "script wrote beside its checkpoint")
    if len(program.graph_signature.user_inputs) != 1:  # Q(s', pi(s')) needs pi of the observation alone
        fail(f"'{path}' takes a context of past steps (dt.py's, not Markov): FQE needs pi of the observation alone")
    (data, task), policy = load(), program.module()
    mean, std, low, high = (task[k] for k in ("obs_mean", "obs_std", "action_low", "action_high"))
    try:
        with torch.no_grad():
            gave = f"actions of shape {tuple(policy(mean.expand(2, -1)).shape)} for 2 observations"
    except Exception as e:  # its observation size is not the dataset's
        gave = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:150]}"
    want = (2,) if task["n_actions"] else (2, len(low))  # a discrete policy returns one action index per observation
    if gave != f"actions of shape {want} for 2 observations":
        fail(f"the policy '{path}' does not fit the dataset: it must take observations of size {len(mean)} and return "
             f"actions of shape {want} for 2, and it gave {gave}; evaluate it on data of the task it was trained for")
    return data, task, lambda obs: 2.0 * (policy(obs * std + mean).reshape(len(obs), -1) - low) / (high - low) - 1.0


# ---- Main ------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: sys.exit(130))  # Ctrl-C: stop at once, without a traceback
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    validate(args, {
        "--policy is needed: the runs/<run_name>/<script>_policy.pt2 to evaluate": args.policy is not None,
        f"--discount must lie in [0, 1), got {args.discount}": 0.0 <= args.discount < 1.0,
        f"--tau must lie in (0, 1], got {args.tau}": 0.0 < args.tau <= 1.0,
        f"--critic-lr must be > 0, got {args.critic_lr}": args.critic_lr > 0,
        "--num-bootstrap must be 0 or >= 2 (two fits at least)": args.num_bootstrap >= 0 and args.num_bootstrap != 1,
    })
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    data, task, act = load_policy(args.policy, device, lambda: load_data(args, device))
    # As DOPE: rewards / their std, minus their mean only when no episode terminates (a shift would change what ending
    # an episode is worth). Targets are clipped to the range of every policy's value: [min r, max r] / (1 - gamma),
    # widened to 0 where episodes terminate (every reward after the end is 0; DOPE's clip lifts a policy that falls
    # early when all rewards are positive). Estimates go back to raw units.
    shift = float(data["rewards"].mean()) if args.normalize_reward and not data["terminals"].any() else 0.0
    # A constant reward (CartPole's 1 per step) has no spread to divide by: it stays as it is.
    reward_std = float(data["rewards"].std()) + 1e-6 if args.normalize_reward and data["rewards"].std() > 0 else 1.0
    rewards = (data["rewards"] - shift) / reward_std
    ends = [0.0] if data["terminals"].any() else []
    bounds = (min([rewards.min(), *ends]), max([rewards.max(), *ends])) if args.clip_targets else (-np.inf, np.inf)
    table, split = transition_table({**data, "rewards": rewards}, task)
    obs, _, _, next_obs, _ = table.split(split, dim=1)
    lengths = torch.as_tensor(data["episode_lengths"], device=device)
    starts = torch.cumsum(lengths, 0) - lengths  # each episode's first transition
    # (1) pi's actions at every s' and at every episode start, computed once: an update touches the Q networks alone.
    # A policy that draws at random (BCQ's candidates) gets one draw per state, an unbiased sample of its backup.
    with torch.no_grad():
        next_actions = torch.cat([act(x) for x in next_obs.split(65536)])
        start_obs, start_actions = obs[starts], act(obs[starts])
    # (2) The bootstrap: every fit's count of each episode, given to all of the episode's transitions.
    weights = bootstrap_weights(lengths, args.num_bootstrap)
    table = torch.cat([table, next_actions, weights.repeat_interleave(lengths, 0)], 1)
    split = [*split, split[1], weights.shape[1]]
    run_name = f"{args.dataset_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = f"runs/{run_name}"
    while os.path.exists(run_dir):  # never write into another run's folder
        run_dir += "_"
    writer = SummaryWriter(run_dir)
    hyperparameters = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{hyperparameters}")

    agent = Agent(split[0], split[1], args, device, task["n_actions"])

    def sample():  # transitions with pi's action at s' and every fit's bootstrap count; rewards and dones as (batch,)
        obs, actions, rewards, next_obs, dones, next_actions, counts = table[torch.randint(
            len(table), (args.batch_size,), device=device)].split(split, dim=1)
        return obs, actions, rewards.squeeze(1), next_obs, dones.squeeze(1), next_actions, counts

    train_step = cuda_graph(lambda: agent.update(*sample(), *(float(b) / (1 - args.discount) for b in bounds)),
                            args, device)
    scores, interval_steps, last = {}, 0, args.total_steps  # scores: step -> (J, interval)
    train_start = interval_start = time.perf_counter()
    for step in range(1, last + 1):
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
        if step % args.eval_every == 0 or step in (3 * last // 4, last):  # 3/4: the convergence check's
            # Every fit's J(pi) in raw reward units; the bootstrap fits' spread is the estimate's standard error.
            values = agent.estimate(start_obs, start_actions, weights).cpu() * reward_std + shift / (1 - args.discount)
            spread = float(values[1:].std()) if len(values) > 2 else float("nan")
            scores[step] = (float(values[0]), float(values[0]) - 1.96 * spread, float(values[0]) + 1.96 * spread)
            for tag, v in zip(("estimate/value", "estimate/ci_low", "estimate/ci_high", "estimate/bootstrap_std"),
                              (*scores[step], spread)):
                writer.add_scalar(tag, v, step)
            elapsed = time.perf_counter() - train_start
            left = elapsed / step * (args.total_steps - step)
            print(f"step {step}/{args.total_steps} | J(pi) {scores[step][0]:9.2f} [{scores[step][1]:.2f}, "
                  f"{scores[step][2]:.2f}] | {step / elapsed:.0f} updates/s | {left / 60:.1f} min left", flush=True)

    # Settled? Not a fit shorter than 1 / ((1 - gamma) tau) steps, the target network's time constant times the value's
    # horizon; a longer one if its last quarter moved the estimate by at most the interval's half-width or 2% of it.
    (value, low, high), since, horizon = scores[last], 3 * last // 4, round(1 / ((1 - args.discount) * args.tau))
    moved = abs(value - scores.get(since, (np.nan,))[0])
    tolerance = max((high - low) / 2 if args.num_bootstrap > 1 else 0, 0.02 * abs(value))
    unsettled = (f"{last} steps, fewer than 1 / ((1 - gamma) tau) = {horizon}" if last < horizon else
                 f"moved {moved:.2f} since step {since}, more than {tolerance:.2f}" if not moved <= tolerance else None)
    print(f"FQE estimate of J(pi), the discounted return at gamma {args.discount} from the dataset's {len(starts)} "
          f"episode starts: {value:.2f}, " + (f"95% interval [{low:.2f}, {high:.2f}] ({args.num_bootstrap} bootstrap "
          "fits; it covers the data's resampling, not FQE's own bias)" if args.num_bootstrap > 1 else "no interval "
          "(--num-bootstrap < 2)") + (f"; NOT CONVERGED ({unsettled}): fit longer with --total-steps" if unsettled
                                      else f"; converged (moved {moved:.2f} since step {since})"))
    env_id = task["env_spec"] and gym.envs.registration.EnvSpec.from_json(task["env_spec"]).id
    if args.eval_episodes and env_id:  # the ground truth where a simulator exists: pi's own episodes
        envs = make_eval_envs(task, args.eval_episodes, None)
        if task["n_actions"]:  # evaluate() maps [-1, 1] back to [low, high]: the index, as a float array of one
            envs = [gym.wrappers.TransformAction(e, lambda a: int(np.rint(a[0])), e.action_space) for e in envs]
        returns = evaluate(act, envs, task, args.seed, args.discount)
        writer.add_scalar("eval/discounted_return", returns.mean(), step)
        error = returns.std(ddof=1) / len(returns) ** 0.5 if len(returns) > 1 else float("nan")
        print(f"Monte Carlo in {env_id}: {returns.mean():.2f} +- {error:.2f} (standard error) over {len(returns)} "
              "episodes from the environment's initial states")
    else:
        print("no Monte Carlo check: " + (f"--eval-episodes N runs pi for N episodes in {env_id}" if env_id else
                                          "the dataset names no environment to run pi in"))
    writer.close()
