"""benchmark/ope.py's metrics, DOPE's (Fu et al. 2021), on hand-computed cases."""

import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmark"))
import ope  # noqa: E402

TRUE = np.array([10.0, 20.0, 30.0, 50.0])  # rescaled: 0, 0.25, 0.5, 1


def test_a_perfect_estimate_has_no_error_full_rank_correlation_and_no_regret():
    assert ope.metrics(TRUE, TRUE.copy()) == (0.0, pytest.approx(1.0), 0.0)


def test_a_shifted_estimate_keeps_its_ranking_but_pays_in_error():
    error, spearman, regret = ope.metrics(TRUE, TRUE + 8.0)  # +8 is 0.2 on the rescaled axis
    assert error == pytest.approx(0.2) and spearman == pytest.approx(1.0) and regret == 0.0


def test_a_reversed_ranking_picks_the_worst_policy():
    error, spearman, regret = ope.metrics(TRUE, -TRUE)
    assert spearman == pytest.approx(-1.0) and regret == 1.0  # its top pick is the worst policy
    # Rescaled estimates (-v - 10) / 40 are -0.5, -0.75, -1, -1.5 against 0, 0.25, 0.5, 1.
    assert error == pytest.approx(np.mean([0.5, 1.0, 1.5, 2.5]))


def test_overestimates_are_clipped_at_twice_the_range_and_ties_share_the_regret():
    error, _, _ = ope.metrics(TRUE, np.array([10.0, 20.0, 30.0, 1e6]))
    assert error == pytest.approx((2.0 - 1.0) / 4)  # 1e6 counts as 2 on the rescaled axis
    error, spearman, regret = ope.metrics(TRUE, np.full(4, 25.0))  # a constant: every policy tied at the top
    assert np.isnan(spearman) and regret == pytest.approx(1 - np.mean([0, 0.25, 0.5, 1]))


def test_ranks_average_ties_as_spearman_needs():
    np.testing.assert_array_equal(ope.ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_bootstrap_interval_brackets_the_point_estimate():
    rng = np.random.default_rng(1)
    true = rng.normal(size=30) * 10
    estimate = true + rng.normal(size=30) * 3
    point = ope.metrics(true, estimate)
    low, high = ope.bootstrap(true, estimate, resamples=300)
    assert np.all(low <= np.array(point) + 1e-9) and np.all(np.array(point) <= high + 1e-9)
    assert high[1] - low[1] < 0.5 and low[1] > 0.5  # a good estimator's rank correlation, tightly
