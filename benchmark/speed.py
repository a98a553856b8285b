"""Speed of each script's training step: updates per second at a given batch size after warm-up, the FLOPs of one
update (counted by torch.utils.flop_counter, forward and backward), and the fraction of this machine's measured
matmul throughput that the loop reaches.

    python benchmark/speed.py --scripts iql cql_continuous bcq --threads 1
    python benchmark/speed.py --scripts bcq --batch-size 100   # BCQ's own batch size
    python benchmark/speed.py --scripts iql --device cuda                   # the step captured in a CUDA graph
    python benchmark/speed.py --scripts iql --device cuda --no-cudagraphs   # the same step, eager
    python benchmark/speed.py --scripts mopo mopo_rollout --steps 20   # a rollout row counts rollouts per second
    python benchmark/speed.py --scripts fqe --batch-size 100 --fqe-bootstrap 0   # fqe.py at d3rlpy FQE's settings

The step is timed as the script's main loop runs it: a minibatch drawn with torch.randint from a dataset-sized table
on the device, then one update. Data are random with Hopper's shapes (11-d observations, 3-d actions); speed does
not depend on the values.
"""

import importlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


@dataclass
class Args:
    scripts: tuple[str, ...] = ("iql",)
    """scripts to measure (file names without .py)"""
    device: str = "cpu"
    """cpu or cuda"""
    cudagraphs: bool = True
    """on CUDA, time the step captured in one CUDA graph, as the scripts run it (--no-cudagraphs: eager)"""
    threads: int = 1
    """torch CPU threads"""
    batch_size: int = 256
    warmup: int = 50
    steps: int = 500
    dataset_size: int = 1_000_000
    obs_dim: int = 11
    action_dim: int = 3
    cql_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """CQL's hidden sizes (the reduced-budget benchmarks use 256 256)"""
    fqe_bootstrap: int = 0
    """fqe.py's bootstrap fits beside its full-data fit (0: one Q network, as d3rlpy's FQE)"""
    keep_freed_memory: bool = True
    """tune glibc's allocator where the script does at start (cql_continuous, mopo); False: glibc's defaults"""


def random_table(args: Args, device: torch.device, rows: int) -> tuple[torch.Tensor, list]:
    """A table in transition_table's layout with Hopper's shapes: actions in [-1, 1], terminals 0 or 1."""
    split = [args.obs_dim, args.action_dim, 1, args.obs_dim, 1]
    table = torch.randn(rows, sum(split), device=device)
    table[:, args.obs_dim:args.obs_dim + args.action_dim].uniform_(-1, 1)
    table[:, -1] = (table[:, -1] > 2).float()
    return table, split


def training_step(name: str, args: Args, device: torch.device, **config):
    """The script's main-loop step: a minibatch drawn on the device from a dataset-sized table, then one update.
    Returns the step, the script's module and its Args (which say whether the step is captured)."""
    module = importlib.import_module(name)
    config = module.Args(batch_size=args.batch_size, cudagraphs=args.cudagraphs, **config)
    agent = module.Agent(args.obs_dim, args.action_dim, config, device)
    table, split = random_table(args, device, args.dataset_size)
    return (lambda: agent.update(*module.minibatch(table, split, args.batch_size))), module, config


def awr_step(args: Args, device: torch.device):
    """AWR's policy step (its value steps are cheaper: one small network, no action input)."""
    import awr

    config = awr.Args(batch_size=args.batch_size, cudagraphs=args.cudagraphs)
    agent = awr.Agent(args.obs_dim, args.action_dim, config, device)
    obs = torch.randn(args.dataset_size, args.obs_dim, device=device)
    actions = torch.rand(args.dataset_size, args.action_dim, device=device) * 2 - 1
    weights = torch.rand(args.dataset_size, device=device)

    def step():
        idx = torch.randint(args.dataset_size, (args.batch_size,), device=device)
        return agent.update(obs[idx], actions[idx], weights[idx])

    return step, awr, config


def awr_value_step(args: Args, device: torch.device):
    """AWR's value step: V regressed onto a minibatch of its TD(lambda) targets."""
    import awr

    config = awr.Args(batch_size=args.batch_size, cudagraphs=args.cudagraphs)
    agent = awr.Agent(args.obs_dim, args.action_dim, config, device)
    obs = torch.randn(args.dataset_size, args.obs_dim, device=device)
    targets = torch.randn(args.dataset_size, device=device) * 100

    def step():
        idx = torch.randint(args.dataset_size, (args.batch_size,), device=device)
        return agent.value_step(obs[idx], targets[idx])

    return step, awr, config


def mopo_step(args: Args, device: torch.device):
    """MOPO's SAC step on a batch of 5% dataset rows and 95% model rows, as mopo.py draws it; rollouts are timed
    apart (mopo_rollout)."""
    import mopo

    config = mopo.Args(batch_size=args.batch_size, cudagraphs=args.cudagraphs)
    agent = mopo.Agent(args.obs_dim, args.action_dim, config, device)
    table, split = random_table(args, device, args.dataset_size)
    buffer = mopo.ModelBuffer(config.rollout_batch_size * config.rollout_length * config.model_retain_epochs,
                              sum(split), device)
    buffer.add(random_table(args, device, buffer.capacity)[0])
    num_real = int(config.batch_size * config.real_ratio)

    def step():
        real, fake = mopo.minibatch(table, split, num_real), buffer.sample(split, args.batch_size - num_real)
        return agent.update(*(torch.cat(pair) for pair in zip(real, fake)), num_real)

    return step, mopo, config


def mopo_rollout_step(args: Args, device: torch.device):
    """One of MOPO's model rollouts (the default 50,000 start states for 5 steps through the 7-member ensemble, run
    once every 1000 SAC steps), eager as in mopo.py; its row in the table counts rollouts per second."""
    import mopo

    config = mopo.Args(cudagraphs=False)
    model = mopo.EnsembleDynamics(args.obs_dim, args.action_dim, config.dynamics_hidden_dims, config.num_ensemble,
                                  config.num_elites).to(device)
    actor = mopo.TanhGaussianPolicy(args.obs_dim, args.action_dim, config.hidden_dims).to(device)
    starts = torch.randn(args.dataset_size, args.obs_dim, device=device)

    @torch.no_grad()
    def step():
        idx = torch.randint(args.dataset_size, (config.rollout_batch_size,), device=device)
        return mopo.rollout(model, lambda o: mopo.sample_tanh_gaussian(*actor(o))[0], starts[idx],
                            config.rollout_length, config.penalty_coef, mopo.never_done)

    return step, mopo, config


def fqe_step(args: Args, device: torch.device):
    """fqe.py's step as its main loop runs it: a minibatch of transitions with pi's precomputed next actions and every
    fit's bootstrap counts, then one update of every fit."""
    import fqe

    config = fqe.Args(policy="x", batch_size=args.batch_size, cudagraphs=args.cudagraphs,
                      num_bootstrap=args.fqe_bootstrap)
    agent = fqe.Agent(args.obs_dim, args.action_dim, config, device)
    table, split = random_table(args, device, args.dataset_size)
    fits = 1 + args.fqe_bootstrap
    table = torch.cat([table, torch.rand(len(table), args.action_dim, device=device) * 2 - 1,
                       torch.randint(3, (len(table), fits), device=device).float()], 1)
    split = [*split, args.action_dim, fits]

    def step():
        obs, actions, rewards, next_obs, dones, next_actions, counts = table[torch.randint(
            len(table), (args.batch_size,), device=device)].split(split, dim=1)
        return agent.update(obs, actions, rewards.squeeze(1), next_obs, dones.squeeze(1), next_actions, counts,
                            -100.0, 100.0)

    return step, fqe, config


def discrete_step(name: str, args: Args, device: torch.device, actions: int = 4):
    """bcq_discrete.py's or cql_discrete.py's step on a table with one action column, each action an index in
    [0, actions) (LunarLander's four): the script's own minibatch, then one update."""
    module = importlib.import_module(name)
    config = module.Args(batch_size=args.batch_size, cudagraphs=args.cudagraphs)
    agent = module.Agent(args.obs_dim, actions, config, device)
    table, split = random_table(args, device, args.dataset_size)
    table = torch.cat([table[:, :args.obs_dim], torch.randint(actions, (len(table), 1), device=device).float(),
                       table[:, args.obs_dim + args.action_dim:]], 1)
    split = [args.obs_dim, 1, *split[2:]]
    return (lambda: agent.update(*module.minibatch(table, split, args.batch_size))), module, config


def dt_step(args: Args, device: torch.device):
    """dt.py's step: windows of its sequence length drawn from a table in its layout (episodes of 1000 steps), then one
    update, at its default model; --batch-size as given (dt.py's default is 64)."""
    import dt

    config = dt.Args(batch_size=args.batch_size, cudagraphs=args.cudagraphs)
    agent = dt.Agent(args.obs_dim, args.action_dim, config, device)
    table, _ = random_table(args, device, args.dataset_size)
    t = torch.arange(args.dataset_size, device=device) % 1000
    table = torch.cat([table[:, :args.obs_dim + args.action_dim], torch.rand_like(table[:, :1]),
                       t[:, None].float(), (999 - t)[:, None].float()], 1)
    split = [args.obs_dim, args.action_dim, 1, 1, 1]
    return (lambda: agent.update(*dt.minibatch(table, split, args.batch_size, config.seq_len))), dt, config


STEPS = {"iql": lambda a, d: training_step("iql", a, d),
         "cql_continuous": lambda a, d: training_step("cql_continuous", a, d, hidden_dims=a.cql_hidden_dims),
         "bcq": lambda a, d: training_step("bcq", a, d), "awr": awr_step, "awr_value": awr_value_step,
         "mopo": mopo_step, "mopo_rollout": mopo_rollout_step, "fqe": fqe_step,
         "bcq_discrete": lambda a, d: discrete_step("bcq_discrete", a, d),
         "cql_discrete": lambda a, d: discrete_step("cql_discrete", a, d), "dt": dt_step}


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_throughput(device: torch.device, n: int) -> float:
    """FLOP/s of an n x n x n matmul, the shape class of a 256-wide layer on a 256 batch."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    reps = max(10, int(2e10 / (2 * n**3))) if device.type == "cuda" else max(10, int(4e9 / (2 * n**3)))
    for _ in range(5):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def script_of(name: str) -> str:
    """The script a row times: mopo_rollout is mopo.py's, awr_value awr.py's."""
    return {"mopo_rollout": "mopo", "awr_value": "awr"}.get(name, name)


def tunes_allocator(name: str) -> bool:
    """Whether the script calls keep_freed_memory() at start."""
    return "def keep_freed_memory" in (Path(__file__).resolve().parent.parent / f"{script_of(name)}.py").read_text()


def main(args: Args):
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = max(matmul_throughput(device, 256), matmul_throughput(device, 1024))
    print(f"device {device}, {args.threads} thread(s): measured matmul throughput {peak / 1e9:.1f} GFLOP/s")
    print("| script | step | updates/s | GFLOP per update | GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|---|---|")
    # The allocator setting holds for the rest of the process, so the scripts that leave glibc's defaults run first.
    for name in sorted(args.scripts, key=tunes_allocator):
        if args.keep_freed_memory and tunes_allocator(name):
            importlib.import_module(script_of(name)).keep_freed_memory()
        eager, module, config = STEPS[name](args, device)
        with FlopCounterMode(display=False) as counter:  # one eager step, counted before any capture
            eager()
        flops = counter.get_total_flops()
        # The script's own capture (cuda_graph in its harness): on CUDA with --cudagraphs, one CUDA graph per step.
        step = eager if name == "mopo_rollout" else module.cuda_graph(eager, config, device)
        kind = "CUDA graph" if step is not eager else "eager"
        for _ in range(args.warmup):
            step()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        ups = args.steps / (time.perf_counter() - start)
        print(f"| {name} | {kind} | {ups:.3g} | {flops / 1e9:.3f} | {ups * flops / 1e9:.1f} | "
              f"{ups * flops / peak:.0%} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
