"""Peer speed: updates per second of d3rlpy's IQL at batch 256 on the CPU, in its own training loop (`fit`, minibatch
sampling included) and in `update` alone. Run in the peer environment described in d3rlpy_iql.py:
    MINARI_DATASETS_PATH=../shared/minari peer/bin/python benchmark/peers/d3rlpy_speed.py --threads 1
"""

import argparse
import time

import d3rlpy
import minari
import numpy as np
import torch

parser = argparse.ArgumentParser()
parser.add_argument("--dataset-id", default="local/hopper/medium-replay-v0")
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--warmup", type=int, default=50)
parser.add_argument("--steps", type=int, default=500)
args = parser.parse_args()
torch.set_num_threads(args.threads)

ds = minari.load_dataset(args.dataset_id)
eps = list(ds.iterate_episodes())
timeouts = [np.eye(1, len(e.rewards), len(e.rewards) - 1)[0] * (not e.terminations[-1]) for e in eps]
dataset = d3rlpy.dataset.MDPDataset(
    np.concatenate([e.observations[:-1] for e in eps]).astype(np.float32),
    np.concatenate([e.actions for e in eps]).astype(np.float32),
    np.concatenate([e.rewards for e in eps]).astype(np.float32),
    np.concatenate([e.terminations for e in eps]).astype(np.float32),
    np.concatenate(timeouts).astype(np.float32))
algo = d3rlpy.algos.IQLConfig(
    batch_size=256, expectile=0.7, weight_temp=3.0, max_weight=100.0,
    actor_optim_factory=d3rlpy.optimizers.AdamFactory(
        lr_scheduler_factory=d3rlpy.optimizers.CosineAnnealingLRFactory(T_max=10**6)),
    observation_scaler=d3rlpy.preprocessing.StandardObservationScaler(),
    reward_scaler=d3rlpy.preprocessing.ReturnBasedRewardScaler(multiplier=1000.0),
).create(device="cpu:0")

marks, update_time = {}, [0.0]
inner = algo.update


def timed_update(batch):
    start = time.perf_counter()
    out = inner(batch)
    update_time[0] += time.perf_counter() - start
    return out


algo.update = timed_update


def callback(algo_, epoch, total_step):
    if total_step == args.warmup:
        marks["start"] = time.perf_counter()
        update_time[0] = 0.0
    if total_step == args.warmup + args.steps:
        marks["end"] = time.perf_counter()


algo.fit(dataset, n_steps=args.warmup + args.steps, n_steps_per_epoch=args.warmup + args.steps, show_progress=False,
         save_interval=10**9, callback=callback, logger_adapter=d3rlpy.logging.NoopAdapterFactory())
print(f"d3rlpy IQL, {args.threads} thread(s): {args.steps / (marks['end'] - marks['start']):.1f} updates/s in fit, "
      f"{args.steps / update_time[0]:.1f} updates/s in update alone")
