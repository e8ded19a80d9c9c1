"""Pareto-smoothed importance sampling (PSIS) of a guide against its model: "did it work?".

* :func:`psis_diagnostics` -- draw from the guide and run PSIS; :func:`psis_from_inference_data`
  -- the same on existing draws; :class:`PSISResult`; :func:`khat_verdict` and the thresholds
  :data:`GOOD_KHAT`, :data:`OK_KHAT`; :data:`MIN_PSIS_SAMPLES`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .._extras import require
from .inference_data import to_inference_data

az = require("arviz", "diagnostics")
xr = require("xarray", "diagnostics")

#: the thresholds of Yao et al. (2018) on k-hat: below GOOD_KHAT the importance-sampling
#: estimates are reliable and q is close to the posterior; below OK_KHAT they are usable
#: (with more draws); above it the variational approximation is not trustworthy.
GOOD_KHAT = 0.5
OK_KHAT = 0.7

#: the fewest draws with which k-hat can be fitted: the generalized Pareto is fitted to the
#: largest min(S / 5, 3 sqrt(S)) weights, and needs at least 5 of them (S = 21); a few hundred
#: draws make the estimate meaningful
MIN_PSIS_SAMPLES = 21


def khat_verdict(khat: float) -> str:
    """``"good"`` for k < 0.5, ``"ok"`` for k < 0.7, ``"unreliable"`` otherwise (also NaN)."""
    if khat < GOOD_KHAT:
        return "good"
    if khat < OK_KHAT:
        return "ok"
    return "unreliable"


@dataclass(frozen=True)
class PSISResult:
    r"""Pareto-smoothed importance sampling of a guide q against the model's posterior.

    Attributes
    ----------
    khat : float
        Estimated shape of the generalized Pareto fitted to the largest importance weights
        :math:`w_s = p(X, Z_s) / q(Z_s)`, :math:`Z_s \sim q`. ``-inf`` when the log weights are
        equal up to rounding (q equals the posterior up to a constant: bounded weights have
        k < 0).
    verdict : str
        ``"good"`` (k < 0.5), ``"ok"`` (0.5 <= k < 0.7) or ``"unreliable"`` (k >= 0.7).
    ess : float
        Importance-sampling effective sample size of the smoothed, normalized weights,
        :math:`1 / \sum_s \tilde w_s^2`.
    num_samples : int
    log_weights : ndarray, shape (num_samples,)
        The Pareto-smoothed, normalized log weights :math:`\log \tilde w_s`.
    guide_means : xarray.Dataset
        Plain means of the guide draws, :math:`\frac1S \sum_s Z_s`, per latent and
        deterministic site.
    corrected_means : xarray.Dataset
        PSIS-corrected posterior means :math:`\sum_s \tilde w_s Z_s` (self-normalized).
    khat_loo : xarray.Dataset
        Per observation (each element of an observed site's plates): the k-hat of the
        leave-one-out weights :math:`p(X, Z_s) / (q(Z_s)\, p(x_i \mid Z_s))`, which take q to
        :math:`p(Z \mid X_{-i})`. Large values flag influential observations, or a q too
        poor for LOO (Magnusson, Andersen, Jonasson & Vehtari 2019, arXiv:1904.10679).
        Not ``az.loo``'s k-hats: those take the draws to come from the posterior (see
        :func:`psis_diagnostics`).
    elpd_loo : xarray.Dataset
        Per observation: the PSIS-LOO estimate of :math:`\log p(x_i \mid X_{-i})` from the
        guide's draws, :math:`\log \sum_s \tilde w_{is}\, p(x_i \mid Z_s)` with the smoothed,
        normalized leave-one-out weights above; its sum over the observations is what
        ``az.loo`` reports as ``elpd_loo`` for posterior draws.  Trustworthy where
        ``khat_loo`` is below 0.7.
    elbo : float
        The mean log weight, a Monte Carlo estimate of L.
    """

    khat: float
    verdict: str
    ess: float
    num_samples: int
    log_weights: np.ndarray
    guide_means: xr.Dataset
    corrected_means: xr.Dataset
    khat_loo: xr.Dataset
    elpd_loo: xr.Dataset
    elbo: float

    def __str__(self) -> str:
        lines = [
            f"PSIS k-hat = {self.khat:.3f} ({self.verdict}); ESS = {self.ess:.1f} of "
            f"{self.num_samples}; ELBO ~ {self.elbo:.6g}",
            "  site: guide mean -> PSIS-corrected mean",
        ]
        for name in self.guide_means.data_vars:
            guide = np.asarray(self.guide_means[name].values)
            corrected = np.asarray(self.corrected_means[name].values)
            lines.append(f"  {name}: {np.array2string(guide, precision=4)} -> "
                         f"{np.array2string(corrected, precision=4)}")
        for name in self.khat_loo.data_vars:
            k = np.asarray(self.khat_loo[name].values)
            elpd = np.asarray(self.elpd_loo[name].values).reshape(-1)
            se = math.sqrt(elpd.size * np.var(elpd)) if elpd.size > 1 else math.nan
            lines.append(f"  LOO of '{name}' (guide draws, weighted for q): elpd_loo "
                         f"{elpd.sum():.2f} (SE {se:.2f}); k-hat max {np.max(k):.3f}, "
                         f"{int(np.sum(k >= OK_KHAT))} of {k.size} >= {OK_KHAT}")
        return "\n".join(lines)


def _constant(log_weights: np.ndarray, lp: np.ndarray) -> bool:
    """Log weights equal up to floating-point rounding of log p and log q."""
    eps = np.finfo(lp.dtype if np.issubdtype(lp.dtype, np.floating) else np.float64).eps
    tol = 1e3 * eps * (1.0 + float(np.max(np.abs(lp))))
    return float(np.ptp(log_weights)) <= tol


def _psis(log_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``az.psislw`` over the last axis with r_eff = 1 (independent draws), quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return az.psislw(log_weights, reff=1.0)


def _check_num_samples(num_samples) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) \
            or num_samples < MIN_PSIS_SAMPLES:
        raise ValueError(
            f"PSIS needs num_samples >= {MIN_PSIS_SAMPLES} draws from the guide (k-hat is fitted "
            f"to the largest min(S/5, 3 sqrt(S)) importance weights and needs 5 of them; a few "
            f"hundred make it meaningful), got {num_samples!r}"
        )


def psis_from_inference_data(idata: az.InferenceData) -> PSISResult:
    """PSIS diagnostics of an :class:`~arviz.InferenceData` made by :func:`to_inference_data`.

    See :func:`psis_diagnostics` for the method; this entry point reuses existing draws.

    Raises
    ------
    ValueError
        When ``idata`` lacks ``sample_stats.log_weight`` (not made by ``to_inference_data``),
        has fewer than :data:`MIN_PSIS_SAMPLES` draws, or the guide is a point mass (e.g.
        ``AutoDelta``), which has no density to weigh.
    """
    if "sample_stats" not in idata.groups() or "log_weight" not in idata.sample_stats:
        raise ValueError(
            "idata has no sample_stats.log_weight; build it with "
            "pyro_elbo_ext.diagnostics.to_inference_data"
        )
    if idata.attrs.get("point_mass_guide", 0):
        raise ValueError(
            f"the guide '{idata.attrs.get('guide')}' is a point mass (e.g. AutoDelta): q(Z) has "
            "no density, so the importance weights p(X, Z) / q(Z) and PSIS are undefined; use "
            "a guide with a density (AutoNormal, AutoMultivariateNormal, ...)"
        )
    stats = idata.sample_stats
    log_weight = np.asarray(stats["log_weight"].values, dtype=np.float64).reshape(-1)
    lp = np.asarray(stats["lp"].values).reshape(-1)
    num_samples = log_weight.size
    _check_num_samples(num_samples)
    if _constant(log_weight, lp):
        khat = -math.inf
        smoothed = np.full(num_samples, -math.log(num_samples))
    else:
        smoothed, khat = _psis(log_weight)
        khat = float(khat)
    weights = np.exp(smoothed - np.logaddexp.reduce(smoothed))
    ess = float(1.0 / np.sum(weights**2))
    w = xr.DataArray(weights.reshape(stats["log_weight"].shape), dims=("chain", "draw"))
    posterior = idata.posterior
    guide_means = posterior.mean(("chain", "draw"))
    corrected_means = (posterior * w).sum(("chain", "draw"))

    khat_loo, elpd_loo = {}, {}
    if "log_likelihood" in idata.groups():
        for name, loglik in idata.log_likelihood.data_vars.items():
            obs_dims = [d for d in loglik.dims if d not in ("chain", "draw")]
            values = np.asarray(loglik.transpose("chain", "draw", *obs_dims).values, np.float64)
            values = np.moveaxis(values.reshape((num_samples, *values.shape[2:])), 0, -1)
            # w_is = p(X, Z_s) / (q(Z_s) p(x_i | Z_s)), proportional to p(Z_s | X_-i) / q(Z_s)
            smoothed_loo, k = _psis(log_weight - values)
            coords = {d: loglik[d] for d in obs_dims}
            khat_loo[name] = xr.DataArray(np.asarray(k), dims=obs_dims, coords=coords)
            elpd = np.logaddexp.reduce(smoothed_loo + values, axis=-1)
            elpd_loo[name] = xr.DataArray(elpd, dims=obs_dims, coords=coords)
    return PSISResult(
        khat=khat,
        verdict=khat_verdict(khat),
        ess=ess,
        num_samples=num_samples,
        log_weights=smoothed,
        guide_means=guide_means,
        corrected_means=corrected_means,
        khat_loo=xr.Dataset(khat_loo),
        elpd_loo=xr.Dataset(elpd_loo),
        elbo=float(np.mean(log_weight)),
    )


def psis_diagnostics(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> PSISResult:
    r"""Pareto-smoothed importance sampling of a fitted guide against the model.

    Draw :math:`Z_1, \dots, Z_S \sim q(Z)` and form the importance ratios

    .. math::

        \log w_s = \log p(X, Z_s) - \log q(Z_s),

    whose normalized version turns q into the posterior :math:`p(Z \mid X)`. Fitting a
    generalized Pareto distribution to the largest :math:`M = \min(S/5, 3\sqrt S)` ratios
    (``arviz.psislw``, with relative efficiency 1 since the draws are independent) gives the
    shape estimate :math:`\hat k`, which measures how heavy the ratios' right tail is, i.e. how
    much q under-covers the posterior. Yao, Vehtari, Simpson & Gelman (2018) read it as

    * :math:`\hat k < 0.5`: q is close to the posterior and importance-sampling estimates are
      reliable (the variance of the ratios is finite);
    * :math:`0.5 \le \hat k < 0.7`: usable, converging slowly ("ok");
    * :math:`\hat k \ge 0.7`: the approximation (and the corrected estimates) are
      unreliable.

    The smoothed, self-normalized weights :math:`\tilde w_s` give PSIS-corrected posterior
    means :math:`\sum_s \tilde w_s Z_s` and an effective sample size
    :math:`1 / \sum_s \tilde w_s^2`.

    Per observation group: for each element i of an observed site's plates the result also
    holds the k-hat of the leave-one-out ratios
    :math:`p(X, Z_s) / (q(Z_s)\, p(x_i \mid Z_s)) \propto p(Z_s \mid X_{-i}) / q(Z_s)`
    (PSIS-LOO with draws from q rather than the posterior, Magnusson et al. 2019), and the
    LOO estimate :math:`\log \sum_s \tilde w_{is}\, p(x_i \mid Z_s)` of
    :math:`\log p(x_i \mid X_{-i})` (``elpd_loo``). We chose this over per-plate k-hats of the
    joint ratio because the joint ratio does not factorize over the plate when there are global
    latents, whereas the LOO ratios are well defined for every model.

    ``az.loo(idata)`` on the same draws answers another question: it takes them to come from
    the posterior and weighs them by :math:`1 / p(x_i \mid Z_s)` alone, which is
    :math:`p(Z_s \mid X_{-i}) / p(Z_s \mid X)` only when they do. On guide draws its k-hats
    and its ``elpd_loo`` describe neither q nor the posterior (they may call an unreliable
    guide good, or the reverse); ``khat_loo`` and ``elpd_loo`` here are its counterparts for
    draws from q, and ``az.loo`` is for posterior draws (NUTS: ``az.from_pyro(mcmc)``).

    Parameters
    ----------
    model, guide : callable
        The model and the fitted guide; the guide must have a density (not ``AutoDelta``).
    *args, **kwargs
        Their inputs.
    num_samples : int
        Number of draws S (>= 21, :data:`MIN_PSIS_SAMPLES`; k-hat needs a few hundred to be
        meaningful).
    max_plate_nesting : int, optional
        Passed to :func:`to_inference_data`.

    Returns
    -------
    PSISResult

    Raises
    ------
    ValueError
        ``num_samples`` < :data:`MIN_PSIS_SAMPLES` (21), a point-mass guide, and the input
        errors of :func:`to_inference_data`.
    SamplingError
        The guide cannot be run with the given inputs.

    References
    ----------
    Yao, Vehtari, Simpson & Gelman (2018), "Yes, but did it work?: Evaluating variational
    inference", ICML, arXiv:1802.02538.
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed importance sampling",
    JMLR 25(72), arXiv:1507.02646.
    Magnusson, Andersen, Jonasson & Vehtari (2019), "Bayesian leave-one-out cross-validation
    for large data", ICML, arXiv:1904.10679.

    Examples
    --------
    >>> result = psis_diagnostics(model, guide, data, num_samples=2000)   # doctest: +SKIP
    >>> result.khat, result.verdict                                     # doctest: +SKIP
    """
    _check_num_samples(num_samples)
    idata = to_inference_data(
        model, guide, *args, num_samples=num_samples, max_plate_nesting=max_plate_nesting,
        **kwargs,
    )
    return psis_from_inference_data(idata)
