"""Discrete Batch-Constrained deep Q-learning (BCQ): Q-learning restricted to the actions the data makes likely.

Fujimoto, Conti, Ghavamzadeh, Pineau (2019), "Benchmarking Batch Deep Reinforcement Learning Algorithms",
arXiv:1910.01708. Offline, Q-learning's max picks actions the dataset never tried, whose values are extrapolation. An
imitation network G(a|s), fitted to the data's actions, allows only actions at least `threshold` times as likely as
the most likely one; the Double DQN target and the policy take their argmax over those alone (Algorithm 1):
    allowed(s) = { a : G(a|s) / max_b G(b|s) >= threshold }   (threshold 0: Double DQN; 1: the G-argmax, i.e. BC)
    y = r + gamma * (1 - done) * Q_target(s', argmax_{a' in allowed(s')} Q(s', a'))
    L = Huber(Q(s, a) - y) - log G(a|s) + 0.01 * mean(logits_G(s)^2)
Run: python bcq_discrete.py --dataset-id local/cartpole/medium-v0 --threshold 0.3
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
    dataset_id: str = "local/cartpole/medium-v0"
    """Minari dataset id (local datasets are found under MINARI_DATASETS_PATH)"""
    download: bool = True
    """let Minari download the dataset if it is not found locally"""
    total_steps: int = 1_000_000
    """number of gradient steps"""
    batch_size: int = 64
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

    # Algorithm specific arguments
    discount: float = 0.99
    """discount factor gamma"""
    tau: float = 0.005
    """target-network smoothing coefficient"""
    hidden_dims: tuple[int, ...] = (256, 256)
    """hidden layer sizes of every network"""
    critic_lr: float = 3e-4
    """learning rate of the one Adam over Q and G"""
    threshold: float = 0.3
    """allow actions with G(a|s) / max_b G(b|s) >= threshold, in [0, 1]: 0 is Double DQN, 1 behaviour cloning"""
    logit_penalty: float = 1e-2
    """weight of the mean squared logits of G in the loss (the official 1e-2; d3rlpy's beta is 0.5)"""


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
    """ReLU layers with nn.Linear's default initialization, as in the official FC_Q: one for Q(s, .), one for G's
    logits, with no layer in common (its Atari network shares the conv trunk, and d3rlpy shares the encoder)."""
    dims = [in_dim, *hidden_dims]
    hidden = [m for d, h in zip(dims[:-1], dims[1:]) for m in (nn.Linear(d, h), nn.ReLU(inplace=True))]
    return nn.Sequential(*hidden, nn.Linear(dims[-1], out_dim))


# ---- The algorithm: losses (paper equations), then the agent and its update -----------------------------------------
def constrained_argmax(q: torch.Tensor, logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1's argmax of Q over the actions with G(a|s) / max_b G(b|s) >= threshold, and that mask. The ratio is
    exp(logit - max logit): softmax's normalizer cancels. The official code (and d3rlpy) writes >, under which
    threshold 1 allows nothing; >= keeps the paper's reading that threshold 1 is behaviour cloning (G's argmax)."""
    allowed = (logits - logits.max(1, keepdim=True).values).exp() >= threshold
    return q.masked_fill(~allowed, -torch.inf).argmax(1), allowed


class Agent(nn.Module):
    def __init__(self, obs_dim: int, action_dim: int, args: Args, device: torch.device):
        super().__init__()
        self.args = args
        self.q = mlp(obs_dim, args.hidden_dims, action_dim)  # action_dim: the number of actions, one output each
        self.imitation = mlp(obs_dim, args.hidden_dims, action_dim)  # G's logits
        self.target_q = mlp(obs_dim, args.hidden_dims, action_dim)  # none for G: backups read Q alone
        self.target_q.requires_grad_(False).load_state_dict(self.q.state_dict())
        self.to(device)
        # fused: one kernel per optimizer (about 8% more updates/s on a CPU); capturable: cuda_graph can capture it.
        adam = {"fused": True, "capturable": device.type == "cuda" and args.cudagraphs}
        self.opt = torch.optim.Adam([*self.q.parameters(), *self.imitation.parameters()], lr=args.critic_lr, **adam)
        self.online, self.targets = list(self.q.parameters()), list(self.target_q.parameters())

    def update(self, obs, actions, rewards, next_obs, terminals) -> dict:
        """One step of Algorithm 1 on Q and G together; returns detached tensors, read at log time."""
        a, actions = self.args, actions.squeeze(1).long()  # the index column, exact in float32
        # (1) The target: the allowed argmax of the online Q at s', valued by the target Q (Double DQN), so an action G
        # deems unlikely never enters a backup, however high its Q. A time-limit end is not terminal.
        with torch.no_grad():  # y is a constant of the regression: no graph for the passes over s'
            next_actions, allowed = constrained_argmax(self.q(next_obs), self.imitation(next_obs), a.threshold)
            q_next = self.target_q(next_obs).gather(1, next_actions[:, None]).squeeze(1)
            q_target = rewards + a.discount * (1.0 - terminals) * q_next

        # (2) Huber on Q (the official smooth_l1_loss), G's negative log-likelihood of the data's actions, and the
        # official penalty on G's logits, which keeps them finite once G is sure.
        q_all, logits = self.q(obs), self.imitation(obs)
        q_data = q_all.gather(1, actions[:, None]).squeeze(1)
        critic_loss = nn.functional.smooth_l1_loss(q_data, q_target)
        imitation_loss = nn.functional.cross_entropy(logits, actions)
        penalty = logits.pow(2).mean()
        # (3) One backward through their sum and one Adam step for Q and G together, as the official code.
        self.opt.zero_grad(set_to_none=True)
        (critic_loss + imitation_loss + a.logit_penalty * penalty).backward()
        self.opt.step()
        acted = constrained_argmax(q_all.detach(), logits.detach(), a.threshold)[0]  # the policy's action at s

        # (4) Polyak averaging of the target networks.
        with torch.no_grad():
            torch._foreach_lerp_(self.targets, self.online, a.tau)

        return {
            "losses/critic_loss": critic_loss.detach(),
            "losses/imitation_loss": imitation_loss.detach(),
            "losses/logit_penalty": penalty.detach(),
            "values/q_data": q_data.detach().mean(),
            "values/q_target_action": q_next.mean(),
            "values/q_target": q_target.mean(),
            "values/allowed_actions": allowed.sum(1).float().mean(),
            "values/imitation_accuracy": (logits.detach().argmax(1) == actions).float().mean(),
            "values/agreement_with_data": (acted == actions).float().mean(),
        }

    def act(self, obs: torch.Tensor) -> torch.Tensor:
        """Algorithm 1's policy, the allowed argmax of Q at s, as int64 indices (the official non-Atari evaluation takes
        no random actions)."""
        return constrained_argmax(self.q(obs), self.imitation(obs), self.args.threshold)[0]


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
    """One episode per environment, stepped together: one policy call (standardized observations to action indices)
    per time step for the unfinished ones. Episode i starts from reset(seed=seed + i) and ends at the time limit.
    Returns each episode's return, discounted when a discount is given (fqe.py's ground truth)."""
    obs = [env.reset(seed=seed + i)[0] for i, env in enumerate(envs)]
    returns, running, low, high = np.zeros(len(envs)), list(range(len(envs))), task["action_low"], task["action_high"]
    for t in range(gym.envs.registration.EnvSpec.from_json(task["env_spec"]).max_episode_steps or 1000):
        x = torch.as_tensor(np.stack([obs[i] for i in running]), dtype=torch.float32, device=low.device)
        actions = policy((x - task["obs_mean"]) / task["obs_std"])
        for i, action in zip(list(running), (low + actions).cpu().numpy()):  # index + the space's first action
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


# ---- Harness: loading, user errors, checkpoints, CUDA graphs; not the algorithm, the others' text but for actions --
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
             "`python benchmark/make_datasets.py --task cartpole` builds local/cartpole/* in seconds")
    obs_space, space = dataset.spec.observation_space, dataset.spec.action_space
    if not isinstance(space, gym.spaces.Discrete):
        fail(f"{Args.exp_name}.py needs discrete actions; '{dataset_id}' has {space}: for continuous actions use "
             "iql.py, cql_continuous.py, bcq.py, awr.py, mopo.py or dt.py")
    if not all(isinstance(s, gym.spaces.Box) and len(s.shape) == 1 for s in
               (obs_space.spaces.values() if isinstance(obs_space, gym.spaces.Dict) else [obs_space])):
        fail(f"observations must be a flat Box vector (or a dict of them, concatenated); got {obs_space}")
    return dataset


def load_data(args: Args, device: torch.device) -> tuple[dict, dict]:
    """The transitions (numpy), each action its index in the Discrete space, and the task: all that evaluation needs
    besides the policy (env spec with time limit, observation statistics, action bounds, reference scores)."""
    dataset = load_minari(args.dataset_id, args.download)
    data = episodes_to_transitions(dataset.iterate_episodes(), dataset.spec.observation_space)
    space = dataset.spec.action_space
    low, high = np.array([space.start]), np.array([space.start + space.n - 1])  # the first and the last action
    data["actions"] -= low  # the index, exact in float32; evaluation adds low back
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
        agent.forward = lambda obs: low + agent.act((obs - mean) / std)  # the program: int64, the index when low is 0
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
        agent = Agent(len(task["obs_mean"]), int(task["action_high"] - task["action_low"]) + 1, Args(**ckpt["args"]),
                      device)
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
        f"--threshold must lie in [0, 1], got {args.threshold} (the paper's: 0.3)": 0.0 <= args.threshold <= 1.0,
        f"--logit-penalty must be >= 0, got {args.logit_penalty}": args.logit_penalty >= 0,
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

    agent = Agent(split[0], int(task["action_high"] - task["action_low"]) + 1, args, device)
    train_step = cuda_graph(lambda: agent.update(*minibatch(table, split, args.batch_size)), args, device)
    loop = restore(ckpt, agent) if ckpt else {"step": 0, "scores": [], "elapsed": 0.0, "carry": {}}
    step, scores, eval_time, interval_steps, last = loop["step"], loop["scores"], 0.0, 0, args.total_steps
    first, train_start, interval_start = step, time.perf_counter(), time.perf_counter()  # this session's stretch
    carry = lambda: {}  # what BCQ keeps between steps beyond the agent and its optimizer: nothing  # noqa: E731
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
