"""BCQ's pieces checked on hand-computed cases (Fujimoto, Meger, Precup 2019, Eqs. 10-13)."""

import bcq
import pytest
import torch


def test_decoding_from_the_prior_clips_the_latent_to_half_a_unit():
    torch.manual_seed(0)
    vae = bcq.VAE(3, 2, (16, 16))
    obs = torch.randn(64, 3)
    torch.manual_seed(1)
    sampled = vae.decode(obs)
    torch.manual_seed(1)
    z = torch.randn(64, vae.latent_dim)
    assert z.abs().max() > 0.5  # the draw does reach outside [-0.5, 0.5]...
    torch.testing.assert_close(sampled, vae.decode(obs, z.clamp(-0.5, 0.5)))  # ...and decode used the clipped one
    assert not torch.allclose(sampled, vae.decode(obs, z))
    assert vae.latent_dim == 4 and sampled.abs().max() <= 1


def test_vae_loss_is_reconstruction_plus_half_kl():
    actions = torch.tensor([[0.5, -0.5]])
    total, recon, kl = bcq.vae_loss(actions, actions, torch.zeros(1, 4), torch.ones(1, 4), kl_weight=0.5)
    assert recon.item() == 0 and kl.item() == pytest.approx(0.0, abs=1e-7)  # a perfect fit and the prior itself
    total, recon, kl = bcq.vae_loss(actions + 1, actions, torch.ones(1, 4), torch.ones(1, 4), kl_weight=0.5)
    assert recon.item() == pytest.approx(1.0) and kl.item() == pytest.approx(0.5)  # KL of N(1, 1): mean^2 / 2
    assert total.item() == pytest.approx(1.0 + 0.5 * 0.5)


def test_soft_clipped_double_q_target_on_a_hand_case():
    # Two target networks, one next state, two candidates: values (1, 3) and (5, 2).
    next_q = torch.tensor([[[1.0, 5.0]], [[3.0, 2.0]]])
    # candidate 1: 0.75 * 1 + 0.25 * 3 = 1.5; candidate 2: 0.75 * 2 + 0.25 * 5 = 2.75; the max is 2.75.
    y = bcq.bcq_target(torch.tensor([1.0]), torch.tensor([0.0]), next_q, lmbda=0.75, discount=0.9)
    assert y.item() == pytest.approx(1.0 + 0.9 * 2.75)
    assert bcq.bcq_target(torch.tensor([1.0]), torch.tensor([1.0]), next_q, 0.75, 0.9).item() == pytest.approx(1.0)
    # lambda = 1 is clipped double Q: the max over candidates of the min over networks.
    assert bcq.bcq_target(torch.tensor([0.0]), torch.tensor([0.0]), next_q, 1.0, 1.0).item() == pytest.approx(2.0)


def test_perturbation_is_bounded_by_phi_and_stays_in_the_action_box():
    torch.manual_seed(0)
    xi = bcq.Perturbation(3, 2, (16,), phi=0.05)
    with torch.no_grad():
        for p in xi.parameters():
            p.mul_(100)  # saturate the tanh
    obs, actions = torch.randn(256, 3), torch.rand(256, 2) * 2 - 1
    out = xi(obs, actions)
    assert (out - actions).abs().max() <= 0.05 + 1e-6
    assert (out - actions).abs().max() > 0.04  # the bound is reached, not merely respected
    assert out.abs().max() <= 1.0


def test_acting_keeps_the_candidate_with_the_highest_q1_inside_the_bounds():
    torch.manual_seed(0)
    args = bcq.Args(hidden_dims=(16, 16), vae_hidden_dims=(16, 16), num_candidates=100)
    agent = bcq.Agent(3, 2, args, torch.device("cpu"))
    # Q1 prefers actions near (0.3, -0.3); Q2 prefers the opposite corner and must be ignored when acting.
    target = torch.tensor([0.3, -0.3])

    def fake_q(obs, actions, member=None):
        q1 = -((actions - target) ** 2).sum(-1)
        q = torch.stack([q1, -q1])
        return q if member is None else q[member:member + 1]

    agent.critic.forward = fake_q
    obs = torch.randn(8, 3)
    torch.manual_seed(1)
    with torch.no_grad():
        best = agent.act(obs)
    assert best.shape == (8, 2) and best.abs().max() <= 1.0
    torch.manual_seed(1)  # the same VAE draws again: the candidates act() chose from
    rep = obs.repeat_interleave(100, 0)
    with torch.no_grad():
        candidates = agent.actor(rep, agent.vae.decode(rep)).view(8, 100, 2)
    expected = candidates[torch.arange(8), (-((candidates - target) ** 2).sum(-1)).argmax(1)]
    torch.testing.assert_close(best, expected)
    assert not torch.allclose(best, candidates[torch.arange(8), (((candidates - target) ** 2).sum(-1)).argmax(1)])


def test_twin_q_single_member_equals_its_slice_of_the_pair():
    torch.manual_seed(0)
    q = bcq.TwinQ(3, 2, (8, 8))
    obs, act = torch.randn(5, 3), torch.randn(5, 2)
    both = q(obs, act)
    assert both.shape == (2, 5)
    torch.testing.assert_close(q(obs, act, member=0)[0], both[0])
    torch.testing.assert_close(q(obs, act, member=1)[0], both[1])


def test_update_trains_all_networks_and_moves_both_targets_by_tau():
    torch.manual_seed(0)
    args = bcq.Args(hidden_dims=(16, 16), vae_hidden_dims=(16, 16), batch_size=8)
    agent = bcq.Agent(3, 2, args, torch.device("cpu"))
    before = {name: [p.clone() for p in getattr(agent, name).parameters()] for name in ("vae", "actor", "critic")}
    old_targets = [p.clone() for p in agent.targets]
    batch = torch.randn(8, 3), torch.rand(8, 2) * 2 - 1, torch.randn(8), torch.randn(8, 3), torch.zeros(8)
    info = agent.update(*batch)
    assert all(torch.isfinite(v) for v in info.values())
    for name, params in before.items():
        assert any(not torch.equal(a, b) for a, b in zip(params, getattr(agent, name).parameters())), name
    for old, target, online in zip(old_targets, agent.targets, agent.online):
        torch.testing.assert_close(target, (1 - args.tau) * old + args.tau * online)


def test_actor_loss_reaches_the_actions_but_not_the_critic_weights():
    torch.manual_seed(0)
    agent = bcq.Agent(3, 2, bcq.Args(hidden_dims=(16, 16), vae_hidden_dims=(16, 16)), torch.device("cpu"))
    actions = (torch.rand(5, 2) * 2 - 1).requires_grad_()
    agent.critic(torch.randn(5, 3), actions, member=0, detach_params=True).mean().backward()
    assert actions.grad is not None and actions.grad.abs().sum() > 0
    assert all(p.grad is None for p in agent.critic.parameters())
