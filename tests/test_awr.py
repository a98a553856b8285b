"""AWR's pieces checked on hand-computed cases (Peng et al. 2019, Alg. 1)."""

import math

import awr
import numpy as np
import pytest
import torch

# Two episodes: one of 3 transitions ending in a termination, one of 2 cut by a time limit (truncated).
REWARDS = [1.0, 2.0, 3.0, 0.5, -1.0]
TERMINALS = [0, 0, 1, 0, 0]
NEXT_V = [10.0, 20.0, 30.0, 40.0, 50.0]  # V(s') of each transition; the terminal one must be ignored


def vectorized(discount, lam):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return awr.td_lambda_returns(t(REWARDS), t(NEXT_V), t(TERMINALS), torch.tensor([3, 2]), discount, lam).numpy()


def step_by_step(discount, lam):
    """The original code's per-episode loop, written out."""
    out = np.zeros(5)
    for first, last in ((0, 2), (3, 4)):
        v_last = 0.0 if TERMINALS[last] else NEXT_V[last]
        out[last] = REWARDS[last] + discount * v_last
        for i in range(last - 1, first - 1, -1):
            out[i] = REWARDS[i] + discount * ((1 - lam) * NEXT_V[i] + lam * out[i + 1])
    return out


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.95, 1.0])
def test_vectorized_returns_equal_the_step_by_step_recursion(lam):
    np.testing.assert_allclose(vectorized(0.9, lam), step_by_step(0.9, lam), rtol=1e-12)


def test_lambda_one_is_monte_carlo_with_bootstrap_only_at_a_truncation():
    g = 0.9
    expected = [1 + g * 2 + g * g * 3, 2 + g * 3, 3,  # terminated: no bootstrap at all
                0.5 + g * (-1 + g * 50), -1 + g * 50]  # truncated: V(s') of its last transition only
    np.testing.assert_allclose(vectorized(g, 1.0), expected, rtol=1e-12)


def test_lambda_zero_gives_one_step_td_targets():
    g = 0.9
    expected = [1 + g * 10, 2 + g * 20, 3.0, 0.5 + g * 40, -1 + g * 50]
    np.testing.assert_allclose(vectorized(g, 0.0), expected, rtol=1e-12)


def test_weights_are_clipped_and_a_huge_temperature_is_behaviour_cloning():
    adv = torch.tensor([-2.0, 0.0, 1.0, 5.0])
    w, mean, std = awr.advantage_weights(adv, temperature=1.0, max_weight=20.0, normalize=False)
    torch.testing.assert_close(w, torch.tensor([math.exp(-2), 1.0, math.e, 20.0]))
    assert mean.item() == pytest.approx(1.0) and std.item() == pytest.approx(adv.std().item())
    w, _, _ = awr.advantage_weights(adv, temperature=1e6, max_weight=20.0, normalize=True)
    torch.testing.assert_close(w, torch.ones(4), atol=1e-5, rtol=0)


def test_normalized_advantages_are_standardized_before_weighting():
    adv = torch.tensor([10.0, 20.0, 30.0])
    w, _, _ = awr.advantage_weights(adv, temperature=1.0, max_weight=100.0, normalize=True)
    z = (adv - adv.mean()) / (adv.std() + 1e-5)
    torch.testing.assert_close(w, torch.exp(z))


def test_action_bound_penalty_only_counts_the_part_outside_the_box():
    mean = torch.tensor([[0.5, 1.5], [-3.0, 0.0]])
    # sample 1: 0.5^2; sample 2: 2^2; then 0.5 * mean over samples.
    assert awr.action_bound_penalty(mean).item() == pytest.approx(0.5 * (0.25 + 4.0) / 2)
    assert awr.action_bound_penalty(torch.zeros(3, 2)).item() == 0.0


def test_value_is_fitted_on_the_per_step_scale():
    """V(s) = f(s) / (1 - gamma), and the value loss is the original's 0.5 * MSE on f's scale, not on V's."""
    agent = awr.Agent(3, 2, awr.Args(hidden_dims=(8,), discount=0.99, value_lr=0.0), torch.device("cpu"))
    obs, targets = torch.randn(4, 3), torch.randn(4) * 100
    with torch.no_grad():
        f = agent.value(obs)
    torch.testing.assert_close(agent.value_step(obs, targets), 0.5 * ((targets / 100 - f) ** 2).mean())


def test_fixed_std_is_not_trained_and_learned_std_is():
    fixed = awr.Agent(3, 2, awr.Args(hidden_dims=(8,), fixed_std=0.4), torch.device("cpu"))
    learned = awr.Agent(3, 2, awr.Args(hidden_dims=(8,), fixed_std=None, actor_lr=0.1), torch.device("cpu"))
    obs, act, w = torch.randn(16, 3), torch.rand(16, 2) * 2 - 1, torch.ones(16)
    for agent in (fixed, learned):
        agent.update(obs, act, w)
    torch.testing.assert_close(fixed.actor.log_std, torch.full((2,), math.log(0.4)))
    assert not torch.equal(learned.actor.log_std.detach(), torch.zeros(2))


def test_advantage_weighting_beats_behaviour_cloning_on_a_bandit():
    """One-step episodes with reward -(a - 0.6)^2 for uniform data actions: behaviour cloning learns the mean action
    (about 0), advantage weighting moves towards 0.6."""

    def train(temperature):
        torch.manual_seed(0)
        args = awr.Args(hidden_dims=(32,), temperature=temperature, actor_lr=0.05, value_lr=0.01)
        agent = awr.Agent(3, 2, args, torch.device("cpu"))
        g = torch.Generator().manual_seed(1)
        obs, act = torch.randn(2048, 3, generator=g), torch.rand(2048, 2, generator=g) * 2 - 1
        reward = -((act - 0.6) ** 2).sum(-1)
        for _ in range(300):  # V(s) -> E[r]; every episode ends at once, so R^lambda = r
            idx = torch.randint(2048, (256,), generator=g)
            agent.value_step(obs[idx], reward[idx])
        with torch.no_grad():
            weights, _, _ = awr.advantage_weights(reward - agent.value(obs), temperature, 20.0, True)
        for _ in range(300):
            idx = torch.randint(2048, (256,), generator=g)
            agent.update(obs[idx], act[idx], weights[idx])
        with torch.no_grad():
            chosen = agent.actor(torch.randn(256, 3, generator=g)).clamp(-1, 1)
        return -((chosen - 0.6) ** 2).sum(-1).mean().item()

    bc, weighted = train(1e6), train(1.0)
    assert bc < -0.5
    assert weighted > bc + 0.3, (weighted, bc)
