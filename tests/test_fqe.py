"""FQE's math on a two-state chain whose value is known in closed form, its bootstrap, and fqe.py run as a user runs
it on an exported policy (Le et al. 2019; DOPE's settings)."""

import math
import re

import fqe
import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import CARTPOLE_ID, HOPPER_ID, PENDULUM_ID, run_script
from test_smoke import assert_clear_error, scalars, train

GAMMA = 0.9
PI = 0.5  # the evaluated policy's action in every state


def chain(n: int = 4096, length: int = 4) -> dict:
    """Episodes of `length` steps through states 0, 1, ..., length - 1 (one-hot), the last one ended by a termination
    (its recorded next state is state 0, as after a reset). The reward is the action, so a policy's value depends on
    its actions: under pi(s) = 0.5, V(0) = 0.5 (1 + gamma + ... + gamma^(length - 1)). The data's actions are spread
    evenly over [-1, 1] (mean 0), so the data's own value is 0: a backup with the dataset's next actions instead of
    pi(s') estimates 0.5 at state 0, not V(0); one that ignores the termination, 0.5 / (1 - gamma)."""
    state = torch.arange(n) % length
    actions = torch.linspace(-1, 1, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))][:, None]
    return {"obs": torch.eye(length)[state], "actions": actions, "rewards": actions[:, 0],
            "next_obs": torch.eye(length)[(state + 1) % length], "terminals": (state == length - 1).float(),
            "pi_next": torch.full((n, 1), PI), "data_next": torch.roll(actions, -1, 0)}  # the behaviour's next action


def fit(data: dict, next_actions: str = "pi_next", terminals: bool = True, steps: int = 2000, num_bootstrap: int = 0,
        weights: torch.Tensor | None = None) -> tuple:
    torch.manual_seed(0)
    args = fqe.Args(policy="x", discount=GAMMA, hidden_dims=(64, 64), critic_lr=1e-3, tau=0.02, weight_decay=0.0,
                    num_bootstrap=num_bootstrap)
    agent = fqe.Agent(data["obs"].shape[1], 1, args, torch.device("cpu"))
    n = len(data["obs"])
    weights = torch.ones(n, 1 + num_bootstrap) if weights is None else weights
    bound = 1.0 / (1 - GAMMA)  # |r| <= 1
    for _ in range(steps):
        i = torch.randint(n, (256,))
        agent.update(data["obs"][i], data["actions"][i], data["rewards"][i], data["next_obs"][i],
                     data["terminals"][i] if terminals else torch.zeros(256), data[next_actions][i], weights[i],
                     -bound, bound)
    start = data["obs"][:1]  # every episode starts in state 0
    return agent, agent.estimate(start, torch.full((1, 1), PI), torch.ones(1, 1 + num_bootstrap))


TRUTH = 0.5 * (1 + GAMMA + GAMMA**2 + GAMMA**3)  # 1.7195


def test_fqe_recovers_the_value_of_the_evaluated_policy_not_of_the_data():
    truth = TRUTH
    data = chain()
    _, estimate = fit(data)
    assert abs(float(estimate[0]) - truth) < 0.02 * truth, (float(estimate[0]), truth)
    # The same fit with the dataset's next actions evaluates the behaviour policy, and misses by far.
    _, sarsa = fit(data, next_actions="data_next")
    assert abs(float(sarsa[0]) - 0.5) < 0.1 and abs(float(sarsa[0]) - truth) > 0.5


def test_a_termination_stops_bootstrapping():
    """The last step's backup is its reward alone. Bootstrapping through it (from the reset state) would give
    0.5 / (1 - gamma) = 5.0 instead of 1.72."""
    truth = TRUTH
    data = chain()
    _, ignored = fit(data, terminals=False)
    assert abs(float(ignored[0]) - 5.0) < 0.5 and abs(float(ignored[0]) - truth) > 2.0


def test_target_uses_pi_and_the_terminal_mask_and_is_clipped():
    rewards, terminals, next_q = torch.tensor([1.0, 1.0, 5.0]), torch.tensor([0.0, 1.0, 0.0]), torch.tensor([2.0] * 3)
    target = fqe.fqe_target(rewards, terminals, next_q, 0.5, -10.0, 5.5)
    torch.testing.assert_close(target, torch.tensor([2.0, 1.0, 5.5]))  # 1 + 0.5 * 2; terminal: 1; 6 clipped to 5.5


def test_bootstrap_counts_episodes_and_the_first_fit_sees_everything():
    torch.manual_seed(0)
    lengths = torch.tensor([3, 1, 4, 2, 5])
    counts = fqe.bootstrap_weights(lengths, 200)
    assert counts.shape == (5, 201)
    torch.testing.assert_close(counts[:, 0], torch.ones(5))
    torch.testing.assert_close(counts.sum(0), torch.full((201,), 5.0))  # each resample has as many episodes
    assert counts.min() == 0 and counts.max() >= 3  # episodes left out and drawn several times
    assert abs(float(counts[:, 1:].mean()) - 1.0) < 1e-6 and abs(float(counts[:, 1:].var()) - 0.8) < 0.15  # 1 - 1/E


def test_each_fit_learns_only_from_the_transitions_it_counts():
    """A fit whose counts are all zero gets no gradient (weight decay off): its weights stay as they were, while the
    fits that count transitions move. The stacked members are independent networks."""
    data = chain(n=512)
    weights = torch.ones(512, 3)
    weights[:, 2] = 0.0
    torch.manual_seed(0)
    args = fqe.Args(policy="x", discount=GAMMA, hidden_dims=(16,), weight_decay=0.0, num_bootstrap=2)
    agent = fqe.Agent(4, 1, args, torch.device("cpu"))
    before = [w.detach().clone() for w in agent.critic.weights]
    agent.update(data["obs"][:256], data["actions"][:256], data["rewards"][:256], data["next_obs"][:256],
                 data["terminals"][:256], data["pi_next"][:256], weights[:256], -10.0, 10.0)
    for w, old in zip(agent.critic.weights, before):
        assert torch.equal(w[2], old[2]) and not torch.equal(w[:2], old[:2])


FINAL = r"episode starts: (\S+), 95% interval \[(\S+), (\S+)\] \((\d+) bootstrap fits; it covers the data's resampling, " \
    r"not FQE's own bias\); (.*)"


def test_fqe_script_estimates_an_exported_policy_with_an_interval(minari_root, tmp_path_factory, tmp_path):
    _, run_dir = train("iql.py", HOPPER_ID, tmp_path_factory)
    result = run_script("fqe.py", "--policy", str(run_dir / "iql_policy.pt2"), "--dataset-id", HOPPER_ID,
                        "--total-steps", "300", "--eval-every", "150", "--batch-size", "32", "--log-every", "50",
                        "--num-bootstrap", "3", "--hidden-dims", "64", "64", "--eval-episodes", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"; runs on (cpu \(no GPU found\), threads: 1|cuda)", result.stdout.splitlines()[0]), result.stdout
    value, low, high, fits, settled = re.search(FINAL, result.stdout).groups()
    value, low, high = float(value), float(low), float(high)
    assert math.isfinite(value) and low < value < high and fits == "3"
    # 300 steps, far fewer than the 1 / ((1 - 0.99) * 0.005) = 20000 that the value's horizon needs.
    assert settled.startswith("NOT CONVERGED (300 steps, fewer than") and "--total-steps" in settled, settled
    assert "Monte Carlo in Hopper-v5" in result.stdout and "over 2 episodes" in result.stdout
    [run] = (tmp_path / "runs").iterdir()
    logged = scalars(run)
    for tag in ("losses/td_loss", "losses/td_loss_bootstrap", "values/q_data", "estimate/value", "estimate/ci_low",
                "estimate/ci_high", "estimate/bootstrap_std", "eval/discounted_return", "charts/updates_per_second"):
        assert tag in logged and all(math.isfinite(v) for v in logged[tag]), tag
    # Estimates every --eval-every steps and at 3/4 of the fit, which the convergence check compares with the last.
    assert len(logged["estimate/value"]) == 3 and np.isclose(logged["estimate/value"][-1], value, atol=0.01)


def test_fqe_script_on_data_that_never_terminates(minari_root, tmp_path_factory, tmp_path):
    """Pendulum's episodes end at the time limit only: no target bound comes from an episode's end, the rewards are
    centred, and the estimate stays within the range of every policy's value."""
    _, run_dir = train("iql.py", PENDULUM_ID, tmp_path_factory)
    result = run_script("fqe.py", "--policy", str(run_dir / "iql_policy.pt2"), "--dataset-id", PENDULUM_ID,
                        "--total-steps", "200", "--eval-every", "100", "--batch-size", "32", "--num-bootstrap", "2",
                        "--hidden-dims", "32", "--eval-episodes", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    value = float(re.search(FINAL, result.stdout).group(1))
    assert -16.3 / (1 - 0.99) <= value <= 0.0, value  # Pendulum's rewards lie in [-16.3, 0]
    assert "Monte Carlo in Pendulum-v1" in result.stdout


def fqe_on_chain(tmp_path, dataset_id: str, episodes: list, action_space: gym.Space, policy: torch.nn.Module,
                 *more: str):
    """The episodes as a Minari dataset with no environment, the policy exported as a program, and fqe.py run on them
    with the settings of fit() above for 2000 steps; returns the finished run."""
    import minari

    length = len(episodes[0].observations[0])
    minari.create_dataset_from_buffers(dataset_id, episodes, algorithm_name="uniform", author="tests",
                                       author_email="tests@localhost", code_permalink="tests/test_fqe.py",
                                       description="chain", action_space=action_space,
                                       observation_space=gym.spaces.Box(0, 1, (length,)))
    program = torch.export.export(policy, (torch.zeros(2, length),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, tmp_path / "chain_policy.pt2")
    result = run_script("fqe.py", "--policy", str(tmp_path / "chain_policy.pt2"), "--dataset-id", dataset_id,
                        "--discount", str(GAMMA), "--hidden-dims", "64", "64", "--critic-lr", "1e-3", "--tau", "0.02",
                        "--weight-decay", "0", "--total-steps", "2000", "--eval-every", "250", "--num-bootstrap", "2",
                        *more, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fqe_script_recovers_a_closed_form_value_and_says_it_converged(minari_root, tmp_path):
    """The chain above as a Minari dataset, with no environment, and pi(s) = 0.5 exported as a program: the script's
    estimate is within 2% of the closed form, and the fit is long enough to be called converged."""
    from minari.data_collector import EpisodeBuffer

    data, length = chain(n=2048), 4
    obs, actions = data["obs"].numpy(), data["actions"].numpy()
    episodes = [EpisodeBuffer(id=i, observations=np.concatenate([obs[j:j + length], np.eye(length)[:1]]),
                              actions=actions[j:j + length], rewards=actions[j:j + length, 0],
                              terminations=np.arange(length) == length - 1, truncations=np.zeros(length, bool))
                for i, j in enumerate(range(0, len(obs), length))]

    class Half(torch.nn.Module):
        def forward(self, obs):
            return obs[:, :1] * 0.0 + PI

    result = fqe_on_chain(tmp_path, "test/chain/pi-v0", episodes, gym.spaces.Box(-1, 1, (1,)), Half(),
                          "--eval-episodes", "1")
    value, low, high, _, settled = re.search(FINAL, result.stdout).groups()
    assert abs(float(value) - TRUTH) < 0.02 * TRUTH, (value, TRUTH)
    assert settled.startswith("converged (moved"), settled
    assert "the dataset names no environment" in result.stdout


def test_fqe_script_recovers_a_closed_form_value_for_a_discrete_policy(minari_root, tmp_path):
    """The chain with three discrete actions whose reward is the action itself (Discrete(3, start=-1): -1, 0, 1),
    taken uniformly in the data, and a policy that always takes 1: Q(s, .) has one output per action, Q(s', pi(s')) is
    a gather, and the estimate is within 2% of 1 + gamma + gamma^2 + gamma^3 (the data's own value is 0)."""
    from minari.data_collector import EpisodeBuffer

    length, rng = 4, np.random.default_rng(0)
    actions = rng.integers(-1, 2, size=(512, length))
    episodes = [EpisodeBuffer(id=i, observations=np.eye(length)[[*range(length), 0]], actions=a, rewards=a * 1.0,
                              terminations=np.arange(length) == length - 1, truncations=np.zeros(length, bool))
                for i, a in enumerate(actions)]

    class Last(torch.nn.Module):  # what bcq_discrete.py and cql_discrete.py export: int64 actions, one per row
        def forward(self, obs):
            return torch.ones_like(obs[:, 0], dtype=torch.int64)

    result = fqe_on_chain(tmp_path, "test/chain/discrete-v0", episodes, gym.spaces.Discrete(3, start=-1), Last())
    value = float(re.search(FINAL, result.stdout).group(1))
    truth = 1 + GAMMA + GAMMA**2 + GAMMA**3
    assert abs(value - truth) < 0.02 * truth, (value, truth)


def test_fqe_script_runs_a_discrete_policy_in_its_environment(minari_root, tmp_path_factory, tmp_path):
    """A cql_discrete.py policy on CartPole (reward 1 per step): the estimate lies in (0, 1 / (1 - gamma)], and the
    Monte Carlo episodes step the environment with the policy's action indices."""
    _, run_dir = train("cql_discrete.py", CARTPOLE_ID, tmp_path_factory)
    result = run_script("fqe.py", "--policy", str(run_dir / "cql_discrete_policy.pt2"), "--dataset-id", CARTPOLE_ID,
                        "--total-steps", "300", "--eval-every", "150", "--batch-size", "32", "--num-bootstrap", "2",
                        "--hidden-dims", "64", "64", "--eval-episodes", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 0 < float(re.search(FINAL, result.stdout).group(1)) <= 1 / (1 - 0.99)
    returns = float(re.search(r"Monte Carlo in CartPole-v1: (\S+) ", result.stdout).group(1))
    assert 1 <= returns <= 1 / (1 - 0.99), result.stdout
    # A continuous policy on discrete data is named as a misfit, in one line.
    _, pendulum_run = train("iql.py", PENDULUM_ID, tmp_path_factory)
    assert_clear_error(run_script("fqe.py", "--policy", str(pendulum_run / "iql_policy.pt2"), "--dataset-id",
                                  CARTPOLE_ID, cwd=tmp_path), "does not fit the dataset", "shape (2,)")


def test_fqe_script_mistakes_are_one_line(minari_root, tmp_path_factory, tmp_path):
    _, pendulum_run = train("iql.py", PENDULUM_ID, tmp_path_factory)
    assert_clear_error(run_script("fqe.py", "--dataset-id", HOPPER_ID, cwd=tmp_path), "--policy is needed")
    notes = tmp_path / "notes.pt2"
    notes.write_text("not a policy")
    assert_clear_error(run_script("fqe.py", "--policy", str(notes), "--dataset-id", HOPPER_ID, "--no-download",
                                  cwd=tmp_path), "notes.pt2", "_policy.pt2")
    assert_clear_error(run_script("fqe.py", "--policy", str(pendulum_run / "iql_policy.pt2"), "--dataset-id", HOPPER_ID,
                                  "--no-download", cwd=tmp_path), "does not fit the dataset", "size 11",
                      "it gave AssertionError")
    # The policy is checked before the dataset is loaded: a wrong path is named at once.
    assert_clear_error(run_script("fqe.py", "--policy", str(tmp_path / "x.pt2"), "--dataset-id", "test/x/missing-v0",
                                  "--no-download", cwd=tmp_path), "x.pt2", "_policy.pt2")
    assert_clear_error(run_script("fqe.py", "--policy", "x.pt2", "--num-bootstrap", "1", cwd=tmp_path), "two fits")
    _, dt_run = train("dt.py", HOPPER_ID, tmp_path_factory)
    assert_clear_error(run_script("fqe.py", "--policy", str(dt_run / "dt_policy.pt2"), "--dataset-id", HOPPER_ID,
                                  cwd=tmp_path), "takes a context of past steps", "not Markov")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("gamma", [0.0, 0.5])
def test_estimate_is_the_weighted_mean_of_q_at_the_starts(gamma):
    """J of each fit: its target network's Q(s0, pi(s0)), on the reward scale, averaged with the fit's episode counts."""
    args = fqe.Args(policy="x", discount=gamma, hidden_dims=(8,), num_bootstrap=2)
    agent = fqe.Agent(2, 1, args, torch.device("cpu"))
    starts, actions = torch.randn(4, 2), torch.randn(4, 1)
    counts = torch.tensor([[1.0, 2.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 3.0], [1.0, 1.0, 0.0]])
    q = agent.target_critic(starts, actions) / (1 - gamma)
    expected = torch.stack([(q[k] * counts[:, k]).sum() / counts[:, k].sum() for k in range(3)])
    torch.testing.assert_close(agent.estimate(starts, actions, counts), expected)
