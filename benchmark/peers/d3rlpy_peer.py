"""Peer baselines: d3rlpy's IQL, CQL and BCQ, DiscreteBCQ and DiscreteCQL, and DecisionTransformer, on a Minari
dataset, trained and evaluated on the same schedule as our scripts, for the score and speed comparisons in the README.

Not part of the project's scripts or tests; it runs in its own environment:
    python -m venv peer && peer/bin/pip install torch==2.13.0 && \
        peer/bin/pip install d3rlpy==2.8.1 minari h5py pillow "gymnasium[mujoco]==1.0.0" box2d==2.3.10 pygame-ce
    python benchmark/make_datasets.py   # the local Hopper datasets, under MINARI_DATASETS_PATH
    peer/bin/python benchmark/peers/d3rlpy_peer.py --algo iql \
        --dataset-id local/hopper/medium-replay-v0 --seed 1 --total-steps 100000 --out peer_iql_1.json
Fine-tuning (iql): --online-steps N after the offline steps, as d3rlpy's reproduction does it
(reproductions/finetuning/iql_finetune.py): the actor's learning rate set back to 3e-4 at the switch, a FIFO buffer
filled with the dataset's episodes, and `fit_online` with one update per environment step, actions sampled from the
policy; the buffer holds the dataset and every online step (the reproduction's 1M rows would evict offline ones on a
1M-transition dataset). --speed with --online-steps times environment steps per second in fit_online instead.
Speed alone (updates/s after --warmup steps, in d3rlpy's own `fit` loop and in `update` alone):
    ... d3rlpy_peer.py --algo iql --speed --threads 1
    ... d3rlpy_peer.py --algo iql --speed --device cuda:0 [--compile-graph]

Settings (each the paper's, with standardized observations as our scripts use by default):
  iql: expectile 0.7, temperature 3, max weight 100, rewards x 1000 / return range, actor lr on a cosine schedule.
  cql: actor lr 1e-4, critic lr 3e-4, conservative weight 5 with a fixed alpha' (alpha_learning_rate 0, as
       cql_continuous.py without --lagrange-gap), 10 action samples, --hidden-dims for every network.
  bcq: VAE 750-750, actor and critic 400-300, lr 1e-3, batch 100, lambda 0.75, phi 0.05; --n-action-samples is used
       by d3rlpy both for the critic target and for acting.
  discrete_bcq, discrete_cql: the settings of bcq_discrete.py and cql_discrete.py (the official discrete BCQ's
       non-Atari ones): Q 256-256, Adam 3e-4, batch 64, gamma 0.99; BCQ threshold 0.3, the imitator's logit penalty
       1e-2 (the official code's; d3rlpy's default beta is 0.5) on an imitator of its own (share_encoder False, as the
       official network); CQL alpha 1. d3rlpy copies the target network every --target-update-interval steps where
       our scripts average it with tau 0.005; the default 200 = 1 / tau is the same time constant.
  dt: d3rlpy's reproduction (reproductions/offline/decision_transformer.py) with dt.py's defaults: context 20,
       embedding 128 (its state, return and action encoders one linear layer each), 3 layers, 1 head, dropout 0.1,
       AdamW 1e-4 with weight decay 1e-4 on the linear layers' weights (GPT's grouping), the gradient clipped at 0.25,
       a linear warm-up over 10,000 steps, batch 64, returns-to-go x 0.001, timesteps up to 1000. Evaluated through
       d3rlpy's stateful wrapper at --target-return (one episode at a time).
Evaluation: every --eval-every steps and at the end, --eval-episodes deterministic episodes seeded seed + i; the final
score is the mean normalized score of the last 3 evaluations.
"""

import argparse
import json
import time

import d3rlpy
import minari
import numpy as np
import torch

parser = argparse.ArgumentParser()
parser.add_argument("--algo", choices=["iql", "cql", "bcq", "discrete_bcq", "discrete_cql", "dt"], default="iql")
parser.add_argument("--dataset-id", default="local/hopper/medium-replay-v0")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--total-steps", type=int, default=100_000)
parser.add_argument("--eval-every", type=int, default=5_000)
parser.add_argument("--eval-episodes", type=int, default=10)
parser.add_argument("--hidden-dims", type=int, nargs="+", default=None, help="cql: hidden sizes (default 256 256 256)")
parser.add_argument("--n-action-samples", type=int, default=10, help="cql and bcq")
parser.add_argument("--batch-size", type=int, default=None,
                    help="default: the algorithm's (256; bcq 100; discrete and dt 64)")
parser.add_argument("--target-update-interval", type=int, default=200, help="discrete: steps between target copies")
parser.add_argument("--target-return", type=float, default=3600.0, help="dt: the return it is conditioned on")
parser.add_argument("--out", default="peer.json")
parser.add_argument("--speed", action="store_true", help="measure updates/s only, no evaluation")
parser.add_argument("--threads", type=int, default=None)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--device", default="cpu:0", help="d3rlpy's device, e.g. cuda:0")
parser.add_argument("--compile-graph", action="store_true", help="d3rlpy's compile_graph (torch.compile, CUDA graphs)")
parser.add_argument("--steps", type=int, default=500)
parser.add_argument("--online-steps", type=int, default=0, help="iql: environment steps of fine-tuning after offline")
parser.add_argument("--online-lr", choices=["reproduction", "constant"], default="reproduction",
                    help="iql: at the switch, set the actor's rate to 3e-4 and leave its cosine scheduler stepping, as "
                    "the reproduction does (PyTorch's chainable CosineAnnealingLR then multiplies that rate by about "
                    "k^2 after k steps: 3.0 after 100), or also drop the scheduler, for a rate constant at 3e-4")
args = parser.parse_args()
if args.threads:
    torch.set_num_threads(args.threads)

d3rlpy.seed(args.seed)
ds = minari.load_dataset(args.dataset_id)
obs, act, rew, term, tout = [], [], [], [], []
for ep in ds.iterate_episodes():
    # d3rlpy stores one observation per step: obs[:-1]; an episode not ended by a termination ends in a timeout.
    obs.append(ep.observations[:-1])
    act.append(ep.actions if ep.actions.dtype.kind == "i" else ep.actions.astype(np.float32))
    rew.append(ep.rewards)
    term.append(ep.terminations.astype(np.float32))
    t = np.zeros(len(ep.rewards), dtype=np.float32)
    if not ep.terminations[-1]:
        t[-1] = 1.0
    tout.append(t)
dataset = d3rlpy.dataset.MDPDataset(
    np.concatenate(obs).astype(np.float32), np.concatenate(act),
    np.concatenate(rew).astype(np.float32), np.concatenate(term), np.concatenate(tout))

scaler = d3rlpy.preprocessing.StandardObservationScaler()
horizon = max(args.warmup + args.steps if args.speed and not args.online_steps else args.total_steps, 1)
if args.algo == "iql":
    config = d3rlpy.algos.IQLConfig(compile_graph=args.compile_graph,
        actor_learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=args.batch_size or 256, gamma=0.99, tau=0.005,
        n_critics=2, expectile=0.7, weight_temp=3.0, max_weight=100.0,
        actor_optim_factory=d3rlpy.optimizers.AdamFactory(
            lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=horizon)),
        observation_scaler=scaler, reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0))
elif args.algo == "cql":
    net = d3rlpy.models.VectorEncoderFactory(hidden_units=args.hidden_dims or [256, 256, 256])
    config = d3rlpy.algos.CQLConfig(compile_graph=args.compile_graph,
        actor_learning_rate=1e-4, critic_learning_rate=3e-4, temp_learning_rate=1e-4, alpha_learning_rate=0.0,
        batch_size=args.batch_size or 256, gamma=0.99, tau=0.005, n_critics=2, conservative_weight=5.0,
        n_action_samples=args.n_action_samples, actor_encoder_factory=net, critic_encoder_factory=net,
        observation_scaler=scaler)
elif args.algo.startswith("discrete"):
    net = d3rlpy.models.VectorEncoderFactory(hidden_units=args.hidden_dims or [256, 256])
    common = dict(compile_graph=args.compile_graph, learning_rate=3e-4, batch_size=args.batch_size or 64, gamma=0.99,
                  target_update_interval=args.target_update_interval, encoder_factory=net, observation_scaler=scaler)
    config = (d3rlpy.algos.DiscreteBCQConfig(action_flexibility=0.3, beta=1e-2, share_encoder=False, **common)
              if args.algo == "discrete_bcq" else d3rlpy.algos.DiscreteCQLConfig(alpha=1.0, **common))
elif args.algo == "dt":
    config = d3rlpy.algos.DecisionTransformerConfig(compile_graph=args.compile_graph,
        batch_size=args.batch_size or 64, learning_rate=1e-4, context_size=20, num_heads=1, num_layers=3,
        max_timestep=1000, position_encoding_type=d3rlpy.PositionEncodingType.SIMPLE,
        optim_factory=d3rlpy.optimizers.GPTAdamWFactory(weight_decay=1e-4, clip_grad_norm=0.25,
            lr_scheduler_factory=d3rlpy.optimizers.WarmupSchedulerFactory(warmup_steps=10_000)),
        encoder_factory=d3rlpy.models.VectorEncoderFactory([128], exclude_last_activation=True),
        observation_scaler=scaler, reward_scaler=d3rlpy.preprocessing.MultiplyRewardScaler(0.001))
else:
    config = d3rlpy.algos.BCQConfig(compile_graph=args.compile_graph,
        actor_learning_rate=1e-3, critic_learning_rate=1e-3, imitator_learning_rate=1e-3,
        batch_size=args.batch_size or 100, gamma=0.99, tau=0.005, n_critics=2, lam=0.75, action_flexibility=0.05,
        n_action_samples=args.n_action_samples, beta=0.5,
        actor_encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[400, 300]),
        critic_encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[400, 300]),
        imitator_encoder_factory=d3rlpy.models.VectorEncoderFactory(hidden_units=[750, 750]),
        observation_scaler=scaler)
algo = config.create(device=args.device)
fit = dict(show_progress=False, save_interval=10**9, logger_adapter=d3rlpy.logging.NoopAdapterFactory())

if args.online_steps:  # the dataset's environment with its time limit, seeded apart from evaluation
    train_env = ds.recover_environment()
    d3rlpy.envs.seed_env(train_env, args.seed + 10**6)
    buffer = d3rlpy.dataset.create_fifo_replay_buffer(dataset.transition_count + args.online_steps,
                                                      episodes=dataset.episodes)  # filled with them


def switch():
    """What the reproduction does between fit and fit_online: the actor's learning rate back to its initial value (the
    cosine scheduler keeps stepping afterwards, unless --online-lr constant)."""
    for group in algo.impl._modules.actor_optim.optim.param_groups:
        group["lr"] = 3e-4
    if args.online_lr == "constant":
        algo.impl._modules.actor_optim._lr_scheduler = None


if args.speed:
    marks, update_time, inner = {}, [0.0], algo.update

    def timed_update(batch):
        start = time.perf_counter()
        out = inner(batch)
        update_time[0] += time.perf_counter() - start
        return out

    def mark(algo_, epoch, total_step):  # fit's gradient steps, or fit_online's environment steps
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        if total_step == args.warmup:
            marks["start"], update_time[0] = time.perf_counter(), 0.0
        if total_step == args.warmup + args.steps:
            marks["end"] = time.perf_counter()

    algo.update = timed_update
    if args.online_steps:  # one offline step builds the networks; the rate is timed online alone
        algo.fit(dataset, n_steps=1, n_steps_per_epoch=1, **fit)
        switch()
        algo.fit_online(train_env, buffer, n_steps=args.warmup + args.steps,
                        n_steps_per_epoch=args.warmup + args.steps, callback=mark, **fit)
    else:
        algo.fit(dataset, n_steps=horizon, n_steps_per_epoch=horizon, callback=mark, **fit)
    unit = "environment steps/s in fit_online (one update each)" if args.online_steps else "updates/s in fit"
    print(f"d3rlpy {args.algo.upper()}, {args.device}{', compile_graph' if args.compile_graph else ''}, "
          f"{torch.get_num_threads()} thread(s): {args.steps / (marks['end'] - marks['start']):.1f} {unit}, "
          f"{args.steps / update_time[0]:.1f} updates/s in update alone")
    raise SystemExit(0)

env = ds.recover_environment(eval_env=True)
ref_min, ref_max = ds.storage.metadata["ref_min_score"], ds.storage.metadata["ref_max_score"]
history, clock = [], {"start": time.perf_counter(), "eval": 0.0}


def evaluate(step):
    t0 = time.perf_counter()
    returns = []
    for i in range(args.eval_episodes):
        o, _ = env.reset(seed=args.seed + i)
        done, total, r = False, 0.0, 0.0
        wrapper = algo.as_stateful_wrapper(target_return=args.target_return) if args.algo == "dt" else None
        while not done:
            a = wrapper.predict(o.astype(np.float32), r) if wrapper else algo.predict(o[None].astype(np.float32))[0]
            o, r, terminated, truncated, _ = env.step(a)
            total += r
            done = terminated or truncated
        returns.append(total)
    clock["eval"] += time.perf_counter() - t0
    score = 100 * (np.mean(returns) - ref_min) / (ref_max - ref_min)
    ups = step / (time.perf_counter() - clock["start"] - clock["eval"])
    history.append({"step": step, "return": float(np.mean(returns)), "score": float(score), "updates_per_second": ups})
    if args.algo == "iql":  # the reproduction's fine-tuning sets it and its cosine scheduler goes on stepping it
        history[-1]["actor_lr"] = algo.impl._modules.actor_optim.optim.param_groups[0]["lr"]
    print(f"step {step}/{args.total_steps + args.online_steps} | return {np.mean(returns):8.1f} | score {score:5.1f} | "
          f"{ups:.0f} updates/s",
          flush=True)


def callback(algo_, epoch, total_step):
    if total_step % args.eval_every == 0 or total_step == args.total_steps:
        evaluate(total_step)


if args.total_steps:
    algo.fit(dataset, n_steps=args.total_steps, n_steps_per_epoch=args.eval_every, callback=callback, **fit)
if args.online_steps:
    if not args.total_steps:
        algo.build_with_dataset(dataset)
        evaluate(0)
    switch()
    algo.fit_online(train_env, buffer, n_steps=args.online_steps, n_steps_per_epoch=args.eval_every, **fit,
                    callback=lambda algo_, epoch, step: evaluate(args.total_steps + step) if (
                        step % args.eval_every == 0 or step == args.online_steps) else None)
final = float(np.mean([h["score"] for h in history[-3:]]))
print(f"final score (mean of the last 3 evaluations): {final:.1f}")
json.dump({"name": f"d3rlpy_{args.algo}" + f"_finetune_{args.online_lr}_lr" * bool(args.online_steps),
           "dataset_id": args.dataset_id,
           "seed": args.seed, "final_score": final, "history": history, "offline_steps": args.total_steps},
          open(args.out, "w"), indent=1)
