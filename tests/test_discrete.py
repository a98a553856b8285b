"""Discrete BCQ and discrete CQL: the constrained argmax, the conservative regularizer and the bootstrap mask on hand
cases small enough to check by hand; a CartPole dataset that training must beat a random policy on; and the family's
harness (one-line refusals, smoke run, checkpoint evaluation, the exported policy, resume bit for bit after SIGTERM)."""

import contextlib
import importlib
import io
import math
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import CARTPOLE_ID, HOPPER_ID, ROOT, run_script
from test_smoke import SIGTERM_AT_EVALUATION, assert_clear_error, events, python_with, scalars, smoke_args, train

SCRIPTS = ["bcq_discrete.py", "cql_discrete.py"]
MIXED_ID = "test/cartpole/mixed-v0"
CPU = torch.device("cpu")


class Fixed(torch.nn.Module):
    """A network stand-in that gives every state the same outputs (one row of values per action)."""

    def __init__(self, values: list):
        super().__init__()
        self.values = torch.nn.Parameter(torch.tensor([values]))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.values.expand(len(obs), -1)


def hand_batch():
    """Two transitions with data action 0 and reward 1: the first bootstraps, the second ends in a termination."""
    obs = torch.zeros(2, 4)
    return obs, torch.zeros(2, 1), torch.ones(2), obs, torch.tensor([0.0, 1.0])


def test_bcq_never_backs_up_an_action_its_imitation_network_rules_out():
    bcq = importlib.import_module("bcq_discrete")
    q, logits = torch.tensor([[1.0, 5.0, 2.0]]), torch.tensor([[0.6, 0.15, 0.25]]).log()
    # G / max G = 1, 0.25, 0.42: action 1 has the largest Q but falls below the threshold 0.3
    assert bcq.constrained_argmax(q, logits, 0.3)[0].tolist() == [2]
    assert bcq.constrained_argmax(q, logits, 0.0)[0].tolist() == [1]  # threshold 0: Double DQN's argmax
    assert bcq.constrained_argmax(q, logits, 1.0)[0].tolist() == [0]  # threshold 1: G's argmax, behaviour cloning
    assert bcq.constrained_argmax(q, logits, 0.3)[1].tolist() == [[True, False, True]]

    # Through the update: the online Q and G choose at s', the target Q values the choice (Double DQN); a terminal
    # transition's target is its reward alone.
    for threshold, chosen_value in ((0.3, 11.0), (0.0, 20.0), (1.0, 12.0)):
        agent = bcq.Agent(4, 3, bcq.Args(threshold=threshold, discount=0.9, cuda=False), CPU)
        agent.q, agent.imitation = Fixed([1.0, 5.0, 2.0]), Fixed(logits[0].tolist())
        agent.target_q = Fixed([12.0, 20.0, 11.0])  # its own argmax (1) or the allowed one under it (0) would differ
        info = agent.update(*hand_batch())
        assert info["values/q_target_action"].item() == pytest.approx(chosen_value)
        assert info["values/q_target"].item() == pytest.approx(((1 + 0.9 * chosen_value) + 1) / 2)


def test_cql_regularizer_and_double_dqn_target_on_a_hand_case():
    cql = importlib.import_module("cql_discrete")
    q = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    gap = cql.conservative_gap(q, torch.tensor([0, 2]))
    torch.testing.assert_close(gap, torch.tensor([math.log(math.e + math.e**2 + math.e**3) - 1.0, math.log(3.0)]))

    agent = cql.Agent(4, 3, cql.Args(cql_alpha=2.0, discount=0.9, cuda=False), CPU)
    agent.critic, agent.target_critic = Fixed([1.0, 2.0, 3.0]), Fixed([4.0, 6.0, 5.0])
    info = agent.update(*hand_batch())
    # Online argmax at s' is action 2, valued 5 by the target (not the target's own max, 6); the terminal row gets r.
    assert info["values/q_target_action"].item() == pytest.approx(5.0)
    y = torch.tensor([1.0 + 0.9 * 5.0, 1.0])
    assert info["values/q_target"].item() == pytest.approx(y.mean().item())
    assert info["values/cql_gap"].item() == pytest.approx(gap[0].item())
    assert info["losses/cql_loss"].item() == pytest.approx(2.0 * gap[0].item())
    bellman = torch.nn.functional.smooth_l1_loss(torch.tensor([1.0, 1.0]), y).item()  # Q(s, a_data) = 1 in both rows
    assert info["losses/bellman_loss"].item() == pytest.approx(bellman)
    assert info["losses/critic_loss"].item() == pytest.approx(bellman + 2.0 * gap[0].item())


@pytest.fixture(scope="module")
def mixed_dataset(minari_root):
    """About 3000 CartPole-v1 steps: random episodes alternating with a balancing policy (push towards the pole's lean
    and its angular velocity) that acts at random 30% of the time; episodes cut at 200 steps, a truncation."""
    import minari
    from minari.data_collector import EpisodeBuffer

    env, rng, episodes, steps = gym.make("CartPole-v1"), np.random.default_rng(0), [], 0
    while steps < 3000:
        eps = 1.0 if len(episodes) % 2 == 0 else 0.3
        obs, _ = env.reset(seed=len(episodes))
        o, a, r, term, trunc = [obs], [], [], [], []
        while True:
            action = int(rng.integers(2)) if rng.random() < eps else int(obs[2] + 0.3 * obs[3] > 0)
            obs, reward, terminated, truncated, _ = env.step(action)
            o.append(obs), a.append(action), r.append(float(reward)), term.append(terminated)
            trunc.append(truncated or len(a) >= 200)
            if term[-1] or trunc[-1]:
                break
        episodes.append(EpisodeBuffer(id=len(episodes), observations=o, actions=a, rewards=r, terminations=term,
                                      truncations=trunc))
        steps += len(a)
    minari.create_dataset_from_buffers(MIXED_ID, episodes, env=env, eval_env=env.spec, algorithm_name="mixed",
                                       author="tests", author_email="tests@localhost", description="test data",
                                       code_permalink="tests/test_discrete.py", ref_min_score=22.0, ref_max_score=500.0)
    return MIXED_ID


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_beats_a_random_policy(script, mixed_dataset):
    """3000 updates at the default settings, then 10 evaluation episodes: a random CartPole policy lasts about 20
    steps, the trained one far longer (the data's balancing episodes reach the 200-step cut)."""
    module = importlib.import_module(script[:-3])
    args = module.Args(dataset_id=mixed_dataset, download=False, cuda=False)
    with contextlib.redirect_stdout(io.StringIO()):
        data, task = module.load_data(args, CPU)
    table, split = module.transition_table(data, task)
    assert split == [4, 1, 1, 4, 1] and set(table[:, 4].tolist()) == {0.0, 1.0}  # the index column
    torch.manual_seed(0)
    agent = module.Agent(split[0], 2, args, CPU)
    for _ in range(3000):
        agent.update(*module.minibatch(table, split, args.batch_size))
    envs = module.make_eval_envs(task, 10, None)
    random_policy = lambda obs: torch.randint(2, (len(obs),))  # noqa: E731
    random_return, trained = module.evaluate(random_policy, envs, task, 1).mean(), module.evaluate(agent.act, envs,
                                                                                                   task, 1)
    assert random_return < 40 and trained.mean() > max(100.0, 3 * random_return), (random_return, trained)
    assert module.normalized_score(trained, task) == pytest.approx(100 * (trained.mean() - 22) / 478)


@pytest.mark.parametrize("script", SCRIPTS)
def test_continuous_actions_and_bad_arguments_are_refused_in_one_line(script, minari_root, tmp_path):
    refused = run_script(script, "--dataset-id", HOPPER_ID, "--total-steps", "10", cwd=tmp_path)
    assert_clear_error(refused, "needs discrete actions", "Box", "iql.py", "cql_continuous.py", "bcq.py")
    bad = ["--threshold", "1.5"] if script == "bcq_discrete.py" else ["--cql-alpha", "-1"]
    assert_clear_error(run_script(script, *bad, cwd=tmp_path), bad[0])
    assert not (tmp_path / "runs").exists()


def test_image_observations_are_refused_in_one_line(minari_root, capsys):
    """Atari-like frames (a 3-d Box) with discrete actions: the MLPs take flat vectors, so loading stops in one line."""
    import minari
    from minari.data_collector import EpisodeBuffer

    frames, actions = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8), gym.spaces.Discrete(3)
    episode = EpisodeBuffer(id=0, observations=[frames.sample() for _ in range(4)], actions=[0, 1, 2],
                            rewards=[0.0] * 3, terminations=[False, False, True], truncations=[False] * 3)
    with pytest.warns(UserWarning):  # no author, no environment: minari's reminders
        minari.create_dataset_from_buffers("test/frames/tiny-v0", [episode], observation_space=frames,
                                           action_space=actions, algorithm_name="none")
    for script in SCRIPTS:
        with pytest.raises(SystemExit) as stopped:
            importlib.import_module(script[:-3]).load_minari("test/frames/tiny-v0", download=False)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1 and "flat Box vector" in err, err


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_checkpoint_and_its_evaluation(script, minari_root, tmp_path_factory, tmp_path):
    result, run_dir = train(script, CARTPOLE_ID, tmp_path_factory)
    assert "no reference scores" in result.stdout and "step 300/300" in result.stdout
    logged = scalars(run_dir)
    for tag in ("losses/critic_loss", "values/q_data", "values/q_target_action", "charts/updates_per_second",
                "charts/peak_memory_mb", "eval/return"):
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), (tag, sorted(logged))
    assert "eval/normalized_score" not in logged and len(logged["eval/return"]) == 2
    assert (run_dir / f"{script[:-3]}.pt").is_file() and (run_dir / f"{script[:-3]}_policy.pt2").is_file()
    evaluated = run_script(script, "--checkpoint", str(run_dir / f"{script[:-3]}.pt"), "--eval-episodes", "2",
                           cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"trained on {CARTPOLE_ID}" in evaluated.stdout and "CartPole-v1: 2 episodes" in evaluated.stdout


LOAD_POLICY = """
import sys
import numpy as np
import torch
actions = torch.export.load(sys.argv[1]).module()(torch.as_tensor(np.load(sys.argv[2])))
assert actions.dtype == torch.int64, actions.dtype
np.save(sys.argv[3], actions.numpy())
assert {"bcq_discrete", "cql_discrete", "iql", "conftest"}.isdisjoint(sys.modules), "imported a script"
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_exported_policy_gives_the_agents_action_indices_without_the_script(script, minari_root, tmp_path_factory,
                                                                            tmp_path):
    _, run_dir = train(script, CARTPOLE_ID, tmp_path_factory)
    module, exp_name = importlib.import_module(script[:-3]), script[:-3]
    observations = (np.random.default_rng(0).normal(size=(64, 4)) * [1.0, 1.0, 0.1, 1.0]).astype(np.float32)
    np.save(tmp_path / "obs.npy", observations)
    loaded = subprocess.run([sys.executable, "-c", LOAD_POLICY, str(run_dir / f"{exp_name}_policy.pt2"),
                             str(tmp_path / "obs.npy"), str(tmp_path / "actions.npy")], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    ckpt = torch.load(run_dir / f"{exp_name}.pt", weights_only=True)
    agent, task = module.Agent(4, 2, module.Args(**ckpt["args"]), CPU), ckpt["task"]
    agent.load_state_dict(ckpt["agent"])
    with torch.no_grad():
        expected = task["action_low"] + agent.act((torch.as_tensor(observations) - task["obs_mean"]) / task["obs_std"])
    actions = np.load(tmp_path / "actions.npy")
    assert actions.shape == (64,) and actions.dtype == np.int64 and set(actions.tolist()) <= {0, 1}
    np.testing.assert_array_equal(actions, expected.numpy())


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_run_stopped_by_sigterm_resumes_bit_for_bit(script, minari_root, tmp_path_factory, tmp_path):
    """The smoke run straight, against the same run stopped by SIGTERM during its step-150 evaluation (saved after
    that step, exit 143) and resumed to step 300: every loss, diagnostic and evaluation and the final weights match."""
    _, straight = train(script, CARTPOLE_ID, tmp_path_factory)
    path = str(ROOT / script)
    stopped = python_with(SIGTERM_AT_EVALUATION, "150", path, *smoke_args(script, CARTPOLE_ID), "--save-every", "100",
                          cwd=tmp_path)
    out, err = stopped.communicate(timeout=300)
    [run_dir] = (tmp_path / "runs").iterdir()
    resume_line = f"SIGTERM at step 150/300: continue with python {path} --resume runs/{run_dir.name}"
    assert stopped.returncode == 143 and resume_line in out, out + err[-2000:]
    resumed = run_script(script, "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0 and "step 300/300" in resumed.stdout, resumed.stderr[-3000:]

    expected, logged = scalars(straight), scalars(run_dir)
    compared = [t for t in expected if t.split("/")[0] in ("losses", "values", "eval")]
    assert len(compared) >= 8
    for tag in compared:
        assert logged[tag] == expected[tag], tag
    assert [e.step for e in events(run_dir, compared[0])] == [e.step for e in events(straight, compared[0])]
    final, reference = (torch.load(d / f"{script[:-3]}.pt", weights_only=True)["agent"] for d in (run_dir, straight))
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
