"""pyro_elbo_ext.compare.statistics: moments and their SEs against numpy and known moments,
standardized bias, its threshold at small R (Student-t, Sidak) and Cochran's check of R."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pyro_elbo_ext.compare.statistics import (
    efficiency,
    max_z_threshold,
    mean_and_se,
    parameter_statistics,
    repeats_for_normal_mean,
    signal_to_noise,
    skewness,
    standardized_bias,
    total_variance_and_se,
    variance_and_se,
)
from tests.mc import K_SE


def test_statistics_match_numpy_on_synthetic_draws():
    rng = np.random.default_rng(0)
    mu, sd, r = np.array([1.0, -2.0, 0.5]), np.array([0.5, 2.0, 3.0]), 400
    draws = mu + sd * rng.standard_normal((r, 3))

    mean, se = mean_and_se(draws)
    np.testing.assert_allclose(mean, draws.mean(0), rtol=1e-12)
    np.testing.assert_allclose(se, draws.std(0, ddof=1) / np.sqrt(r), rtol=1e-12)
    var, var_se = variance_and_se(draws)
    np.testing.assert_allclose(var, draws.var(0, ddof=1), rtol=1e-12)
    total, total_se = total_variance_and_se(draws)
    np.testing.assert_allclose(total, np.trace(np.cov(draws, rowvar=False)), rtol=1e-12)
    # and they estimate the known moments within K_SE of their own standard errors
    assert np.all(np.abs(mean - mu) <= K_SE * se)
    assert np.all(np.abs(var - sd**2) <= K_SE * var_se)
    assert abs(total - np.sum(sd**2)) <= K_SE * total_se
    # Gaussian draws: se(s^2) ~ s^2 sqrt(2 / R)
    np.testing.assert_allclose(var_se, var * np.sqrt(2 / r), rtol=0.2)


def test_variance_standard_errors_are_calibrated():
    """Across 2000 independent experiments the spread of the variance estimates matches the
    standard error each experiment reports (to 10%), for one element and for the trace."""
    rng = np.random.default_rng(1)
    draws = rng.normal(0.0, [2.0, 1.0], size=(2000, 50, 2))
    var_estimates, var_ses, totals, total_ses = [], [], [], []
    for experiment in draws:
        v, s = variance_and_se(experiment[:, 0])
        var_estimates.append(v)
        var_ses.append(s)
        t, ts = total_variance_and_se(experiment)
        totals.append(t)
        total_ses.append(ts)
    assert np.std(var_estimates) == pytest.approx(np.mean(var_ses), rel=0.1)
    assert np.std(totals) == pytest.approx(np.mean(total_ses), rel=0.1)
    assert np.mean(var_estimates) == pytest.approx(4.0, rel=0.02)  # unbiased (ddof=1)
    assert np.mean(totals) == pytest.approx(5.0, rel=0.02)


def test_signal_to_noise_and_efficiency_edge_cases():
    snr = signal_to_noise(np.array([-2.0, 1.0, 0.0, 0.0]), np.array([4.0, 0.0, 0.0, 1.0]))
    assert snr[0] == pytest.approx(1.0)
    assert snr[1] == math.inf and math.isnan(snr[2]) and snr[3] == 0.0
    assert efficiency(2.0, 0.5) == pytest.approx(1.0)
    assert efficiency(0.0, 0.5) == math.inf


def test_parameter_statistics_bias_against_a_reference():
    rng = np.random.default_rng(2)
    r, true_bias = 500, np.array([[0.0, 0.3], [0.0, -0.2]])
    reference = np.array([[1.0, 2.0], [3.0, 4.0]])
    reference_se = np.full((2, 2), 0.01)
    draws = reference + true_bias + rng.standard_normal((r, 2, 2))
    rec = parameter_statistics("w", draws, reference, reference_se)
    assert rec.shape == (2, 2)
    flat = draws.reshape(r, -1)
    np.testing.assert_allclose(rec.bias, flat.mean(0) - reference.ravel(), rtol=1e-12)
    np.testing.assert_allclose(
        rec.bias_se, np.sqrt(flat.var(0, ddof=1) / r + 0.01**2), rtol=1e-12
    )
    z = np.abs(rec.bias - true_bias.ravel()) / rec.bias_se
    assert np.all(z <= K_SE)
    assert abs(rec.bias[1]) / rec.bias_se[1] > K_SE  # a real bias of 0.3 is detected


def test_standardized_bias_leaves_out_elements_a_stochastic_estimator_never_varied():
    """Element 2 took one value in every draw but sits 0.5 from the reference: its SE of 0 is
    no evidence, so it is counted, not standardized; a deterministic estimator keeps it."""
    bias = np.array([0.1, -0.2, 0.5, 0.0])
    bias_se = np.array([0.1, 0.1, 0.0, 0.0])
    var = np.array([1.0, 1.0, 0.0, 0.0])  # element 3: no variation and no bias: assessable
    z, unassessed = standardized_bias(bias, bias_se, var, 1e-12, stochastic=True)
    assert (z, unassessed) == (pytest.approx(2.0), 1)
    z, unassessed = standardized_bias(bias, bias_se, var, 1e-12, stochastic=False)
    assert unassessed == 0 and z > 1e10  # exactness claimed, and refuted by element 2


# ---------------------------------------------------------------------------- the bias threshold
def test_bias_threshold_holds_for_gaussian_draws_at_small_r():
    """4000 experiments of R = 10 Gaussian draws of 14 unbiased elements: the largest |mean| / SE
    exceeds the stated 99% threshold in 1% of them (within K_SE binomial SEs); the normal
    quantile the table used to print (3.38) is exceeded several times as often."""
    rng = np.random.default_rng(3)
    experiments, r, p = 4000, 10, 14
    draws = rng.standard_normal((experiments, r, p)) * rng.uniform(0.1, 10.0, p)
    z = np.abs(draws.mean(1)) / (draws.std(1, ddof=1) / math.sqrt(r))
    worst = z.max(1)
    threshold = max_z_threshold(p, r)
    rate = np.mean(worst > threshold)
    se = math.sqrt(0.01 * 0.99 / experiments)
    assert abs(rate - 0.01) <= K_SE * se
    normal_quantile = 3.38  # Phi^-1(1 - (1 - 0.99^(1/14)) / 2), the large-R limit
    assert np.mean(worst > normal_quantile) > 0.01 + 10 * se
    # the threshold tends to the normal (Sidak) quantile as R grows: computed here from the
    # standard library's normal distribution, independently of scipy
    from statistics import NormalDist

    sidak = NormalDist().inv_cdf(1 - (1 - 0.99 ** (1 / 2)) / 2)
    assert max_z_threshold(2, 10**7) == pytest.approx(sidak, rel=1e-5)
    assert max_z_threshold(14, 10) > max_z_threshold(14, 100) > max_z_threshold(14, 10**7)


def test_skewness_and_cochrans_rule():
    """Exponential draws have skewness 2 (Cochran: R > 25 * 4 = 100); Gaussian draws 0."""
    rng = np.random.default_rng(4)
    exponential = rng.exponential(size=(200_000, 1))
    gaussian = rng.standard_normal((200_000, 1))
    assert skewness(exponential)[0] == pytest.approx(2.0, rel=0.05)
    assert abs(skewness(gaussian)[0]) < 0.05
    assert repeats_for_normal_mean(exponential) == pytest.approx(100, rel=0.1)
    assert repeats_for_normal_mean(gaussian) <= 1
    constant = np.ones((50, 3))
    assert np.isnan(skewness(constant)).all() and repeats_for_normal_mean(constant) == 0
    # the largest element decides
    both = np.concatenate([gaussian[:1000], exponential[:1000]], axis=1)
    assert repeats_for_normal_mean(both) > 50
