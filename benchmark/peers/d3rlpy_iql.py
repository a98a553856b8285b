"""Peer baseline: d3rlpy's IQL on a Minari dataset, evaluated on the same schedule as iql.py.

Not part of the project's scripts or tests; it runs in its own environment:
    python -m venv peer && peer/bin/pip install torch==2.13.0 && \
        peer/bin/pip install d3rlpy==2.8.1 minari h5py pillow "gymnasium[mujoco]==1.0.0"
    MINARI_DATASETS_PATH=../shared/minari peer/bin/python benchmark/peers/d3rlpy_iql.py \
        --dataset-id local/hopper/medium-replay-v0 --seed 1 --total-steps 100000 --out peer_iql_1.json

Settings are the IQL paper's locomotion ones (expectile 0.7, temperature 3, max weight 100, rewards scaled by
1000 / return range, actor lr on a cosine schedule) with standardized observations, as iql.py uses by default.
Evaluation: every --eval-every steps and at the end, --eval-episodes deterministic episodes seeded seed + i; the final
score is the mean normalized score of the last 3 evaluations.
"""

import argparse
import json
import time

import d3rlpy
import minari
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--dataset-id", default="local/hopper/medium-replay-v0")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--total-steps", type=int, default=100_000)
parser.add_argument("--eval-every", type=int, default=5_000)
parser.add_argument("--eval-episodes", type=int, default=10)
parser.add_argument("--out", default="peer_iql.json")
args = parser.parse_args()

d3rlpy.seed(args.seed)
ds = minari.load_dataset(args.dataset_id)
obs, act, rew, term, tout = [], [], [], [], []
for ep in ds.iterate_episodes():
    # d3rlpy stores one observation per step: obs[:-1]; an episode not ended by a termination ends in a timeout.
    obs.append(ep.observations[:-1])
    act.append(ep.actions)
    rew.append(ep.rewards)
    term.append(ep.terminations.astype(np.float32))
    t = np.zeros(len(ep.rewards), dtype=np.float32)
    if not ep.terminations[-1]:
        t[-1] = 1.0
    tout.append(t)
dataset = d3rlpy.dataset.MDPDataset(
    np.concatenate(obs).astype(np.float32), np.concatenate(act).astype(np.float32),
    np.concatenate(rew).astype(np.float32), np.concatenate(term), np.concatenate(tout))

algo = d3rlpy.algos.IQLConfig(
    actor_learning_rate=3e-4, critic_learning_rate=3e-4, batch_size=256, gamma=0.99, tau=0.005, n_critics=2,
    expectile=0.7, weight_temp=3.0, max_weight=100.0,
    actor_optim_factory=d3rlpy.optimizers.AdamFactory(
        lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=args.total_steps)),
    observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
).create(device="cpu:0")

env = ds.recover_environment(eval_env=True)
ref_min, ref_max = ds.storage.metadata["ref_min_score"], ds.storage.metadata["ref_max_score"]
history, clock = [], {"start": time.perf_counter(), "eval": 0.0}


def evaluate(step):
    t0 = time.perf_counter()
    returns = []
    for i in range(args.eval_episodes):
        o, _ = env.reset(seed=args.seed + i)
        done, total = False, 0.0
        while not done:
            a = algo.predict(o[None].astype(np.float32))[0]
            o, r, terminated, truncated, _ = env.step(a)
            total += r
            done = terminated or truncated
        returns.append(total)
    clock["eval"] += time.perf_counter() - t0
    score = 100 * (np.mean(returns) - ref_min) / (ref_max - ref_min)
    ups = step / (time.perf_counter() - clock["start"] - clock["eval"])
    history.append({"step": step, "return": float(np.mean(returns)), "score": float(score), "updates_per_second": ups})
    print(f"step {step}/{args.total_steps} | return {np.mean(returns):8.1f} | score {score:5.1f} | {ups:.0f} updates/s",
          flush=True)


def callback(algo_, epoch, total_step):
    if total_step % args.eval_every == 0 or total_step == args.total_steps:
        evaluate(total_step)


algo.fit(dataset, n_steps=args.total_steps, n_steps_per_epoch=args.eval_every, show_progress=False,
         save_interval=10**9, callback=callback, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
final = float(np.mean([h["score"] for h in history[-3:]]))
print(f"final score (mean of the last 3 evaluations): {final:.1f}")
json.dump({"name": "d3rlpy_iql", "dataset_id": args.dataset_id, "seed": args.seed, "final_score": final,
           "history": history},
          open(args.out, "w"), indent=1)
