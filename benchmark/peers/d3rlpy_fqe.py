"""Peer baseline for off-policy evaluation: d3rlpy's Fitted Q Evaluation (d3rlpy.ope.FQE, Le et al. 2019,
arXiv:1903.08738) of one of our exported policies on a Minari dataset, for the estimate and speed comparisons with our
FQE.

Not part of the project's scripts or tests; it runs in d3rlpy_peer.py's environment:
    python -m venv peer && peer/bin/pip install torch==2.13.0 && \
        peer/bin/pip install d3rlpy==2.8.1 minari h5py pillow "gymnasium[mujoco]==1.0.0"
    python iql.py --dataset-id local/hopper/medium-replay-v0   # writes runs/<run>/iql_policy.pt2
    peer/bin/python benchmark/peers/d3rlpy_fqe.py --policy runs/<run>/iql_policy.pt2 \
        --dataset-id local/hopper/medium-replay-v0 --steps 100000 --log-every 5000 --out peer_fqe.json
Speed alone (updates/s after --warmup steps, in d3rlpy's own `fit` loop and in `update` alone, 1 thread by default):
    ... d3rlpy_fqe.py --policy runs/<run>/iql_policy.pt2 --speed [--batch-size 256]

What it does:
  Data: the episodes as stored (raw observations and actions, rewards); terminals from terminations, the others end
    in a timeout. Every transition (s, a, r, s') of the dataset is kept, so only terminations stop bootstrapping:
    d3rlpy stores one observation per step and drops an episode's last transition unless it terminated, so an episode
    ended by a truncation keeps its final observation and gets one padding step (zero action, zero reward) that is
    never sampled, only read as the last transition's s'.
  Policy: torch.export.load(--policy).module(), raw observations in, environment actions out. FQE only needs the
    algorithm it evaluates for next actions: FQE.inner_create_impl asserts `algo.impl` and hands it to FQEImpl, whose
    inner_update calls `algo.impl.predict_best_action(batch.next_observations)` (d3rlpy/ope/fqe.py,
    d3rlpy/ope/torch/fqe_impl.py). ExportedPolicy below answers that call (and `predict`, which FQE.predict and
    d3rlpy's initial-state evaluator use); d3rlpy's Q network, loss, target network and training loop are untouched.
    A stochastic policy (BCQ samples candidates) draws from torch's global generator, seeded by d3rlpy.seed(--seed);
    the initial-state actions are drawn once under torch.manual_seed(--seed).
  FQE: d3rlpy's defaults unless overridden: Adam lr 1e-4, batch 100, one Q network (n_critics 1) on obs and action
    concatenated, an MLP 256-256 ReLU, MSE to r + gamma (1 - terminal) Q'(s', pi(s')), Q' a hard copy every 100
    updates, no observation, action or reward scaling (--standardize-observations adds d3rlpy's
    StandardObservationScaler for the Q network; the policy still gets raw observations).
  Estimate: J(pi) = mean over the dataset's episode starts of Q(s0, pi(s0)) (FQE.predict_value), in raw reward units
    at --gamma, every --log-every steps and at the end; at the end also d3rlpy's own
    InitialStateValueEstimationEvaluator and, for scale, the dataset's mean discounted return from its starts.
"""

import argparse
import json
import time

import d3rlpy
import minari
import numpy as np
import torch

parser = argparse.ArgumentParser()
parser.add_argument("--policy", required=True, help="an exported policy, runs/<run>/<script>_policy.pt2")
parser.add_argument("--dataset-id", default="local/hopper/medium-replay-v0")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--steps", type=int, default=100_000, help="gradient steps")
parser.add_argument("--log-every", type=int, default=5_000, help="estimate every this many steps")
parser.add_argument("--gamma", type=float, default=0.99)
parser.add_argument("--learning-rate", type=float, default=None, help="default: d3rlpy's (1e-4)")
parser.add_argument("--batch-size", type=int, default=None, help="default: d3rlpy's (100)")
parser.add_argument("--target-update-interval", type=int, default=None, help="default: d3rlpy's (100)")
parser.add_argument("--n-critics", type=int, default=None, help="default: d3rlpy's (1)")
parser.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256])
parser.add_argument("--standardize-observations", action="store_true", help="d3rlpy's StandardObservationScaler")
parser.add_argument("--out", default="peer_fqe.json")
parser.add_argument("--speed", action="store_true", help="measure updates/s only, no estimates")
parser.add_argument("--speed-steps", type=int, default=500)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--threads", type=int, default=None, help="torch threads (--speed: 1 unless given)")
parser.add_argument("--device", default="cpu:0", help="d3rlpy's device, e.g. cuda:0")
args = parser.parse_args()
if args.threads or args.speed:
    torch.set_num_threads(args.threads or 1)

d3rlpy.seed(args.seed)
ds = minari.load_dataset(args.dataset_id)
obs, act, rew, term, tout, starts, disc_returns = [], [], [], [], [], [], []
for ep in ds.iterate_episodes():
    o, a, r = np.asarray(ep.observations, np.float32), np.asarray(ep.actions, np.float32), np.asarray(ep.rewards)
    starts.append(o[0])
    disc_returns.append(float(np.sum(r * args.gamma ** np.arange(len(r)))))
    t = np.zeros(len(r) + 1, dtype=np.float32)
    if ep.terminations[-1]:  # T steps; d3rlpy's last transition is terminal, its s' zeros, never bootstrapped
        o, t = o[:-1], t[:-1]
        term.append(np.eye(1, len(r), len(r) - 1, dtype=np.float32)[0])
    else:  # T + 1 observations and a padding step: d3rlpy keeps T transitions, the last with its real s'
        a, r = np.concatenate([a, np.zeros_like(a[:1])]), np.concatenate([r, np.zeros_like(r[:1])])
        term.append(t.copy())
        t[-1] = 1.0
    obs.append(o)
    act.append(a)
    rew.append(r)
    tout.append(t)
dataset = d3rlpy.dataset.MDPDataset(
    np.concatenate(obs), np.concatenate(act), np.concatenate(rew).astype(np.float32), np.concatenate(term),
    np.concatenate(tout))
starts = np.stack(starts)
assert dataset.transition_count == ds.total_steps, (dataset.transition_count, ds.total_steps)

program = torch.export.load(args.policy)
if not args.device.startswith("cpu"):
    from torch.export.passes import move_to_device_pass
    program = move_to_device_pass(program, args.device)
policy = program.module()


class ExportedPolicy:
    """Stands in for the d3rlpy algorithm FQE evaluates: `impl.predict_best_action` gets the next observations as
    FQE's minibatch holds them (after FQE's observation scaler, if any), `predict` raw observations as numpy."""

    def __init__(self):
        self.impl = self  # FQE asserts algo.impl and calls algo.impl.predict_best_action

    def predict_best_action(self, x):
        if fqe.config.observation_scaler is not None:
            x = fqe.config.observation_scaler.reverse_transform(x)
        with torch.no_grad():
            return policy(x)

    def predict(self, x):
        with torch.no_grad(), torch.random.fork_rng(devices=[args.device] if args.device.startswith("cuda") else []):
            torch.manual_seed(args.seed)
            return policy(torch.as_tensor(x, dtype=torch.float32, device=args.device)).cpu().numpy()


defaults = d3rlpy.ope.FQEConfig()
config = d3rlpy.ope.FQEConfig(
    learning_rate=args.learning_rate or defaults.learning_rate,
    batch_size=args.batch_size or defaults.batch_size,
    target_update_interval=args.target_update_interval or defaults.target_update_interval,
    n_critics=args.n_critics or defaults.n_critics,
    gamma=args.gamma,
    encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=args.hidden_dims),
    observation_scaler=d3rlpy.preprocessing.StandardObservationScaler() if args.standardize_observations else None)
stand_in = ExportedPolicy()
fqe = d3rlpy.ope.FQE(algo=stand_in, config=config, device=args.device)
fit = dict(show_progress=False, save_interval=10**9, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
update_time, inner = [0.0], fqe.update
clock = {"first": None, "estimates": 0.0}


def timed_update(batch):
    start = time.perf_counter()
    if clock["first"] is None:
        clock["first"] = start
    out = inner(batch)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    update_time[0] += time.perf_counter() - start
    return out


fqe.update = timed_update

if args.speed:
    marks, horizon = {}, args.warmup + args.speed_steps

    def mark(algo_, epoch, total_step):
        if total_step == args.warmup:
            marks["start"], update_time[0] = time.perf_counter(), 0.0
        if total_step == horizon:
            marks["end"] = time.perf_counter()

    fqe.fit(dataset, n_steps=horizon, n_steps_per_epoch=horizon, callback=mark, **fit)
    print(f"d3rlpy FQE, {args.device}, batch {config.batch_size}, hidden {args.hidden_dims}, "
          f"{torch.get_num_threads()} thread(s): "
          f"{args.speed_steps / (marks['end'] - marks['start']):.1f} updates/s in fit, "
          f"{args.speed_steps / update_time[0]:.1f} updates/s in update alone")
    raise SystemExit(0)

start_actions = stand_in.predict(starts)  # pi(s0), drawn once (under a fixed seed for a stochastic policy)
curve = []


def estimate():
    return float(np.mean(fqe.predict_value(starts, start_actions)))


def callback(algo_, epoch, total_step):
    if total_step % args.log_every == 0 or total_step == args.steps:
        t0 = time.perf_counter()
        curve.append((total_step, estimate()))
        clock["estimates"] += time.perf_counter() - t0
        print(f"step {total_step}/{args.steps} | estimate {curve[-1][1]:9.3f}", flush=True)


fqe.fit(dataset, n_steps=args.steps, n_steps_per_epoch=args.steps, callback=callback, **fit)
ups = args.steps / (time.perf_counter() - clock["first"] - clock["estimates"])
d3rlpy_value = d3rlpy.metrics.InitialStateValueEstimationEvaluator()(fqe, dataset)
print(f"d3rlpy FQE estimate {curve[-1][1]:.3f} (d3rlpy's InitialStateValueEstimationEvaluator {d3rlpy_value:.3f}); "
      f"dataset's mean discounted return from its {len(starts)} starts {np.mean(disc_returns):.3f}; "
      f"{ups:.1f} updates/s in fit, {args.steps / update_time[0]:.1f} in update alone")
json.dump({"name": "d3rlpy_fqe", "policy": args.policy, "dataset_id": args.dataset_id, "seed": args.seed,
           "estimate": curve[-1][1], "curve": curve, "d3rlpy_initial_state_value_evaluator": d3rlpy_value,
           "dataset_mean_discounted_return": float(np.mean(disc_returns)), "episodes": len(starts),
           "transitions": int(dataset.transition_count), "updates_per_second": ups,
           "update_alone_updates_per_second": args.steps / update_time[0], "threads": torch.get_num_threads(),
           "args": vars(args), "fqe_config": config.serialize_to_dict(), "d3rlpy_version": d3rlpy.__version__,
           "torch_version": torch.__version__},
          open(args.out, "w"), indent=1)
