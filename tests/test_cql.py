"""CQL's pieces checked on hand-computed cases (Kumar et al. 2020, Eq. 4 and Appendix F)."""

import math

import cql_continuous as cql
import pytest
import torch


def test_importance_sampled_logsumexp_matches_a_hand_computation():
    # One Q network, one state, one sample per proposal, 2-d actions: uniform density 0.5^2 on [-1, 1]^2.
    q_rand, q_pi, q_pi_next = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]]), torch.tensor([[[0.5]]])
    log_pi, log_pi_next = torch.tensor([[-1.0]]), torch.tensor([[0.3]])
    q_data = torch.tensor([[7.0]])  # left out of the importance-sampled estimate
    out = cql.cql_logsumexp(q_rand, q_pi, q_pi_next, q_data, 2, log_pi, log_pi_next, temp=1.0,
                            importance_sampling=True)
    expected = math.log(math.exp(1.0 - 2 * math.log(0.5)) + math.exp(2.0 + 1.0) + math.exp(0.5 - 0.3))
    assert out.shape == (1, 1)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_plain_logsumexp_includes_the_data_action_and_no_densities():
    q_rand, q_pi, q_pi_next = torch.tensor([[[1.0]]]), torch.tensor([[[2.0]]]), torch.tensor([[[0.5]]])
    q_data = torch.tensor([[3.0]])
    out = cql.cql_logsumexp(q_rand, q_pi, q_pi_next, q_data, 2, torch.tensor([[-1.0]]), torch.tensor([[0.3]]),
                            temp=2.0, importance_sampling=False)
    expected = 2.0 * math.log(sum(math.exp(v / 2.0) for v in (1.0, 3.0, 0.5, 2.0)))
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_deterministic_backup_omits_the_entropy_term():
    r, term, next_q = torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([10.0, 10.0])
    torch.testing.assert_close(cql.sac_target(r, term, next_q, 0.9), torch.tensor([10.0, 1.0]))
    soft = cql.sac_target(r, term, next_q, 0.9, alpha=torch.tensor(0.5), next_log_pi=torch.tensor([-2.0, -2.0]))
    torch.testing.assert_close(soft, torch.tensor([1.0 + 0.9 * 11.0, 1.0]))
    assert cql.Args().backup_entropy is False  # the official default


def test_tanh_gaussian_log_prob_matches_torch_distributions():
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, 3), torch.rand(5, 3) - 1
    actions, log_pi = cql.sample_tanh_gaussian(mean, log_std)
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       torch.distributions.TanhTransform())
    torch.testing.assert_close(log_pi, dist.log_prob(actions).sum(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cql.tanh_gaussian_log_prob(mean, log_std, actions), log_pi, rtol=1e-3, atol=1e-3)
    many, many_log_pi = cql.sample_tanh_gaussian(mean, log_std, n=4)
    assert many.shape == (5, 4, 3) and many_log_pi.shape == (5, 4)


def test_twin_q_detached_params_pass_gradient_to_actions_only():
    q = cql.TwinQ(3, 2, (8,))
    actions = torch.randn(4, 2, requires_grad=True)
    q(torch.randn(4, 3), actions, detach_params=True).sum().backward()
    assert actions.grad is not None and actions.grad.abs().sum() > 0
    assert all(p.grad is None for p in q.parameters())


def make_agent(**overrides):
    args = cql.Args(**{"hidden_dims": (32, 32), "cql_n_actions": 4, **overrides})
    return cql.Agent(3, 2, args, torch.device("cpu")), args


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, generator=g), torch.rand(n, 2, generator=g) * 2 - 1, torch.randn(n, generator=g),
            torch.randn(n, 3, generator=g), (torch.rand(n, generator=g) < 0.2).float())


def test_sampled_actions_carry_no_gradient_into_the_critic_loss():
    """The proposal actions and log-probs are constants of the regularizer: the critic's loss reaches no policy
    parameter, and the policy's loss reaches no critic parameter."""
    torch.manual_seed(0)
    agent, _ = make_agent()
    out = agent.losses(*batch())
    actor_grads = torch.autograd.grad(out["critic_loss"], list(agent.actor.parameters()), allow_unused=True)
    assert all(g is None for g in actor_grads)
    critic_grads = torch.autograd.grad(out["policy_loss"], list(agent.critic.parameters()), allow_unused=True)
    assert all(g is None for g in critic_grads)
    assert torch.autograd.grad(out["policy_loss"], next(agent.actor.parameters()))[0].abs().sum() > 0


def test_the_regularizer_pushes_q_down_off_data_and_up_on_data():
    """d(conservative)/dQ(s, a_data) < 0: one gradient step on the regularizer alone raises the gap's data term."""
    torch.manual_seed(0)
    agent, _ = make_agent(cql_alpha=1.0)
    obs, actions, *rest = batch()
    out = agent.losses(obs, actions, *rest)
    grads = torch.autograd.grad(out["conservative"], list(agent.critic.parameters()))
    with torch.no_grad():
        before = agent.critic(obs, actions).mean()
        for p, g in zip(agent.critic.parameters(), grads):
            p -= 1e-2 * g
        after = agent.critic(obs, actions).mean()
    assert after > before


@pytest.mark.parametrize("target_gap, direction", [(1e-6, 1), (1e6, -1)])
def test_lagrange_update_moves_alpha_prime_towards_the_target_gap(target_gap, direction):
    """alpha' rises while cql_alpha * (logsumexp - Q_data) exceeds the target gap, and falls below it."""
    torch.manual_seed(0)
    agent, _ = make_agent(lagrange_gap=target_gap)
    out = agent.losses(*batch())
    assert (out["gap"] > 0).all()  # at initialization the soft maximum exceeds the data's Q
    before = agent.log_alpha_prime.item()
    agent.update(*batch())
    assert (agent.log_alpha_prime.item() - before) * direction > 0


def test_update_steps_every_network_and_keeps_alpha_prime_fixed_without_lagrange():
    torch.manual_seed(0)
    agent, args = make_agent(max_q_backup=True, bc_steps=1)
    old_target = [p.clone() for p in agent.target_critic.parameters()]
    for _ in range(2):  # one behaviour-cloning step, then one SAC step
        info = agent.update(*batch())
        assert all(torch.isfinite(v) for v in info.values())
    assert agent.log_alpha_prime.item() == 0.0
    assert agent.log_alpha.item() != 0.0
    assert any(not torch.equal(a, b) for a, b in zip(old_target, agent.target_critic.parameters()))
