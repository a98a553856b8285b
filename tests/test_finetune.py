"""Offline-to-online fine-tuning (--online-steps): online rows enter the transition table as the dataset's did, the
symmetric draw takes its share from them, an online phase stopped by SIGTERM resumes with every row it collected, and
a run without an online phase is the offline run it always was."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import HOPPER_ID, PENDULUM_ID, ROOT, run_script
from test_smoke import EXTRA_ARGS, SIGTERM_AT_EVALUATION, scalars, smoke_args, train

FINETUNING = ["iql.py", "cql_continuous.py"]


class ScriptedEnv:
    """Steps through given (observation, reward, terminated, truncated) outcomes; records the seeds of its resets."""

    def __init__(self, outcomes):
        self.outcomes, self.seeds, self.actions = list(outcomes), [], []

    def reset(self, seed=None):
        self.seeds.append(seed)
        return np.full(2, 10.0 * len(self.seeds), dtype=np.float32), {}

    def step(self, action):
        self.actions.append(action)
        obs, reward, terminated, truncated = self.outcomes.pop(0)
        return np.full(2, obs, dtype=np.float32), reward, terminated, truncated, {}


@pytest.mark.parametrize("script", FINETUNING)
def test_online_rows_are_written_as_the_dataset_was(script):
    module = __import__(script[:-3])
    torch.manual_seed(0)
    agent = module.Agent(2, 1, module.Args(hidden_dims=(8,)), torch.device("cpu"))
    task = {"obs_mean": torch.tensor([1.0, 2.0]), "obs_std": torch.tensor([2.0, 4.0]),
            "action_low": torch.tensor([-2.0]), "action_high": torch.tensor([2.0])}
    env = ScriptedEnv([(3.0, 1.0, False, False), (5.0, 2.0, True, False),  # episode 1 ends in a termination
                       (7.0, 3.0, False, True), (9.0, 4.0, False, False)])  # episode 2 in a truncation (time limit)
    table = torch.zeros(3 + 4, 2 + 1 + 1 + 2 + 1)
    online = {"obs": None, "rows": 3, "offline_rows": 3, "episodes": 0, "scale": 0.5, "shift": -1.0, "seed": 100,
              "filled": torch.tensor(3), "env": env}

    class Writer:
        def add_scalar(self, tag, value, step):
            logged.append((tag, value, step))
    logged = []
    for step in range(4):
        module.collect(agent, table, online, task, Writer(), step)
    assert env.seeds == [100, 101, 102] and online["episodes"] == 2 and online["obs"] is not None
    assert online["rows"] == 7 and int(online["filled"]) == 7 and logged == [("charts/env_steps", 2, 1),
                                                                            ("charts/env_steps", 3, 2)]
    rows = table[3:]
    standardize = lambda x: (torch.tensor([x, x]) - torch.tensor([1.0, 2.0])) / torch.tensor([2.0, 4.0])  # noqa: E731
    for row, (obs, next_obs) in zip(rows, [(10.0, 3.0), (3.0, 5.0), (20.0, 7.0), (30.0, 9.0)]):
        torch.testing.assert_close(row[:2], standardize(obs))
        torch.testing.assert_close(row[4:6], standardize(next_obs))
    torch.testing.assert_close(rows[:, 3], torch.tensor([1.0, 2.0, 3.0, 4.0]) * 0.5 - 1.0)  # rewards * scale + shift
    torch.testing.assert_close(rows[:, 6], torch.tensor([0.0, 1.0, 0.0, 0.0]))  # only the termination stops bootstrapping
    # The environment got the action rescaled from [-1, 1] to its bounds [-2, 2]: the row's action, doubled.
    np.testing.assert_allclose(np.concatenate(env.actions), rows[:, 2].numpy() * 2.0, rtol=1e-6)
    assert rows[:, 2].abs().max() < 1 and rows[:, 2].std() > 0  # drawn from pi, not its mean


@pytest.mark.parametrize("script", FINETUNING)
def test_symmetric_sampling_takes_its_share_from_the_online_rows(script):
    module = __import__(script[:-3])
    torch.manual_seed(0)
    offline, filled = 1000, torch.tensor(1100)
    table = torch.arange(2000, dtype=torch.float32)[:, None].repeat(1, 5)  # every column is the row's index
    draws = {ratio: torch.cat([module.online_minibatch(table, [1, 1, 1, 1, 1], 256, filled, offline, ratio)[0]
                               for _ in range(400)])[:, 0] for ratio in (None, 0.5, 0.25, 1.0)}
    for ratio, rows in draws.items():
        assert rows.max() < 1100 and rows.min() >= 0  # only filled rows
        share = float((rows >= offline).float().mean())
        expected = 100 / 1100 if ratio is None else ratio  # uniform: the online rows' share of the table
        assert abs(share - expected) < 0.01, (ratio, share)
    online = draws[0.5][draws[0.5] >= offline]
    assert abs(float(online.mean()) - 1049.5) < 2 and len(torch.unique(online)) == 100  # uniform over the online rows
    # Before the first online row, every draw comes from the dataset.
    early = module.online_minibatch(table, [1, 1, 1, 1, 1], 256, torch.tensor(offline), offline, 0.5)[0]
    assert early.max() < offline


@pytest.mark.parametrize("script", FINETUNING)
def test_an_online_phase_stopped_by_sigterm_resumes_with_its_rows(script, minari_root, tmp_path):
    """100 offline updates, then 200 environment steps: SIGTERM at the evaluation of step 200 (100 online rows), then
    --resume to the end. The rows collected before the stop are the first rows of the finished run; the episode in
    progress at the stop starts over, so the run goes on with new episodes."""
    argv = ["--dataset-id", HOPPER_ID, "--total-steps", "100", "--online-steps", "200", "--eval-every", "100",
            "--eval-episodes", "1", "--batch-size", "32", "--log-every", "50", "--save-every", "0",
            *EXTRA_ARGS.get(script, []), *(["--calql"] if script == "cql_continuous.py" else [])]
    code = SIGTERM_AT_EVALUATION
    stopped = subprocess.run([sys.executable, "-c", code, "200", str(ROOT / script), *argv], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "step 200/300 online" in stopped.stdout
    [run_dir] = (tmp_path / "runs").iterdir()
    first = torch.load(run_dir / f"{script[:-3]}.pt", weights_only=True)["loop"]["carry"]
    assert first["online"].shape[0] == 100
    resumed = run_script(script, "--resume", str(run_dir), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(run_dir / f"{script[:-3]}.pt", weights_only=True)["loop"]["carry"]
    assert final["online"].shape[0] == 200 and torch.equal(final["online"][:100], first["online"])
    assert final["episodes"] > first["episodes"] and scalars(run_dir)["charts/env_steps"][-1] <= 200
    if script == "cql_continuous.py":  # Cal-QL: the episode cut by the stop keeps G = -inf (no floor); the episodes
        import cql_continuous  # that ended after the resume, which restarted it, got their own returns-to-go

        rows = final["online"]
        ends = rows[:, -2].nonzero().flatten().tolist()
        cut = max([i for i in ends if i < 100], default=-1) + 1  # the first row of the interrupted episode
        assert torch.isinf(rows[cut:100, -1]).all() and cut < 100
        for start, end in zip([100] + [i + 1 for i in ends if i >= 100], [i for i in ends if i >= 100]):
            expected = cql_continuous.returns_to_go(rows[start:end + 1, 14].numpy(), [end + 1 - start], 0.99)
            np.testing.assert_allclose(rows[start:end + 1, -1].numpy(), expected, rtol=1e-5)


@pytest.mark.parametrize("script", FINETUNING)
def test_without_an_online_phase_the_online_flags_change_nothing(script, minari_root, tmp_path_factory, tmp_path):
    _, straight = train(script, HOPPER_ID, tmp_path_factory)
    flagged = run_script(script, *smoke_args(script, HOPPER_ID), "--online-steps", "0", "--utd", "4",
                         "--online-ratio", "0.5", cwd=tmp_path)
    assert flagged.returncode == 0, flagged.stderr[-3000:]
    [run_dir] = (tmp_path / "runs").iterdir()
    expected, logged = scalars(straight), scalars(run_dir)
    compared = [t for t in expected if t.split("/")[0] in ("losses", "values", "eval")]
    assert len(compared) >= 5 and all(logged[t] == expected[t] for t in compared)


@pytest.mark.parametrize("script", FINETUNING)
def test_online_from_scratch_on_a_task_that_never_terminates(script, minari_root, tmp_path):
    """--total-steps 0: online RL from the first step (cql_continuous.py --cql-alpha 0: SAC with the dataset mixed in
    symmetrically); Pendulum's episodes end at the time limit only, so no online row is terminal. IQL's fine-tuning
    keeps the actor's learning rate where it started, as the official fine-tuning configuration does."""
    extra = {"cql_continuous.py": ["--cql-alpha", "0", "--hidden-dims", "32", "32"]}.get(script, [])
    result = run_script(script, "--dataset-id", PENDULUM_ID, "--total-steps", "0", "--online-steps", "250",
                        "--utd", "2", "--online-ratio", "0.5", "--eval-every", "250", "--eval-episodes", "1",
                        "--batch-size", "16", "--log-every", "50", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 250/500 online" in result.stdout and "step 500/500 online" in result.stdout
    [run_dir] = (tmp_path / "runs").iterdir()
    carry = torch.load(run_dir / f"{script[:-3]}.pt", weights_only=True)["loop"]["carry"]
    assert carry["online"].shape[0] == 250 and carry["online"][:, -1].sum() == 0 and carry["episodes"] == 1
    logged = scalars(run_dir)
    assert logged["charts/env_steps"] == [200.0]
    if script == "iql.py":
        assert logged["charts/actor_lr"] == pytest.approx([3e-4] * 10)


@pytest.mark.parametrize("script", FINETUNING)
def test_fine_tuning_mistakes_are_one_line(script, minari_root, tmp_path):
    from test_smoke import assert_clear_error

    for argv, message in ((["--total-steps", "-5", "--online-steps", "3"], "must be >= 0"),
                          (["--total-steps", "0"], "--total-steps must be >= 1"),
                          (["--online-steps", "10", "--utd", "0"], "--utd be >= 1"),
                          (["--online-steps", "10", "--online-ratio", "1.5"], "--online-ratio must lie in [0, 1]")):
        assert_clear_error(run_script(script, "--dataset-id", HOPPER_ID, *argv, cwd=tmp_path), message)
    assert not (tmp_path / "runs").exists()


def test_returns_to_go_are_computed_backwards_inside_each_episode():
    """Cal-QL's G: an episode that ends in a truncation gets nothing past its end, like one that terminates."""
    import cql_continuous

    rewards = np.array([1.0, 1.0, 1.0, 2.0, 2.0], dtype=np.float32)
    g = cql_continuous.returns_to_go(rewards, [3, 2], 0.5)
    np.testing.assert_allclose(g, [1.75, 1.5, 1.0, 3.0, 2.0])


class StubCritic(torch.nn.Module):
    """Q values chosen by hand for the regularizer's batched call; zeros for the policy loss's call."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def forward(self, obs, actions, detach_params=False):
        return self.values if len(obs) == self.values.shape[1] else torch.zeros(2, len(obs))


def test_calql_floors_only_the_policy_actions_values_that_lie_below_the_return_to_go():
    """One state, 2 actions per proposal, the plain log-sum-exp (no importance weights): [data | uniform x2 | pi(s) x2 |
    pi(s') x2]. With G = 1, pi(s)'s -3 and pi(s')'s -2 and 0.5 are raised to 1; pi(s)'s 2, the uniform actions' and
    the data's values are left as they are."""
    import cql_continuous

    args = cql_continuous.Args(hidden_dims=(8,), cql_n_actions=2, importance_sampling=False)
    agent = cql_continuous.Agent(1, 1, args, torch.device("cpu"))
    agent.critic = StubCritic(torch.tensor([[0.0, 1.0, -1.0, -3.0, 2.0, -2.0, 0.5]] * 2))
    batch = (torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.zeros(1, 1), torch.zeros(1))
    floored = agent.losses(*batch, rtg=torch.tensor([1.0]))
    plain = agent.losses(*batch)
    unknown = agent.losses(*batch, rtg=torch.tensor([-torch.inf]))  # an online row whose episode is still running
    lse = lambda values: float(torch.logsumexp(torch.tensor(values), 0))  # noqa: E731
    # cql_logsumexp's plain version: [uniform, data, pi(s'), pi(s)]
    assert float(floored["values/q_ood"]) == pytest.approx(lse([1.0, -1.0, 0.0, 1.0, 1.0, 1.0, 2.0]), abs=1e-5)
    assert float(plain["values/q_ood"]) == pytest.approx(lse([1.0, -1.0, 0.0, -2.0, 0.5, -3.0, 2.0]), abs=1e-5)
    assert float(unknown["values/q_ood"]) == pytest.approx(float(plain["values/q_ood"]), abs=1e-6)
    for tag in ("values/q_random", "values/q_data"):
        assert float(floored[tag]) == float(plain[tag])
    assert float(floored["values/calql_floored"]) == 0.5 and "values/calql_floored" not in plain


def test_calql_online_rows_get_their_return_to_go_when_their_episode_ends(minari_root, tmp_path):
    result = run_script("cql_continuous.py", "--dataset-id", HOPPER_ID, "--total-steps", "100", "--online-steps",
                        "200", "--calql", "--online-ratio", "0.5", "--eval-every", "150", "--eval-episodes", "1",
                        "--batch-size", "32", "--log-every", "50", "--hidden-dims", "32", "32", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [run_dir] = (tmp_path / "runs").iterdir()
    ckpt = torch.load(run_dir / "cql_continuous.pt", weights_only=True)
    rows, discount = ckpt["loop"]["carry"]["online"], ckpt["args"]["discount"]
    rewards, terminals, g = rows[:, 11 + 3], rows[:, -2], rows[:, -1]
    ends = terminals.nonzero().flatten().tolist()  # random Hopper falls within the 200 steps, several times
    assert len(ends) >= 2 and ends[-1] < 199
    import cql_continuous

    start = 0
    for end in ends:
        expected = cql_continuous.returns_to_go(rewards[start:end + 1].numpy(), [end + 1 - start], discount)
        np.testing.assert_allclose(g[start:end + 1].numpy(), expected, rtol=1e-5)
        start = end + 1
    assert torch.isinf(g[start:]).all() and (g[start:] < 0).all()  # the episode still running: no floor yet
    assert "values/calql_floored" in scalars(run_dir)
