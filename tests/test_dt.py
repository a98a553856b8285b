"""Decision Transformer (Chen et al. 2021): the causal mask, the right padding, the per-episode returns-to-go, the
timestep cap and the return conditioning on small hand-made cases, the exported policy loaded without the script, and
dt.py run as a user runs it (train, evaluate a checkpoint, stop and resume bit for bit)."""

import math
import subprocess
import sys
from types import SimpleNamespace

import dt
import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import CARTPOLE_ID, HOPPER_ID, PENDULUM_ID, ROOT, run_script
from test_family import fake_task
from test_smoke import SIGTERM_AT_EVALUATION, assert_clear_error, python_with, scalars

CPU = torch.device("cpu")


def small(**changes) -> dt.Args:
    """A model small enough to train in a second: two layers and two heads, so that a leak through any of them shows."""
    return dt.Args(**{"seq_len": 4, "embedding_dim": 16, "num_layers": 2, "num_heads": 2, "hidden_dims": (32,),
                      "dropout": 0.0, "max_timestep": 50, **changes})


def context(batch: int, k: int, obs_dim: int = 3, action_dim: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"rtg": torch.randn(batch, k, generator=g), "states": torch.randn(batch, k, obs_dim, generator=g),
            "actions": torch.rand(batch, k, action_dim, generator=g) * 2 - 1,
            "timesteps": torch.randint(0, 40, (batch, k), generator=g), "valid": torch.ones(batch, k, dtype=torch.bool)}


@torch.no_grad()
def test_the_action_at_t_sees_nothing_after_the_state_at_t():
    """Changing a_t, or any token of a later step, leaves the prediction of a_t as it was (the causal mask over the
    3K tokens R_0 s_0 a_0 R_1 ...); changing a_(t-1) changes it, so the model does read its context."""
    torch.manual_seed(0)
    model, k = dt.DecisionTransformer(3, 2, small()).eval(), 4
    x = context(2, k)
    base = model(x["rtg"], x["states"], x["actions"], x["timesteps"], x["valid"])
    for t in range(k):
        later = dict(x, rtg=x["rtg"].clone(), states=x["states"].clone(), actions=x["actions"].clone())
        later["rtg"][:, t + 1:] += 5.0
        later["states"][:, t + 1:] -= 3.0
        later["actions"][:, t:] *= -1.0  # a_t itself comes after s_t: the target must not be an input
        out = model(later["rtg"], later["states"], later["actions"], x["timesteps"], x["valid"])
        torch.testing.assert_close(out[:, : t + 1], base[:, : t + 1])
        if t + 1 < k:
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4  # a_t is in the context of a_(t+1)


@torch.no_grad()
def test_padding_changes_neither_real_outputs_nor_the_loss():
    """Right padding with the key padding mask: whatever the padded steps hold (inputs, timesteps, target actions), the
    real steps' predictions and the masked loss are the same; no attention row is empty, so nothing is NaN."""
    torch.manual_seed(0)
    model, k = dt.DecisionTransformer(3, 2, small()).eval(), 4
    x = context(3, k)
    x["valid"] = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    base = model(x["rtg"], x["states"], x["actions"], x["timesteps"], x["valid"])
    garbage = context(3, k, seed=1)
    pad = ~x["valid"]
    mixed = {key: torch.where(pad.view(3, k, *[1] * (v.dim() - 2)), garbage[key], v) for key, v in x.items()
             if key != "valid"}
    out = model(mixed["rtg"], mixed["states"], mixed["actions"], mixed["timesteps"], x["valid"])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[x["valid"]], base[x["valid"]])
    assert (out[pad] - base[pad]).abs().max() > 1e-4  # the padded rows did change: the test above is not vacuous
    loss = dt.action_loss(base, x["actions"], x["valid"])
    torch.testing.assert_close(dt.action_loss(out, mixed["actions"], x["valid"]), loss)
    real = (base - x["actions"]).pow(2).mean(-1)[x["valid"]].mean()  # the mean over real steps only
    torch.testing.assert_close(loss, real)


def hand_made() -> tuple:
    """Three episodes: one terminated, one truncated, and a last one that never ended (the data stopped mid-episode)."""
    def episode(rewards, terminated):
        n = len(rewards)
        return SimpleNamespace(observations=np.arange(n + 1, dtype=np.float32)[:, None] + 100 * len(rewards),
                               actions=np.zeros((n, 1)), rewards=np.array(rewards, dtype=np.float32),
                               terminations=np.array([False] * (n - 1) + [terminated]))
    episodes = [episode([1, 2, 3], True), episode([10, 20], False), episode([100, 200, 300, 400], False)]
    data = dt.episodes_to_transitions(episodes, gym.spaces.Box(-np.inf, np.inf, (1,)))
    task = fake_task("Pendulum-v1", 200, 1, [-1.0], [1.0])
    return data, task


def test_returns_to_go_stay_inside_each_episode_and_the_last_one_is_kept():
    data, task = hand_made()
    np.testing.assert_array_equal(dt.returns_to_go(data["rewards"], data["episode_lengths"]),
                                  [6, 5, 3, 30, 20, 1000, 900, 700, 400])
    table, split = dt.transition_table(data, task, reward_scale=0.01)
    obs, actions, rtg, timesteps, steps_left = table.split(split, 1)
    assert split == [1, 1, 1, 1, 1] and len(table) == 9  # every step of the unterminated last episode is there
    np.testing.assert_allclose(rtg[:, 0], [0.06, 0.05, 0.03, 0.3, 0.2, 10, 9, 7, 4], rtol=1e-6)
    assert timesteps[:, 0].tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    assert steps_left[:, 0].tolist() == [2, 1, 0, 1, 0, 3, 2, 1, 0]


def test_windows_are_padded_on_the_right_inside_their_episode():
    """Every window starts at a real step, its real steps are consecutive steps of one episode, and the mask comes from
    the episode's end (CORL issue 21 built it after padding, so it was always full): a window that runs past the end
    is padded with copies of the episode's last step, never with the next episode."""
    data, task = hand_made()
    table, split = dt.transition_table(data, task, reward_scale=1.0)
    torch.manual_seed(0)
    obs, _, rtg, timesteps, valid = dt.minibatch(table, split, 2000, 3)
    assert obs.shape == (2000, 3, 1) and valid.dtype == torch.bool and valid[:, 0].all()
    episode = obs[..., 0] // 100  # the hand-made observations carry their episode in the hundreds
    assert (episode == episode[:, :1]).all() and set(episode.unique().tolist()) == {2, 3, 4}
    real_length = valid.sum(1)
    for row in range(2000):
        n = int(real_length[row])
        assert valid[row, :n].all() and not valid[row, n:].any()  # right padding only
        assert torch.equal(timesteps[row, :n], timesteps[row, 0] + torch.arange(n))
        assert (obs[row, n:] == obs[row, n - 1]).all() and (rtg[row, n:] == rtg[row, n - 1]).all()
        if n < 3:  # cut short only by the episode's end (the hundreds are the episode's length)
            assert int(timesteps[row, n - 1]) + 1 == int(episode[row, 0])
    starts = timesteps[:, 0] + 10 * episode[:, 0]
    assert len(torch.unique(starts)) == 9  # a start anywhere, the last episode's steps included


@torch.no_grad()
def test_timesteps_past_the_table_use_its_last_entry_in_an_evaluation_longer_than_the_data():
    """max_timestep 10 and a 200-step Pendulum evaluation: no index error, and the embedding reads row 9 from step 9
    on, giving the same predictions as timesteps capped by hand."""
    torch.manual_seed(0)
    agent = dt.Agent(3, 1, small(max_timestep=10), CPU)
    x = context(2, 4, action_dim=1)
    late = x["timesteps"] + 150
    out = agent.model.eval()(x["rtg"], x["states"], x["actions"], late, x["valid"])
    capped = agent.model(x["rtg"], x["states"], x["actions"], torch.full_like(late, 9), x["valid"])
    torch.testing.assert_close(out, capped)
    seen = []
    agent.model.embed_timestep.register_forward_hook(lambda m, inputs, output: seen.append(int(inputs[0].max())))
    task = fake_task("Pendulum-v1", 200, 3, [-2.0], [2.0])
    returns = dt.evaluate(agent, dt.make_eval_envs(task, 2, None), task, seed=0, target=-100.0)
    assert len(seen) == 200 and max(seen) == 9 and np.isfinite(returns).all()


def test_batched_evaluation_returns_what_episodes_one_by_one_return():
    """Hopper episodes of a random small model end at different times: stepping them together (each with its own
    context, the finished ones dropped) gives each the return it gets alone from reset(seed=seed + i)."""
    torch.manual_seed(0)
    agent = dt.Agent(11, 3, small(seq_len=3), CPU)
    task = fake_task("Hopper-v5", 1000, 11, [-1.0] * 3, [1.0] * 3)
    batched = dt.evaluate(agent, dt.make_eval_envs(task, 3, None), task, seed=7, target=500.0)
    single = [dt.evaluate(agent, dt.make_eval_envs(task, 1, None), task, seed=7 + i, target=500.0)[0] for i in range(3)]
    np.testing.assert_allclose(batched, single, rtol=1e-5)
    assert len(set(np.round(batched, 3))) == 3


def test_conditioning_on_a_high_return_picks_the_action_that_earned_it():
    """Three-step episodes from noise states: action +0.8 earns 1 per step (return 3), action -0.8 earns 0. A small
    model trained on them acts +0.8 when asked for 3 and -0.8 when asked for 0, at the first step and later on."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(200):
        good = i % 2 == 0
        episodes.append(SimpleNamespace(observations=rng.normal(size=(4, 2)).astype(np.float32),
                                        actions=np.full((3, 1), 0.8 if good else -0.8), rewards=np.full(3, float(good)),
                                        terminations=np.array([False, False, True])))
    data = dt.episodes_to_transitions(episodes, gym.spaces.Box(-np.inf, np.inf, (2,)))
    task = fake_task("Pendulum-v1", 200, 2, [-1.0], [1.0])
    args = small(seq_len=3, learning_rate=1e-3, warmup_steps=20, batch_size=32)
    table, split = dt.transition_table(data, task, reward_scale=1.0)
    torch.manual_seed(0)
    agent = dt.Agent(2, 1, args, CPU)
    for _ in range(300):
        info = agent.update(*dt.minibatch(table, split, args.batch_size, args.seq_len))
    assert float(info["losses/action_loss"]) < 0.01
    states = torch.as_tensor(rng.normal(size=(2, 3, 2)), dtype=torch.float32)
    with torch.no_grad():
        for target, sign in ((3.0, 1.0), (0.0, -1.0)):  # at the first step: only R_0 and s_0 to go by
            first = agent.act(torch.full((2, 3), target), states, torch.zeros(2, 3, 1), torch.arange(3).expand(2, 3),
                              torch.ones(2, dtype=torch.long))
            assert (first * sign > 0.6).all(), (target, first)
        # At the third step after two good actions and R = 3, 2, 1: keep going.
        actions = torch.tensor([0.8, 0.8, 0.0]).view(1, 3, 1).expand(2, 3, 1)
        third = agent.act(torch.tensor([3.0, 2.0, 1.0]).expand(2, 3), states, actions, torch.arange(3).expand(2, 3),
                          torch.full((2,), 3))
        assert (third > 0.6).all(), third


LOAD_POLICY = """
import sys
import numpy as np
import torch
program = torch.export.load(sys.argv[1])
inputs = [torch.as_tensor(x) for x in np.load(sys.argv[2]).values()]
np.save(sys.argv[3], program.module()(*inputs).detach().numpy())
print(len(program.graph_signature.user_inputs))
assert "dt" not in sys.modules and "conftest" not in sys.modules, "imported a script"
"""


def test_the_exported_policy_runs_without_the_script(tmp_path):
    """torch.export.load(path).module() in a process that imports torch and numpy only: raw returns-to-go, raw
    observations, environment actions, timesteps (some past the table) and the number of real steps in, the
    environment action out, the same as the agent's act on the same context in the model's units."""
    torch.manual_seed(0)
    args = small(seq_len=5, reward_scale=0.01, max_timestep=20)
    agent = dt.Agent(3, 1, args, CPU)
    task = fake_task("Pendulum-v1", 200, 3, [-2.0], [2.0])
    task["obs_mean"], task["obs_std"] = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 2.0, 4.0])
    path = tmp_path / "dt_policy.pt2"
    torch.export.save(dt.export_policy(agent, task), path)
    g = np.random.default_rng(0)
    inputs = {"returns_to_go": (g.normal(size=(7, 5)) * 300).astype(np.float32),
              "observations": (g.normal(size=(7, 5, 3)) * [1.0, 1.0, 4.0]).astype(np.float32),
              "actions": g.uniform(-2, 2, size=(7, 5, 1)).astype(np.float32),
              "timesteps": (np.arange(5) + g.integers(0, 40, size=(7, 1))).astype(np.int64),
              "lengths": np.array([1, 2, 3, 4, 5, 5, 5], dtype=np.int64)}
    np.savez(tmp_path / "inputs.npz", **inputs)
    loaded = subprocess.run([sys.executable, "-c", LOAD_POLICY, str(path), str(tmp_path / "inputs.npz"),
                             str(tmp_path / "actions.npy")], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert loaded.stdout.split() == ["5"]  # the marker of a DT policy: five inputs, where a Markov policy has one
    x = {k: torch.as_tensor(v) for k, v in inputs.items()}
    with torch.no_grad():
        unit = agent.act(x["returns_to_go"] * 0.01, (x["observations"] - task["obs_mean"]) / task["obs_std"],
                         x["actions"] / 2.0, x["timesteps"], x["lengths"])
    actions = np.load(tmp_path / "actions.npy")
    assert actions.shape == (7, 1) and np.abs(actions).max() <= 2.0
    np.testing.assert_allclose(actions, (2.0 * unit).numpy(), rtol=1e-5, atol=1e-6)
    assert len(np.unique(actions.round(4))) == 7


TINY = ["--seed", "3", "--total-steps", "200", "--eval-every", "100", "--eval-episodes", "2", "--batch-size", "16",
        "--log-every", "50", "--seq-len", "5", "--embedding-dim", "32", "--num-layers", "1", "--hidden-dims", "64"]
RUNS = {}


def trained(dataset_id: str, tmp_path_factory, *extra: str):
    if dataset_id not in RUNS:
        cwd = tmp_path_factory.mktemp(f"dt_{dataset_id.split('/')[1]}")
        result = run_script("dt.py", "--dataset-id", dataset_id, *TINY, *extra, cwd=cwd)
        assert result.returncode == 0, result.stderr[-3000:]
        [run_dir] = (cwd / "runs").iterdir()
        RUNS[dataset_id] = result, run_dir, extra
    return RUNS[dataset_id]


def test_hopper_trains_logs_every_target_and_evaluates_its_checkpoint(minari_root, tmp_path_factory, tmp_path):
    result, run_dir, _ = trained(HOPPER_ID, tmp_path_factory)
    logged = scalars(run_dir)
    targets = result.stdout.split("target returns: ")[1].split(" (the dataset's best")[0].split()
    assert len(targets) == 2 and math.isclose(float(targets[1]), float(targets[0]) / 2, rel_tol=1e-3)
    for tag in ("losses/action_loss", "values/action_error_first", "values/action_error_full", "values/padding_frac",
                "values/grad_norm", "charts/learning_rate", "charts/updates_per_second", "charts/peak_memory_mb"):
        assert len(logged[tag]) == 4 and all(math.isfinite(v) for v in logged[tag]), (tag, logged.get(tag))
    assert logged["charts/learning_rate"] == pytest.approx([1e-4 * s / 10_000 for s in (50, 100, 150, 200)], rel=1e-5)
    for target in targets:
        assert len(logged[f"eval/return_target_{target}"]) == 2
        assert len(logged[f"eval/normalized_score_target_{target}"]) == 2
    assert logged["eval/return"] == logged[f"eval/return_target_{targets[0]}"]  # the first target is the headline
    assert logged["eval/normalized_score"] == logged[f"eval/normalized_score_target_{targets[0]}"]
    assert "final score (mean of the last 2 evaluations)" in result.stdout
    assert (run_dir / "dt.pt").is_file() and (run_dir / "dt_policy.pt2").is_file()
    evaluated = run_script("dt.py", "--checkpoint", str(run_dir / "dt.pt"), "--eval-episodes", "2", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    lines = evaluated.stdout.strip().splitlines()
    assert len(lines) == 2 and all("Hopper-v5: 2 episodes" in line and "normalized score" in line for line in lines)
    assert f"target return {targets[0]}," in lines[0] and f"target return {targets[1]}," in lines[1]
    assert not (tmp_path / "runs").exists(), "evaluating a checkpoint must not start a new run"


def test_pendulum_never_terminates_and_has_no_reference_scores(minari_root, tmp_path_factory, tmp_path):
    result, run_dir, _ = trained(PENDULUM_ID, tmp_path_factory, "--target-returns", "-150", "-900")
    logged = scalars(run_dir)
    assert "no reference scores" in result.stdout and "target returns: -150 -900\n" in result.stdout
    assert not [tag for tag in logged if "normalized_score" in tag], sorted(logged)
    assert len(logged["eval/return_target_-150"]) == len(logged["eval/return_target_-900"]) == 2
    assert all(-2000 < r <= 0 for r in logged["eval/return"]), logged["eval/return"]
    evaluated = run_script("dt.py", "--checkpoint", str(run_dir / "dt.pt"), "--eval-episodes", "2",
                           "--target-returns", "-300", cwd=tmp_path, timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "Pendulum-v1: 2 episodes, target return -300," in evaluated.stdout
    assert "no reference scores" in evaluated.stdout and len(evaluated.stdout.strip().splitlines()) == 1


def test_a_run_stopped_by_sigterm_resumes_bit_for_bit(minari_root, tmp_path_factory, tmp_path):
    """Stopped at step 100 (it saves after the step, exits 143), resumed to 200: every logged loss, diagnostic and
    evaluation, and the final weights, are those of the straight run (CPU)."""
    _, straight, extra = trained(HOPPER_ID, tmp_path_factory)
    stopped = python_with(SIGTERM_AT_EVALUATION, "100", str(ROOT / "dt.py"), "--dataset-id", HOPPER_ID, *TINY,
                          *extra, cwd=tmp_path)
    out, err = stopped.communicate(timeout=300)
    assert stopped.returncode == 143 and "SIGTERM at step 100/200" in out, out[-2000:] + err[-2000:]
    [run_dir] = (tmp_path / "runs").iterdir()
    resumed = run_script("dt.py", "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0 and "step 200/200" in resumed.stdout, resumed.stderr[-3000:]
    expected, logged = scalars(straight), scalars(run_dir)
    compared = [t for t in expected if t.split("/")[0] in ("losses", "values", "eval")]
    assert len(compared) >= 9
    for tag in compared:
        assert logged[tag] == expected[tag], tag
    final, reference = (torch.load(d / "dt.pt", weights_only=True) for d in (run_dir, straight))
    assert all(torch.equal(final["agent"][k], v) for k, v in reference["agent"].items())
    assert final["optimizers"]["optimizer"]["state"][0]["step"] == 200


def test_user_errors_are_one_line(minari_root, tmp_path):
    assert_clear_error(run_script("dt.py", "--dataset-id", CARTPOLE_ID, cwd=tmp_path), "dt.py needs Box actions", "bcq_discrete.py")
    assert_clear_error(run_script("dt.py", "--embedding-dim", "30", "--num-heads", "4", cwd=tmp_path),
                       "--embedding-dim must be a positive multiple of --num-heads, got 30 and 4")
    for argv in (["--num-layers", "0"], ["--learning-rate", "-1"], ["--weight-decay", "-1"], ["--warmup-steps", "-5"]):
        assert_clear_error(run_script("dt.py", *argv, cwd=tmp_path), argv[0])
    assert not (tmp_path / "runs").exists()
