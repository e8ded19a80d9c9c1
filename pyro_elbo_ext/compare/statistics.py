r"""Pure statistics of repeated gradient draws: moments, their standard errors, standardized bias.

Nothing here runs a model; every function takes arrays of draws (R repetitions along axis 0).

* :func:`mean_and_se`, :func:`variance_and_se`, :func:`total_variance_and_se` -- moments and
  their standard errors;
* :func:`signal_to_noise`, :func:`efficiency` -- ``|mean| / sd`` and ``1 / (variance x seconds)``;
* :func:`parameter_statistics` -- one parameter's :class:`~.records.ParameterRecord`;
* :func:`max_abs_z`, :func:`standardized_bias`, :func:`rounding_floor` -- the worst
  standardized bias and the rounding allowance it uses;
* :func:`max_z_threshold` -- what the worst standardized bias of an unbiased estimator stays
  below, at a given R and number of elements;
* :func:`skewness`, :func:`repeats_for_normal_mean` -- whether R is large enough for that
  threshold to hold (Cochran's rule).

For an estimator evaluated R times, with draws :math:`\hat g_r` of :math:`\nabla L`, per element

.. math::

    \bar g = \frac1R \sum_r \hat g_r, \qquad
    s^2 = \frac{1}{R-1} \sum_r (\hat g_r - \bar g)^2, \qquad
    \mathrm{SNR} = |\bar g| / s,

the bias :math:`\bar g - g_{\mathrm{ref}}` with standard error
:math:`\sqrt{s^2/R + \mathrm{se}_{\mathrm{ref}}^2}`, and over all elements the total variance
:math:`V = \operatorname{tr}\operatorname{Cov}[\hat g] = \frac{1}{R-1}\sum_r d_r`,
:math:`d_r = \lVert \hat g_r - \bar g\rVert^2`, with standard error
:math:`\mathrm{sd}(d)\sqrt{R}/(R-1)` (the delta method; for Gaussian draws of one element this is
:math:`s^2\sqrt{2/R}`, the textbook :math:`\mathrm{se}(s^2)`).  Efficiency is
:math:`1/(V\,t)` with t the mean wall time of one evaluation: the inverse of the variance left
after averaging for one second (Glynn & Whitt 1992, "The asymptotic efficiency of simulation
estimators", Oper. Res. 40(3)).

References
----------
Mohamed, Rosca, Figurnov & Mnih (2020), "Monte Carlo gradient estimation in machine learning",
JMLR 21(132), arXiv:1906.10652.
Šidák (1967), "Rectangular confidence regions for the means of multivariate normal
distributions", JASA 62(318).
Cochran (1977), *Sampling Techniques*, 3rd ed., section 2.15 (the rule R > 25 g1²).
"""

from __future__ import annotations

import math

import numpy as np

from .._extras import require
from .records import ParameterRecord

_stats = require("scipy.stats", "compare", "the Student-t quantiles of the bias threshold")

#: the multiplier of Cochran's rule: the mean of R draws is near normal when R > 25 g1^2
COCHRAN_FACTOR = 25.0


def mean_and_se(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sample mean along axis 0 and its standard error ``sd / sqrt(R)`` (sd with ddof=1)."""
    draws = np.asarray(draws, dtype=np.float64)
    r = draws.shape[0]
    if r < 2:
        raise ValueError(f"need at least 2 draws for a standard error, got {r}")
    return draws.mean(0), draws.std(0, ddof=1) / math.sqrt(r)


def variance_and_se(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unbiased sample variance along axis 0 and its standard error.

    ``var = sum_r (x_r - mean)^2 / (R - 1)``; ``se = sd(d) sqrt(R) / (R - 1)`` with
    ``d_r = (x_r - mean)^2`` (delta method; ``s^2 sqrt(2/R)`` for Gaussian draws).
    """
    draws = np.asarray(draws, dtype=np.float64)
    r = draws.shape[0]
    if r < 3:
        raise ValueError(f"need at least 3 draws for a variance and its error, got {r}")
    d = (draws - draws.mean(0)) ** 2
    return d.sum(0) / (r - 1), d.std(0, ddof=1) * math.sqrt(r) / (r - 1)


def total_variance_and_se(draws: np.ndarray) -> tuple[float, float]:
    """Trace of the covariance of vector draws ``(R, P)`` and its standard error.

    ``V = sum_r ||x_r - mean||^2 / (R - 1)`` (the sum of the P element variances);
    ``se = sd(d) sqrt(R) / (R - 1)`` with ``d_r = ||x_r - mean||^2``.
    """
    draws = np.asarray(draws, dtype=np.float64).reshape(np.shape(draws)[0], -1)
    r = draws.shape[0]
    if r < 3:
        raise ValueError(f"need at least 3 draws for a variance and its error, got {r}")
    d = ((draws - draws.mean(0)) ** 2).sum(1)
    return float(d.sum() / (r - 1)), float(d.std(ddof=1) * math.sqrt(r) / (r - 1))


def signal_to_noise(mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``|mean| / sqrt(var)`` elementwise; ``inf`` where ``var = 0 < |mean|``, ``nan`` at 0/0."""
    mean, var = np.abs(np.asarray(mean, float)), np.asarray(var, float)
    sd = np.sqrt(np.maximum(var, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sd > 0, mean / np.where(sd > 0, sd, 1.0),
                        np.where(mean > 0, np.inf, np.nan))


def efficiency(total_variance: float, seconds: float) -> float:
    """``1 / (total_variance * seconds)``; ``inf`` for a zero-variance estimator."""
    product = total_variance * seconds
    return math.inf if product <= 0 else 1.0 / product


def parameter_statistics(
    name: str,
    draws: np.ndarray,
    reference: np.ndarray | None = None,
    reference_se: np.ndarray | None = None,
) -> ParameterRecord:
    """Statistics of one parameter's gradient draws ``(R, *shape)`` against a reference.

    Parameters
    ----------
    name : str
    draws : ndarray, shape ``(R, *shape)``
    reference, reference_se : ndarray of ``shape``, optional
        The reference gradient and its standard error (zero or None for an exact one).
    """
    draws = np.asarray(draws, dtype=np.float64)
    shape = tuple(draws.shape[1:])
    flat = draws.reshape(draws.shape[0], -1)
    mean, se = mean_and_se(flat)
    var, var_se = variance_and_se(flat)
    bias = bias_se = ref = None
    if reference is not None:
        ref = np.asarray(reference, dtype=np.float64).reshape(-1)
        ref_se = (np.zeros_like(ref) if reference_se is None
                  else np.asarray(reference_se, dtype=np.float64).reshape(-1))
        bias = mean - ref
        bias_se = np.sqrt(se**2 + ref_se**2)
    return ParameterRecord(name, shape, mean, var, var_se, signal_to_noise(mean, var),
                           ref, bias, bias_se)


def max_abs_z(bias: np.ndarray, bias_se: np.ndarray, floor: np.ndarray | float = 0.0) -> float:
    """``max |bias| / (bias_se + floor)``: the worst standardized bias.

    ``floor`` is a floating-point rounding allowance (see :func:`rounding_floor`), so that a
    zero-variance, exactly unbiased estimator gives a small number rather than rounding / 0.
    """
    bias, bias_se = np.abs(np.asarray(bias, float)), np.asarray(bias_se, float)
    if bias.size == 0:
        return 0.0
    denom = bias_se + floor
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(denom > 0, bias / np.where(denom > 0, denom, 1.0),
                     np.where(bias > 0, np.inf, 0.0))
    return float(np.max(z))


def standardized_bias(
    bias: np.ndarray, bias_se: np.ndarray, var: np.ndarray, floor: np.ndarray | float,
    stochastic: bool,
) -> tuple[float, int]:
    """``(max |bias| / SE, unassessed)`` over a gradient's elements.

    An element of a *stochastic* estimator that took one value in every draw (sample variance
    exactly 0) while its bias exceeds the rounding ``floor`` cannot be standardized: whatever
    makes it vary (a ReLU unit active only for a rarely drawn glimpse, say) did not occur in the
    R draws, so its SE of 0 says nothing.  Such elements are left out of the maximum and
    counted (``unassessed``; more draws assess them).  For a deterministic estimator (all
    variances 0, e.g. enumeration) every element counts, against the rounding floor.
    """
    bias = np.asarray(bias, float)
    floor = np.broadcast_to(floor, bias.shape)
    keep = np.ones(bias.shape, bool)
    if stochastic:
        keep = ~((np.asarray(var, float) == 0) & (np.abs(bias) > floor))
    z = max_abs_z(bias[keep], np.asarray(bias_se, float)[keep], floor[keep])
    return z, int((~keep).sum())


def rounding_floor(eps: float, *magnitudes: np.ndarray) -> np.ndarray:
    """``64 eps (1 + sum |m|)``: the rounding allowance of a gradient computed in a dtype with
    machine epsilon ``eps`` (sums of tens of terms of the magnitudes given)."""
    total = 1.0
    for m in magnitudes:
        total = total + np.abs(np.asarray(m, float))
    return 64.0 * eps * total


def max_z_threshold(num_elements: int, num_repeats: int, level: float = 0.99) -> float:
    r"""The ``level`` quantile of ``max |bias| / SE`` over ``num_elements`` elements of an unbiased
    estimator drawn ``num_repeats`` times.

    With an exact reference and Gaussian draws, each element's :math:`\bar g / (s/\sqrt R)`
    follows Student's t with R - 1 degrees of freedom; the largest of P independent ``|t|`` stays
    below :math:`t_{R-1}^{-1}\bigl(1 - (1 - \ell^{1/P})/2\bigr)` with probability
    :math:`\ell` (Šidák; conservative for dependent elements).  An estimated reference adds
    its own, much smaller, error to the SE, which only raises the degrees of freedom: the
    threshold stays conservative.  At R = 10 and P = 14 it is 5.02, where the normal quantile
    (the large-R limit) would say 3.38.

    It assumes each element's mean is near normal, which skewed draws (score-function
    estimators, rare events) need many repetitions for: see :func:`repeats_for_normal_mean`.
    """
    if num_repeats < 2:
        raise ValueError(f"num_repeats must be at least 2, got {num_repeats}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = (1.0 - level ** (1.0 / max(int(num_elements), 1))) / 2.0
    return float(_stats.t.isf(tail, num_repeats - 1))


def skewness(draws: np.ndarray) -> np.ndarray:
    r"""Sample skewness :math:`g_1 = m_3 / m_2^{3/2}` of each element (axis 0 = draws);
    NaN where the draws do not vary."""
    flat = np.asarray(draws, dtype=np.float64).reshape(np.shape(draws)[0], -1)
    centred = flat - flat.mean(0)
    m2, m3 = (centred**2).mean(0), (centred**3).mean(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(m2 > 0, m3 / np.where(m2 > 0, m2, 1.0) ** 1.5, np.nan)


def repeats_for_normal_mean(draws: np.ndarray) -> int:
    r"""The number of draws Cochran's rule asks for before the mean of every element is near
    normal: :math:`\lceil 25 \max_i g_{1,i}^2 \rceil` over the elements that vary.

    When R is below it, :func:`max_z_threshold` does not hold: a skewed element's standardized
    mean has a heavy tail (the t statistic's first correction is of order :math:`g_1/\sqrt R`),
    and an unbiased estimator can exceed the threshold far more often than stated.  The sample
    skewness is itself noisy at small R, so read the number as an order of magnitude.  0 when
    no element varies.
    """
    g1 = skewness(draws)
    g1 = g1[np.isfinite(g1)]
    if not g1.size:
        return 0
    return int(math.ceil(COCHRAN_FACTOR * float(np.max(g1**2))))


__all__ = [
    "COCHRAN_FACTOR",
    "efficiency",
    "max_abs_z",
    "max_z_threshold",
    "mean_and_se",
    "parameter_statistics",
    "repeats_for_normal_mean",
    "rounding_floor",
    "signal_to_noise",
    "skewness",
    "standardized_bias",
    "total_variance_and_se",
    "variance_and_se",
]
