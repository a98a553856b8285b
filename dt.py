"""Decision Transformer (DT): offline RL as return-conditioned sequence modeling, with no value function at all.

Chen, Lu, Rajeswaran, Lee, Grover, Laskin, Abbeel, Srinivas, Mordatch (2021), "Decision Transformer: Reinforcement
Learning via Sequence Modeling", arXiv:2106.01345.
A causal transformer reads the last K steps of an episode as 3K tokens (R_t, s_t, a_t), R_t the return-to-go, and
predicts each action a_t from the token of s_t (Sec. 3, Algorithm 1); at test time R_0 is the return asked for:
    R_t     = sum_{t' >= t} r_t'                                    (inside the episode; scaled by reward_scale)
    L       = mean over the real steps t of a window of || pi(R_<=t, s_<=t, a_<t) - a_t ||^2
    R_(t+1) = R_t - r_t                                             (evaluation: the reward received is spent)
Run: python dt.py --dataset-id mujoco/hopper/medium-v0 --target-returns 3600 1800
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
    total_steps: int = 100_000
    """number of gradient steps"""
    batch_size: int = 64
    """minibatch size, in windows of seq_len steps"""
    eval_every: int = 5_000
    """gradient steps between evaluations"""
    eval_episodes: int = 10
    """episodes per evaluation (and per target return)"""
    log_every: int = 1_000
    """gradient steps between loss logs"""
    normalize_states: bool = True
    """z-score observations with dataset statistics (as the official code and CORL do)"""
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
    seq_len: int = 20
    """context length K in time steps: the transformer reads 3K tokens (return-to-go, state, action per step)"""
    embedding_dim: int = 128
    """token embedding size"""
    num_layers: int = 3
    """transformer blocks"""
    num_heads: int = 1
    """attention heads per block (embedding_dim must be a multiple of it)"""
    hidden_dims: tuple[int, ...] = (512,)
    """hidden layer sizes of each block's feed-forward network (GPT-2's 4 x embedding_dim)"""
    dropout: float = 0.1
    """dropout rate on the embeddings, the attention weights and both residual branches of every block"""
    learning_rate: float = 1e-4
    """AdamW learning rate, reached at the end of the warm-up"""
    weight_decay: float = 1e-4
    """AdamW weight decay, on every parameter as in the official code"""
    warmup_steps: int = 10_000
    """linear learning-rate warm-up: the k-th update uses min(k / warmup_steps, 1) * learning_rate"""
    clip_grad: float = 0.25
    """clip of the gradient's global norm"""
    reward_scale: float = 0.001
    """returns-to-go are multiplied by this before they are embedded (the official code divides by 1000)"""
    target_returns: tuple[float, ...] | None = None
    """returns to condition on at evaluation, each evaluated, the first for eval/return and the final score (default:
    the data's best episode return and half of it, as the official 3600 1800 on hopper; pass them if returns are < 0)"""
    max_timestep: int = 1000
    """size of the timestep embedding table; later steps (an evaluation outlasting the data) use its last entry"""


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


def returns_to_go(rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """R_t = sum_{t' >= t} r_t' (Sec. 3), summed backwards inside each episode, so none crosses an episode's end; an
    episode that never terminated (a time limit, the end of the data) counts its own rewards and is kept."""
    episodes = np.split(rewards.astype(np.float64), np.cumsum(lengths)[:-1])
    return np.concatenate([np.cumsum(r[::-1])[::-1] for r in episodes]).astype(np.float32)


def minibatch(table: torch.Tensor, split: list, batch_size: int, seq_len: int) -> tuple:
    """batch_size windows of seq_len steps, drawn on the device (static shapes, no host sync) from a start uniform over
    all steps: the official draw, an episode in proportion to its length, then a start in it. Steps past the episode's
    end are padding on the right, copies of its last step, and `valid` (from the episode's end) marks the real ones."""
    start = torch.randint(len(table), (batch_size,), device=table.device)
    offset, steps_left = torch.arange(seq_len, device=table.device), table[start, -1:]  # steps after the start's
    obs, actions, rtg, timesteps, _ = table[start[:, None] + torch.minimum(offset, steps_left).long()].split(split, -1)
    return obs, actions, rtg.squeeze(-1), timesteps.squeeze(-1).long(), offset <= steps_left


# ---- Networks --------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """A pre-LN GPT-2 block: x + attention(LN(x)), then x + MLP(LN(x)); dropout on the attention weights and on both
    residual branches, a ReLU feed-forward as in the official code's GPT-2 configuration (CORL: GELU)."""

    def __init__(self, dim: int, num_heads: int, hidden_dims, dropout: float):
        super().__init__()
        self.ln1, self.ln2, self.num_heads, self.dropout = nn.LayerNorm(dim), nn.LayerNorm(dim), num_heads, dropout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        sizes = [dim, *hidden_dims, dim]
        self.mlp = nn.Sequential(*[m for d, h in zip(sizes, sizes[1:]) for m in (nn.Linear(d, h), nn.ReLU())][:-1])

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:  # attend: True where a token may look
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p).transpose(1, 2)
        x = x + F.dropout(self.proj(y.reshape(batch, tokens, dim)), p, self.training)
        return x + F.dropout(self.mlp(self.ln2(x)), p, self.training)


class DecisionTransformer(nn.Module):
    """Sec. 3, "Architecture": a linear embedding per modality plus a learned embedding of the timestep (shared by the
    step's three tokens, in place of a position embedding), LayerNorm, a causal transformer, a tanh action head on the
    state tokens: the official code's network (Hugging Face GPT-2 without position embeddings), written out."""

    def __init__(self, obs_dim: int, action_dim: int, args: Args):
        super().__init__()
        dim, tokens = args.embedding_dim, 3 * args.seq_len
        self.embed_return, self.embed_state = nn.Linear(1, dim), nn.Linear(obs_dim, dim)
        self.embed_action, self.embed_timestep = nn.Linear(action_dim, dim), nn.Embedding(args.max_timestep, dim)
        self.embed_ln, self.out_ln = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, args.num_heads, args.hidden_dims, args.dropout)
                                    for _ in range(args.num_layers))
        self.action_head, self.dropout, self.max_timestep = nn.Linear(dim, action_dim), args.dropout, args.max_timestep
        self.register_buffer("causal", torch.ones(tokens, tokens, dtype=torch.bool).tril(), persistent=False)
        for name, p in self.named_parameters():  # GPT-2's initialization (CORL's): weights N(0, 0.02), biases 0
            if p.dim() > 1 or name.endswith("bias"):  # LayerNorm's scales stay 1
                nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.zeros_(p)

    def forward(self, rtg, states, actions, timesteps, valid) -> torch.Tensor:
        """Right-padded (batch, K) inputs in the model's units -> the actions a_t, each from R_<=t, s_<=t, a_<t."""
        batch, k = timesteps.shape
        time = self.embed_timestep(timesteps.clamp(0, self.max_timestep - 1))[:, :, None]  # capped: none past the table
        x = torch.stack([self.embed_return(rtg[..., None]), self.embed_state(states), self.embed_action(actions)], 2)
        x = F.dropout(self.embed_ln((x + time).reshape(batch, 3 * k, -1)), self.dropout, self.training)  # R0 s0 a0 R1..
        # Causal over the 3K tokens, and no token attends to padding. With padding on the right every token still
        # sees R_0, so no attention row is empty (an empty row is a softmax over nothing: NaN, which spreads).
        attend = self.causal[:3 * k, :3 * k] & valid[:, :, None].expand(batch, k, 3).reshape(batch, 1, 1, 3 * k)
        for block in self.blocks:
            x = block(x, attend)
        return torch.tanh(self.action_head(self.out_ln(x)[:, 1::3]))


# ---- The algorithm: losses (paper equations), then the agent and its update -----------------------------------------
def action_loss(predicted: torch.Tensor, actions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Sec. 3, "Training": the squared error of every predicted action, averaged over the real steps only, as the
    official code does (CORL's mean over every step counts the padding as zero error, shrinking the loss)."""
    return ((predicted - actions).pow(2).mean(-1) * valid).sum() / valid.sum()


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args, self.model = args, DecisionTransformer(obs_dim, action_dim, args)
        self.register_buffer("steps", torch.zeros(()))  # updates so far, counted on the device like everything else
        self.register_buffer("lr", torch.tensor(args.learning_rate))  # a tensor, so a captured step reads its schedule
        self.to(device)
        # fused: one kernel per AdamW step, on a CPU too (after clip_grad_norm_); capturable: cuda_graph can capture it.
        adam = {"fused": True, "capturable": device.type == "cuda" and args.cudagraphs}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=args.weight_decay, **adam)

    def update(self, obs, actions, rtg, timesteps, valid) -> dict:
        """One AdamW step on the action loss; returns detached tensors, read at log time."""
        # (1) Every action of every window predicted from its state token, in one causal pass (Algorithm 1).
        self.model.train()  # dropout on: act() turned it off for evaluation
        predicted = self.model(rtg, obs, actions, timesteps, valid)
        loss = action_loss(predicted, actions, valid)
        # (2) AdamW, the gradient's norm clipped, at the official code's linear warm-up (its LambdaLR factor).
        self.lr.copy_(self.args.learning_rate * ((self.steps + 1) / max(self.args.warmup_steps, 1)).clamp(max=1.0))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip_grad)
        self.optimizer.step()
        self.steps += 1
        error, full = (predicted.detach() - actions).pow(2).mean(-1), valid[:, -1]  # with one step of context; with K
        return {"losses/action_loss": loss.detach(), "values/action_error_first": error[:, 0].mean(),
                "values/action_error_full": (error[:, -1] * full).sum() / full.sum().clamp(min=1),
                "values/padding_frac": 1.0 - valid.float().mean(), "values/grad_norm": grad_norm,
                "charts/learning_rate": self.lr}

    def act(self, rtg, states, actions, timesteps, lengths) -> torch.Tensor:
        """In [-1, 1], the action for the last real step of right-padded contexts, dropout off (update turns it on)."""
        last = lengths.clamp(1, timesteps.shape[1])[:, None] - 1
        valid = torch.arange(timesteps.shape[1], device=timesteps.device) <= last
        predicted = self.model.eval()(rtg, states, actions, timesteps, valid)
        return predicted.gather(1, last[:, :, None].expand(-1, 1, predicted.shape[-1])).squeeze(1)


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
def evaluate(agent: Agent, envs: list, task: dict, seed: int, target: float) -> np.ndarray:
    """One episode per environment, stepped together: one model call per time step on the unfinished ones' last seq_len
    steps (the first steps' shorter contexts padded on the right, as in training), the return-to-go starting at target
    and spending each reward (Sec. 3). Episode i starts from reset(seed=seed + i) and ends at the time limit."""
    k, scale, device = agent.args.seq_len, agent.args.reward_scale, task["obs_mean"].device
    horizon, n = gym.envs.registration.EnvSpec.from_json(task["env_spec"]).max_episode_steps or 1000, len(envs)
    states = torch.zeros(n, horizon + k, len(task["obs_mean"]), device=device)  # each episode's steps so far
    actions = torch.zeros(n, horizon + k, len(task["action_low"]), device=device)
    rtg, timesteps = torch.full_like(actions[..., 0], target * scale), torch.arange(horizon + k, device=device)
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, running, low, high = np.zeros(n), list(range(n)), task["action_low"], task["action_high"]
    for t in range(horizon):
        rows, first = torch.tensor(running, device=device), max(0, t - k + 1)  # the context: steps first .. t
        x = torch.as_tensor(np.stack([obs[i] for i in running]), dtype=torch.float32, device=device)
        states[rows, t], window = (x - task["obs_mean"]) / task["obs_std"], slice(first, first + k)
        actions[rows, t] = agent.act(rtg[rows, window], states[rows, window], actions[rows, window],
                                     timesteps[window].expand(len(running), k), torch.full_like(rows, t + 1 - first))
        rewards, unit = np.zeros(len(running)), actions[rows, t]
        for j, (i, action) in enumerate(zip(list(running), (low + (unit + 1.0) * 0.5 * (high - low)).cpu().numpy())):
            obs[i], rewards[j], terminated, truncated, _ = envs[i].step(action)
            returns[i] += rewards[j]
            if terminated or truncated:
                running.remove(i)
        rtg[rows, t + 1] = rtg[rows, t] - scale * torch.as_tensor(rewards, dtype=torch.float32, device=device)
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


# ---- Harness: loading, user errors, checkpoints, CUDA graphs; not the algorithm, the others' text where DT allows ----
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
        fail(message)


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


def transition_table(data: dict, task: dict, reward_scale: float) -> tuple[torch.Tensor, list]:
    """Every step as one row of an (N, row) tensor on the device (a window is one gather): the standardized
    observation, the action, the scaled return-to-go, the step's time in its episode and the steps left after it."""
    t = lambda x: torch.as_tensor(x, dtype=torch.float32, device=task["obs_mean"].device)  # noqa: E731
    lengths = data["episode_lengths"]
    timestep = np.concatenate([np.arange(n) for n in lengths])
    columns = [(t(data["observations"]) - task["obs_mean"]) / task["obs_std"], t(data["actions"]),
               t(returns_to_go(data["rewards"], lengths) * reward_scale)[:, None], t(timestep)[:, None],
               t(np.repeat(lengths, lengths) - 1 - timestep)[:, None]]
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
    """The policy for torch.export.load(path).module(), traced once: the last seq_len steps in raw units, right padded,
    and how many are real in (see act); the environment action for the last real step out."""
    if "exported" not in vars(agent):
        low, high, mean, std = (task[k] for k in ("action_low", "action_high", "obs_mean", "obs_std"))
        scale, k = agent.args.reward_scale, agent.args.seq_len
        agent.forward = lambda returns_to_go, observations, actions, timesteps, lengths: low + 0.5 * (high - low) * (
            1.0 + agent.act(returns_to_go * scale, (observations - mean) / std, 2 * (actions - low) / (high - low) - 1,
                            timesteps, lengths))  # the program: raw units in and out, the model's units inside
        example = (mean.new_zeros(2, k), mean.repeat(2, k, 1), low.repeat(2, k, 1),
                   torch.zeros(2, k, dtype=torch.long, device=mean.device), torch.full((2,), k, device=mean.device))
        agent.exported = move_to_device_pass(torch.export.export(  # any batch size; on the CPU, any machine loads it
            agent, example, dynamic_shapes=({0: torch.export.Dim("batch")},) * 5), "cpu")
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
    """--checkpoint: the saved agent on its own environment at its target returns (--eval-episodes, --seed,
    --capture-video and --target-returns apply)."""
    task = {k: v.to(device) if torch.is_tensor(v) else v for k, v in ckpt["task"].items()}
    try:
        agent = Agent(len(task["obs_mean"]), len(task["action_low"]), Args(**ckpt["args"]), device)
        agent.load_state_dict(ckpt["agent"])
    except Exception as e:  # arguments or networks that this version of the script no longer has
        fail(f"could not rebuild the agent of '{args.checkpoint}' ({type(e).__name__}): an earlier version of "
             f"{Args.exp_name}.py saved it; evaluate it with that version")
    video_folder = f"videos/eval__{Args.exp_name}__{args.seed}__{int(time.time())}" if args.capture_video else None
    envs = make_eval_envs(task, args.eval_episodes, video_folder)
    for target in args.target_returns or task["target_returns"]:
        returns = evaluate(agent, envs, task, args.seed, target)
        score = normalized_score(returns, task)
        print(f"{args.checkpoint} (trained on {task['dataset_id']}), evaluated in {envs[0].spec.id}: {len(returns)} "
              f"episodes, target return {target:g}, return {returns.mean():.1f} +- {returns.std():.1f}"
              + (f", normalized score {score:.1f}" if score is not None else " (the dataset has no reference scores)"))


# ---- Main ------------------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    stop = stop_on_signals({})
    args = tyro.cli(Args, description=__doc__.split("\n\n")[0])
    validate(args, {
        "--seq-len, --num-layers, --max-timestep need >= 1": min(args.seq_len, args.num_layers, args.max_timestep) > 0,
        f"--embedding-dim must be a positive multiple of --num-heads, got {args.embedding_dim} and {args.num_heads}":
            args.num_heads >= 1 and args.embedding_dim >= 1 and args.embedding_dim % args.num_heads == 0,
        "--dropout must lie in [0, 1) and --clip-grad be > 0": 0.0 <= args.dropout < 1.0 and args.clip_grad > 0,
        "--learning-rate must be > 0, --weight-decay and --warmup-steps >= 0": args.learning_rate > 0 and min(
            args.weight_decay, args.warmup_steps) >= 0,
        f"--reward-scale must be >= 0 (0: no return conditioning), got {args.reward_scale}": args.reward_scale >= 0,
        "--target-returns needs at least one return": args.target_returns is None or len(args.target_returns) > 0,
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
    # The returns to ask for (Sec. 5.2 conditions on returns up to and past the best in the data); saved with the task.
    task["target_returns"] = tuple(args.target_returns or (best := float(data["episode_returns"].max()), best / 2))
    print("target returns:", *(f"{r:g}" for r in task["target_returns"]),
          *([] if args.target_returns else ["(the dataset's best episode return and half of it)"]))
    table, split = transition_table(data, task, args.reward_scale)
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
    train_step = cuda_graph(lambda: agent.update(*minibatch(table, split, args.batch_size, args.seq_len)), args, device)
    loop = restore(ckpt, agent) if ckpt else {"step": 0, "scores": [], "elapsed": 0.0, "carry": {}}
    step, scores, eval_time, interval_steps, last = loop["step"], loop["scores"], 0.0, 0, args.total_steps
    first, train_start, interval_start = step, time.perf_counter(), time.perf_counter()  # this session's stretch
    carry = lambda: {}  # what DT keeps between steps beyond the agent and its optimizer: nothing  # noqa: E731
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
            by_target = {target: evaluate(agent, envs, task, args.seed, target) for target in task["target_returns"]}
            eval_time += time.perf_counter() - eval_start
            for target, r in by_target.items():  # a curve per target; the first's are also eval/return and the score
                writer.add_scalar(f"eval/return_target_{target:g}", r.mean(), step)
                if normalized_score(r, task) is not None:
                    writer.add_scalar(f"eval/normalized_score_target_{target:g}", normalized_score(r, task), step)
            returns = by_target[task["target_returns"][0]]
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
