"""IQL's pieces checked on hand-computed cases (Kostrikov et al. 2021, Eqs. 5-7)."""

import math
from types import SimpleNamespace

import gymnasium as gym
import iql
import numpy as np
import pytest
import torch


def test_expectile_loss_weights_positive_and_negative_errors_asymmetrically():
    diff = torch.tensor([2.0, -2.0, 0.5])
    loss = iql.expectile_loss(diff, 0.7)
    torch.testing.assert_close(loss, torch.tensor([0.7 * 4, 0.3 * 4, 0.7 * 0.25]))


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_expectile_loss_minimizer_is_the_expectile(tau):
    """Minimizing E[L(x - v)] over v gives the tau-expectile: the mean at 0.5, above it for tau > 0.5."""
    x = torch.tensor([0.0, 1.0, 2.0, 10.0])
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        iql.expectile_loss(x - v, tau).mean().backward()
        opt.step()
    # The tau-expectile solves tau * sum((x - v)+) = (1 - tau) * sum((v - x)+).
    above, below = (x - v).clamp(min=0).sum(), (v - x).clamp(min=0).sum()
    assert abs(tau * above.item() - (1 - tau) * below.item()) < 1e-2
    if tau == 0.5:
        assert abs(v.item() - x.mean().item()) < 1e-2
    else:
        assert v.item() > x.mean().item() + 0.5


def test_advantage_weights_clip_and_temperature_zero_is_behaviour_cloning():
    adv = torch.tensor([-1.0, 0.0, 1.0, 10.0])
    w = iql.advantage_weights(adv, temperature=3.0, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([np.exp(-3.0), 1.0, np.exp(3.0), 100.0], dtype=torch.float32))
    assert torch.equal(iql.advantage_weights(adv, temperature=0.0, max_weight=100.0), torch.ones(4))


def test_td_target_masks_only_terminal_transitions():
    r = torch.tensor([1.0, 1.0])
    terminal = torch.tensor([0.0, 1.0])
    next_v = torch.tensor([10.0, 10.0])
    torch.testing.assert_close(iql.td_target(r, terminal, next_v, 0.99), torch.tensor([1.0 + 9.9, 1.0]))


def episode(obs, rewards, terminated):
    n = len(rewards)
    return SimpleNamespace(observations=np.asarray(obs, dtype=np.float64), actions=np.zeros((n, 1)),
                           rewards=np.asarray(rewards), terminations=np.array([False] * (n - 1) + [terminated]),
                           truncations=np.array([False] * (n - 1) + [not terminated]))


def test_transitions_never_cross_an_episode_end():
    space = gym.spaces.Box(-np.inf, np.inf, (1,))
    first = episode([[0], [1], [2]], [1.0, 1.0], terminated=False)  # truncated: s' = 2 is kept, not bootstrapped away
    second = episode([[10], [11], [12], [13]], [0.5, 0.5, 0.5], terminated=True)
    data = iql.episodes_to_transitions([first, second], space)
    np.testing.assert_array_equal(data["observations"][:, 0], [0, 1, 10, 11, 12])
    np.testing.assert_array_equal(data["next_observations"][:, 0], [1, 2, 11, 12, 13])
    np.testing.assert_array_equal(data["terminals"], [0, 0, 0, 0, 1])  # the truncation is not terminal
    np.testing.assert_allclose(data["episode_returns"], [2.0, 1.5])
    np.testing.assert_array_equal(data["episode_lengths"], [2, 3])


def test_dict_observations_are_flattened_in_the_space_key_order():
    """The order gymnasium's FlattenObservation uses at evaluation, so the policy sees the same layout there."""
    space = gym.spaces.Dict({"b": gym.spaces.Box(-1, 1, (2,)), "a": gym.spaces.Box(-1, 1, (1,))})
    obs = {"a": np.array([[1.0], [2.0], [0.0]]), "b": np.array([[3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])}
    ep = SimpleNamespace(observations=obs, actions=np.zeros((2, 1)), rewards=np.zeros(2),
                         terminations=np.zeros(2, bool), truncations=np.array([False, True]))
    data = iql.episodes_to_transitions([ep], space)
    expected = np.stack([gym.spaces.flatten(space, {"a": obs["a"][i], "b": obs["b"][i]}) for i in range(3)])
    np.testing.assert_array_equal(data["observations"], expected[:2])
    np.testing.assert_array_equal(data["next_observations"], expected[1:])


def test_twin_q_equals_two_separate_networks():
    """Values and weight gradients both match two plain MLPs (the output unit is not a matmul in TwinQ)."""
    torch.manual_seed(0)
    q = iql.TwinQ(4, 2, (8, 8))
    obs, act, upstream = torch.randn(5, 4), torch.randn(5, 2), torch.randn(2, 5)
    out = q(obs, act)
    assert out.shape == (2, 5)
    (out * upstream).sum().backward()
    weights = [w.detach().clone().requires_grad_() for w in q.weights]
    biases = [b.detach().clone().requires_grad_() for b in q.biases]
    for member in range(2):
        x = torch.cat([obs, act], -1)
        for i, (w, b) in enumerate(zip(weights, biases)):
            x = x @ w[member] + b[member]
            x = torch.relu(x) if i < len(weights) - 1 else x
        torch.testing.assert_close(out[member], x.squeeze(-1))
        (x.squeeze(-1) * upstream[member]).sum().backward()
    for mine, reference in zip([*q.weights, *q.biases], [*weights, *biases]):
        torch.testing.assert_close(mine.grad, reference.grad)


def test_policy_log_prob_is_a_diagonal_gaussian_with_tanh_mean():
    torch.manual_seed(0)
    pi = iql.GaussianPolicy(3, 2, (16,))
    with torch.no_grad():
        pi.log_std.copy_(torch.tensor([-7.0, 0.3]))  # the first is clipped to -5
    obs, act = torch.randn(4, 3), torch.rand(4, 2) * 2 - 1
    expected = torch.distributions.Normal(pi(obs), torch.exp(torch.tensor([-5.0, 0.3]))).log_prob(act).sum(-1)
    torch.testing.assert_close(pi.log_prob(pi(obs), act), expected)
    assert pi(obs).abs().max() < 1


def make_agent(**overrides):
    args = iql.Args(**{"hidden_dims": (32, 32), "total_steps": 100, **overrides})
    return iql.Agent(3, 2, args, torch.device("cpu")), args


def random_batch(n=16):
    return torch.randn(n, 3), torch.rand(n, 2) * 2 - 1, torch.randn(n), torch.randn(n, 3), (torch.rand(n) < 0.2).float()


def test_update_moves_targets_by_tau_and_decays_the_actor_lr_to_zero():
    torch.manual_seed(0)
    agent, args = make_agent()
    old_target = [p.clone() for p in agent.target_critic.parameters()]
    info = agent.update(*random_batch())
    assert all(torch.isfinite(v) for v in info.values())
    for old, target, online in zip(old_target, agent.target_critic.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(target, (1 - args.tau) * old + args.tau * online)
    for step in range(2, args.total_steps + 1):
        agent.update(*random_batch())
        # The cosine schedule, kept on the device so that a captured step follows it: the optimizer reads this tensor.
        assert agent.actor_opt.param_groups[0]["lr"] is agent.actor_lr
        expected = args.actor_lr * (1 + math.cos(math.pi * step / args.total_steps)) / 2
        assert agent.actor_lr.item() == pytest.approx(expected, rel=1e-5, abs=1e-9)
    assert agent.actor_lr.item() == pytest.approx(0.0, abs=1e-12)


def test_the_value_update_only_changes_v_from_the_target_critic():
    """Eq. 5 regresses V on the *target* Q; the online critic and actor are changed by their own losses only."""
    torch.manual_seed(0)
    agent, _ = make_agent(actor_lr=0.0, critic_lr=0.0)
    critic_before = [p.clone() for p in agent.critic.parameters()]
    value_before = [p.clone() for p in agent.value.parameters()]
    agent.update(*random_batch())
    assert all(torch.equal(a, b) for a, b in zip(critic_before, agent.critic.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(value_before, agent.value.parameters()))


def test_advantage_weighting_beats_behaviour_cloning_on_a_bandit():
    """One-step task: reward -(a - a*)^2 with a* = 0.6, data actions uniform on [-1, 1]. Behaviour cloning learns the
    data's mean action (about 0); IQL with a high expectile and temperature should move towards a*."""

    def train(temperature):
        torch.manual_seed(0)
        agent, _ = make_agent(temperature=temperature, expectile=0.9, total_steps=600, actor_lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        for _ in range(600):
            obs = torch.randn(64, 3, generator=gen)
            act = torch.rand(64, 2, generator=gen) * 2 - 1
            reward = -((act - 0.6) ** 2).sum(-1)
            agent.update(obs, act, reward, obs, torch.ones(64))
        with torch.no_grad():
            chosen = agent.actor(torch.randn(256, 3, generator=gen))
        return -((chosen - 0.6) ** 2).sum(-1).mean().item()

    bc, weighted = train(0.0), train(10.0)
    assert bc < -0.5  # about -(0.6^2) * 2 = -0.72
    assert weighted > bc + 0.3, (weighted, bc)
