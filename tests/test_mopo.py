"""MOPO's pieces checked on hand-computed cases (Yu et al. 2020, Algorithm 2 and Eq. 7-8)."""

from types import SimpleNamespace

import mopo
import pytest
import torch
import torch.nn.functional as F


def make_model(obs_dim=3, action_dim=2, members=4, elites=2):
    torch.manual_seed(0)
    return mopo.EnsembleDynamics(obs_dim, action_dim, (16, 16), members, elites)


def test_batched_ensemble_equals_a_loop_over_members():
    model = make_model()
    with torch.no_grad():
        model.input_mean.uniform_(-1, 1)
        model.input_std.uniform_(0.5, 2)
    obs, act = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1
    mean, logvar = model(obs, act)
    assert mean.shape == logvar.shape == (4, 5, 4)
    for m in range(4):
        x = (torch.cat([obs, act], -1) - model.input_mean) / model.input_std
        for i, (w, b) in enumerate(zip(model.weights, model.biases)):
            x = x @ w[m] + b[m]
            x = F.silu(x) if i < len(model.weights) - 1 else x
        mu, raw = x.chunk(2, -1)
        torch.testing.assert_close(mean[m], mu)
        torch.testing.assert_close(logvar[m], mopo.soft_clamp_logvar(raw, model.min_logvar[0], model.max_logvar[0]))


def test_log_variance_is_softly_bounded():
    lo, hi = torch.tensor(-10.0), torch.tensor(0.5)
    raw = torch.tensor([-1e3, -10.0, -3.0, 0.5, 1e3])
    out = mopo.soft_clamp_logvar(raw, lo, hi)
    # The lower clamp, applied second, can lift the top by softplus(hi - lo) - (hi - lo), about 3e-5 here.
    assert (out >= lo).all() and (out <= hi + 1e-4).all()
    torch.testing.assert_close(out[[0, -1]], torch.stack([lo, hi]), atol=1e-3, rtol=0)
    assert out[2].item() == pytest.approx(-3.0, abs=0.05)  # well inside the bounds it is nearly the identity
    assert torch.all(out[1:] > out[:-1])  # and it keeps the order


def test_penalty_is_the_largest_member_std_norm():
    # Two members, one sample, 2-d output: stds (3, 4) -> norm 5 and (1, 1) -> norm sqrt(2).
    logvar = torch.log(torch.tensor([[[9.0, 16.0]], [[1.0, 1.0]]]))
    assert mopo.uncertainty_penalty(logvar).item() == pytest.approx(5.0)


def test_termination_functions_on_hand_made_states():
    hopper = torch.zeros(4, 11)
    hopper[:, 0] = torch.tensor([1.2, 0.5, 1.2, 1.2])  # height
    hopper[:, 1] = torch.tensor([0.0, 0.0, 0.3, 0.0])  # torso angle
    hopper[3, 5] = 150.0  # a velocity out of range
    assert mopo.hopper_done(hopper).tolist() == [False, True, True, True]
    walker = torch.zeros(4, 17)
    walker[:, 0] = torch.tensor([1.2, 0.7, 2.1, 1.2])
    walker[:, 1] = torch.tensor([0.0, 0.0, 0.0, -1.5])
    assert mopo.walker2d_done(walker).tolist() == [False, True, True, True]
    ant = torch.zeros(3, 105)
    ant[:, 0] = torch.tensor([0.5, 0.1, 1.1])
    assert mopo.ant_done(ant).tolist() == [False, True, True]
    assert not mopo.never_done(torch.full((2, 17), 1e9)).any()
    assert mopo.termination_fn_for("Hopper-v5") is mopo.hopper_done
    assert mopo.termination_fn_for("HalfCheetah-v5") is mopo.never_done


def test_rollouts_stop_at_terminations_and_penalize_rewards():
    model = make_model()
    start = torch.randn(200, 3)
    done_fn = lambda s: s[:, 0] > 0  # noqa: E731  (about half of the branches end at every step)
    policy = lambda s: torch.zeros(s.shape[0], 2)  # noqa: E731
    torch.manual_seed(1)
    out = mopo.rollout(model, policy, start, horizon=3, penalty_coef=0.0, done_fn=done_fn)
    terminals = out["terminals"].bool()
    # Each step starts exactly from the previous step's surviving next states.
    first = start.shape[0]
    survivors = (~terminals[:first]).sum().item()
    continued = out["next_observations"][:first][~terminals[:first]]
    torch.testing.assert_close(out["observations"][first:first + survivors], continued)
    assert 0 < survivors < first
    torch.manual_seed(1)
    penalized = mopo.rollout(model, policy, start, horizon=1, penalty_coef=2.0, done_fn=done_fn)
    torch.manual_seed(1)
    plain = mopo.rollout(model, policy, start, horizon=1, penalty_coef=0.0, done_fn=done_fn)
    mean, logvar = model(start, policy(start))
    torch.testing.assert_close(plain["rewards"] - penalized["rewards"], 2.0 * mopo.uncertainty_penalty(logvar))


def test_next_states_come_from_elites_only():
    model = make_model(members=3, elites=1)
    with torch.no_grad():
        model.elites.fill_(2)
        model.biases[-1][:2, 0, 0] = 1e6  # members 0 and 1 would predict an absurd delta for the first dimension
        model.max_logvar.fill_(-20.0)  # near-deterministic samples
        model.min_logvar.fill_(-30.0)
    start = torch.zeros(50, 3)
    out = mopo.rollout(model, lambda s: torch.zeros(s.shape[0], 2), start, 1, 0.0, mopo.never_done)
    assert out["next_observations"].abs().max() < 1e3


def test_dynamics_training_fits_a_linear_system_and_picks_elites_by_holdout_error(tmp_path):
    torch.manual_seed(0)
    obs, act = torch.randn(1500, 3), torch.rand(1500, 2) * 2 - 1
    targets = torch.cat([0.5 * obs[:, :1] + act[:, :1] + 0.01 * torch.randn(1500, 1), torch.zeros(1500, 2),
                         obs[:, 1:2]], dim=1)  # delta s (3 dims) and reward
    model = make_model(members=4, elites=2)
    args = SimpleNamespace(dynamics_lr=3e-3, dynamics_batch_size=64, dynamics_max_epochs=15, num_elites=2)
    logged = []
    writer = SimpleNamespace(add_scalar=lambda tag, value, step: logged.append((tag, value)))
    before = (model(obs, act)[0] - targets).pow(2).mean().item()
    best = mopo.train_dynamics(model, obs, act, targets, args, writer)
    assert best.shape == (4,) and torch.isfinite(best).all()
    assert best.max().item() < 0.1 * before
    assert set(model.elites.tolist()) == set(torch.argsort(best)[:2].tolist())
    assert any(tag == "dynamics/holdout_mse_3" for tag, _ in logged)


def test_model_buffer_keeps_the_newest_rows_and_samples_only_filled_ones():
    buffer = mopo.ModelBuffer(capacity=5, width=5, device=torch.device("cpu"))
    buffer.add(torch.arange(3.0)[:, None].expand(-1, 5))
    obs, *_ = buffer.sample([1, 1, 1, 1, 1], 256)
    assert set(obs[:, 0].tolist()) == {0.0, 1.0, 2.0}  # never an empty row, though the table has five
    buffer.add(torch.arange(3.0, 7.0)[:, None].expand(-1, 5))
    assert buffer.size == 5
    assert sorted(buffer.table[:, 0].tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert set(buffer.sample([1, 1, 1, 1, 1], 256)[0][:, 0].tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
