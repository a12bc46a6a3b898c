"""Student's t bounds for differences of estimates with few-replicate standard errors (analyze/significance.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from analyze.significance import critical, difference_bound, welch_dof


def test_critical_is_students_t_at_the_coverage_of_two_normal_errors():
    coverage = stats.norm.cdf(2.0)  # 0.97725: two-sided 95.45%
    for dof in (1, 2, 3, 6, 30):
        assert critical(dof) == pytest.approx(stats.t.ppf(coverage, dof))
    assert critical(np.inf) == 2.0
    assert critical(1e6) == pytest.approx(2.0, abs=1e-4)
    assert critical(3) == pytest.approx(3.307, abs=1e-3) and critical(1) > 13  # 4 chains; 2 chains


def test_welch_dof_of_equal_errors_adds_and_of_one_dominant_error_is_its_own():
    assert welch_dof(1.0, 3, 1.0, 3) == pytest.approx(6.0)
    assert welch_dof(1.0, 3, 1e-4, 3) == pytest.approx(3.0, rel=1e-6)
    assert welch_dof(1.0, 3, 0.5, np.inf) == pytest.approx((1.25 ** 2) / (1 / 3))
    assert welch_dof(0.0, 3, 0.0, 3) == np.inf  # an exact difference


def test_the_bound_covers_the_difference_of_two_chain_estimates_at_its_nominal_rate():
    """Simulate the between-chain errors of two 4-chain estimates of equal means: the t bound is exceeded at about
    the nominal 4.55% (Welch's dof, taken from the estimated errors, makes it a little conservative at 3 dof per
    side: 3.6%), the normal bound of 2 errors more than twice as often."""
    rng = np.random.default_rng(0)
    runs, chains = 20_000, 4
    a, b = rng.normal(size=(runs, chains)), rng.normal(size=(runs, chains))
    diff = a.mean(1) - b.mean(1)
    se_a, se_b = a.std(1, ddof=1) / math.sqrt(chains), b.std(1, ddof=1) / math.sqrt(chains)
    se, t = difference_bound(se_a, chains - 1, se_b, chains - 1)
    exceeded = np.mean(np.abs(diff) > t * se)
    nominal = 2 * (1 - stats.norm.cdf(2.0))
    assert 0.7 * nominal < exceeded <= nominal + 0.003
    assert np.mean(np.abs(diff) > 2.0 * se) > 2 * exceeded
