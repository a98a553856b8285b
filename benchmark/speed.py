"""Speed of each script's training step: updates per second at a given batch size after warm-up, the FLOPs of one
update (counted by torch.utils.flop_counter, forward and backward), and the fraction of this machine's measured
matmul throughput that the loop reaches.

    python benchmark/speed.py --scripts iql cql_continuous bcq --threads 1
    python benchmark/speed.py --scripts bcq --batch-size 100   # BCQ's own batch size
    python benchmark/speed.py --scripts iql --device cuda
    python benchmark/speed.py --scripts mopo mopo_rollout --steps 20   # a rollout row counts rollouts per second

The step is timed as the script's main loop runs it: a minibatch drawn with torch.randint from a dataset-sized table
on the device, then one update. Data are random with Hopper's shapes (11-d observations, 3-d actions); speed does
not depend on the values.
"""

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
    threads: int = 1
    """torch CPU threads"""
    batch_size: int = 256
    warmup: int = 50
    steps: int = 500
    dataset_size: int = 1_000_000
    obs_dim: int = 11
    action_dim: int = 3
    cql_hidden_dims: tuple[int, ...] = (256, 256, 256)
    """CQL's hidden sizes (the issue's reduced-budget comparison uses 256 256)"""
    keep_freed_memory: bool = True
    """tune glibc's allocator as every script does at start (False: glibc's defaults, as a library would run)"""


def training_step(agent, args: Args, device: torch.device, **update_kwargs):
    """The main loop's body: a minibatch gathered from a dataset-sized table on the device, then one update."""
    split = [args.obs_dim, args.action_dim, 1, args.obs_dim, 1]
    table = torch.randn(args.dataset_size, sum(split), device=device)
    table[:, args.obs_dim:args.obs_dim + args.action_dim].uniform_(-1, 1)
    table[:, -1] = (table[:, -1] > 2).float()

    def step():
        idx = torch.randint(args.dataset_size, (args.batch_size,), device=device)
        obs, actions, rewards, next_obs, terminals = table[idx].split(split, dim=1)
        return agent.update(obs, actions, rewards.squeeze(1), next_obs, terminals.squeeze(1), **update_kwargs)

    return step


def iql_step(args: Args, device: torch.device):
    import iql

    return training_step(iql.Agent(args.obs_dim, args.action_dim, iql.Args(batch_size=args.batch_size), device), args,
                         device)


def cql_continuous_step(args: Args, device: torch.device):
    import cql_continuous

    config = cql_continuous.Args(batch_size=args.batch_size, hidden_dims=args.cql_hidden_dims)
    return training_step(cql_continuous.Agent(args.obs_dim, args.action_dim, config, device), args, device)


def bcq_step(args: Args, device: torch.device):
    import bcq

    return training_step(bcq.Agent(args.obs_dim, args.action_dim, bcq.Args(batch_size=args.batch_size), device), args,
                         device)


def awr_step(args: Args, device: torch.device):
    """AWR's policy step (its value steps are cheaper: one small network, no action input)."""
    import awr

    agent = awr.Agent(args.obs_dim, args.action_dim, awr.Args(batch_size=args.batch_size), device)
    obs = torch.randn(args.dataset_size, args.obs_dim, device=device)
    actions = torch.rand(args.dataset_size, args.action_dim, device=device) * 2 - 1
    weights = torch.rand(args.dataset_size, device=device)

    def step():
        idx = torch.randint(args.dataset_size, (args.batch_size,), device=device)
        return agent.policy_step(obs[idx], actions[idx], weights[idx])

    return step


def mopo_step(args: Args, device: torch.device):
    """MOPO's SAC step on a batch mixing real and model rows (5% real by default); the rollouts are timed apart."""
    import mopo

    config = mopo.Args(batch_size=args.batch_size)
    agent = mopo.Agent(args.obs_dim, args.action_dim, config, device)
    num_real = int(config.batch_size * config.real_ratio)
    return training_step(agent, args, device, num_real=num_real)


def mopo_rollout_step(args: Args, device: torch.device):
    """One of MOPO's model rollouts (the default 50,000 start states for 5 steps through the 7-member ensemble, run
    once every 1000 SAC steps); its row in the table counts rollouts per second."""
    import mopo

    config = mopo.Args()
    model = mopo.EnsembleDynamics(args.obs_dim, args.action_dim, config.dynamics_hidden_dims, config.num_ensemble,
                                  config.num_elites).to(device)
    actor = mopo.TanhGaussianPolicy(args.obs_dim, args.action_dim, config.hidden_dims).to(device)
    starts = torch.randn(args.dataset_size, args.obs_dim, device=device)

    @torch.no_grad()
    def step():
        idx = torch.randint(args.dataset_size, (config.rollout_batch_size,), device=device)
        return mopo.rollout(model, lambda o: mopo.sample_tanh_gaussian(*actor(o))[0], starts[idx],
                            config.rollout_length, config.penalty_coef, mopo.never_done)

    return step


STEPS = {"iql": iql_step, "cql_continuous": cql_continuous_step, "bcq": bcq_step, "awr": awr_step, "mopo": mopo_step,
         "mopo_rollout": mopo_rollout_step}


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


def main(args: Args):
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        import iql  # the five scripts share this function

        iql.keep_freed_memory()
    device = torch.device(args.device)
    peak = max(matmul_throughput(device, 256), matmul_throughput(device, 1024))
    print(f"device {device}, {args.threads} thread(s): measured matmul throughput {peak / 1e9:.1f} GFLOP/s")
    print("| script | updates/s | GFLOP per update | GFLOP/s | fraction of matmul peak |")
    print("|---|---|---|---|---|")
    for name in args.scripts:
        step = STEPS[name](args, device)
        for _ in range(args.warmup):
            step()
        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
        sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        ups = args.steps / (time.perf_counter() - start)
        print(f"| {name} | {ups:.3g} | {flops / 1e9:.3f} | {ups * flops / 1e9:.1f} | {ups * flops / peak:.0%} |")


if __name__ == "__main__":
    main(tyro.cli(Args))
