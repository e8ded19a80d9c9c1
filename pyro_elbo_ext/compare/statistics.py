r"""Gradient statistics of ELBO estimators over R repeated evaluations.

For an estimator evaluated R times at fixed parameters, with draws :math:`\hat L_r` of L and
:math:`\hat g_r` of :math:`\nabla L` (wrt the unconstrained parameter leaves), this module
reports, per parameter element,

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

Repetition r of every estimator runs under the seed ``seed + r`` (common random numbers): the
estimators that sample the guide the same way see the same draws, so their differences are
measured with less noise.  The reference gradient is the exact dL when the problem provides a
closed-form L (:meth:`Problem.exact_elbo_and_grad`), otherwise a many-sample estimate from an
unbiased estimator drawn under independent seeds; the records say which.

References
----------
Mohamed, Rosca, Figurnov & Mnih (2020), "Monte Carlo gradient estimation in machine learning",
JMLR 21(132), arXiv:1906.10652.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro.util import get_rng_state, set_rng_state
from tqdm import tqdm  # the plain bar: no ipywidgets needed in notebooks

from ..problems import Problem
from .estimators import EstimatorSpec, applicable_estimators, get_estimator
from .records import Comparison, EstimatorRecord, ParameterRecord, ReferenceGradient

#: seed offset of the reference estimator's draws (independent of the compared draws)
REFERENCE_SEED_OFFSET = 1_000_003

#: unbiased estimators tried, in order, for a many-sample reference gradient
REFERENCE_PREFERENCE = ("hard_attention_enum", "jensen_analytic", "trace_elbo",
                        "hard_attention_reinforce_ma")


# ---------------------------------------------------------------------------- pure statistics
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


# ---------------------------------------------------------------------------- draws
@dataclass(frozen=True, eq=False)
class Draws:
    """R evaluations of one estimator: L estimates, dL estimates and wall times."""

    estimator: str
    values: np.ndarray  # (R,)
    grads: dict[str, np.ndarray]  # name -> (R, *shape)
    seconds: np.ndarray  # (R,)
    num_particles: int
    eps: float = float(np.finfo(np.float64).eps)  # machine epsilon of the parameters' dtype


def resolve_params(problem: Problem, at: str | dict) -> tuple[str, dict | None]:
    """``("init", None)``, ``("posterior", posterior_params)`` or ``("custom", values)``."""
    if isinstance(at, dict):
        return "custom", at
    if at == "init":
        return "init", None
    if at == "posterior":
        if problem.posterior_params is None:
            raise ValueError(
                f"problem {problem.name!r} has no closed-form posterior; use at='init'"
            )
        return "posterior", problem.posterior_params
    raise ValueError(f"at must be 'init', 'posterior' or a dict of values, got {at!r}")


def draw_estimates(
    problem: Problem,
    estimator: str | EstimatorSpec,
    num_repeats: int,
    seed: int = 0,
    num_particles: int = 1,
    params: dict | None = None,
    warmup: int = 1,
) -> Draws:
    """Evaluate ``estimator`` R times at ``params`` (default ``init_params``).

    Repetition r runs ``loss_and_grads`` under ``pyro.set_rng_seed(seed + r)`` with the
    parameters' gradients cleared before it; the draw of dL is minus the accumulated gradient of
    each unconstrained leaf.  ``warmup`` unrecorded evaluations come first (plans, caches).
    """
    spec = get_estimator(estimator) if isinstance(estimator, str) else estimator
    if num_repeats < 3:
        raise ValueError(f"num_repeats must be at least 3, got {num_repeats}")
    loss, model, guide = spec.build(problem, num_particles)
    problem.set_params(params)
    leaves = problem.unconstrained_params()
    values = np.empty(num_repeats)
    seconds = np.empty(num_repeats)
    grads = {n: np.empty((num_repeats, *leaf.shape)) for n, leaf in leaves.items()}
    for r in range(-warmup, num_repeats):
        pyro.set_rng_seed(seed + (r if r >= 0 else num_repeats - r))
        for leaf in leaves.values():
            leaf.grad = None
        start = time.perf_counter()
        value = loss.loss_and_grads(model, guide, *problem.args, **problem.kwargs)
        elapsed = time.perf_counter() - start
        if r < 0:
            continue
        values[r], seconds[r] = -float(value), elapsed
        for name, leaf in leaves.items():
            grads[name][r] = 0.0 if leaf.grad is None else -leaf.grad.detach().cpu().numpy()
    for leaf in leaves.values():
        leaf.grad = None
    eps = max((torch.finfo(leaf.dtype).eps for leaf in leaves.values()
               if leaf.dtype.is_floating_point), default=float(np.finfo(np.float64).eps))
    return Draws(spec.name, values, grads, seconds, num_particles, float(eps))


def reference_gradient(
    problem: Problem,
    params: dict | None = None,
    estimator: str = "auto",
    num_repeats: int = 2000,
    seed: int = 0,
) -> ReferenceGradient:
    """The gradient biases are measured against, at ``params``.

    The exact dL when the problem has a closed-form L; otherwise the mean of ``num_repeats``
    draws of an unbiased estimator (``estimator``, or with ``"auto"`` the first of
    :data:`REFERENCE_PREFERENCE` that applies) under seeds independent of the compared draws,
    with its standard error.  ``estimator="none"`` gives no reference.
    """
    if estimator == "none":
        return ReferenceGradient("none", "none")
    if problem.exact_elbo is not None and estimator == "auto":
        problem.set_params(params)
        elbo, grads = problem.exact_elbo_and_grad()
        arrays = {n: g.detach().cpu().numpy().astype(np.float64) for n, g in grads.items()}
        return ReferenceGradient("exact", "exact", arrays,
                                 {n: np.zeros_like(a) for n, a in arrays.items()}, elbo)
    if estimator == "auto":
        candidates = [n for n in REFERENCE_PREFERENCE if n in _registered()]
        usable = applicable_estimators(problem, candidates)
        if not usable:
            return ReferenceGradient("none", "none")
        estimator = usable[0]
    draws = draw_estimates(problem, estimator, num_repeats, seed + REFERENCE_SEED_OFFSET,
                           params=params)
    means, ses = {}, {}
    for name, g in draws.grads.items():
        m, s = mean_and_se(g)
        means[name], ses[name] = m, s
    return ReferenceGradient("estimate", f"estimate: {estimator} x {num_repeats}", means, ses,
                             float(draws.values.mean()))


def _registered() -> Sequence[str]:
    from .estimators import ESTIMATORS

    return list(ESTIMATORS)


def summarize(
    problem: Problem,
    spec: EstimatorSpec,
    draws: Draws,
    reference: ReferenceGradient,
    at: str,
    seed: int,
) -> EstimatorRecord:
    """Turn one estimator's draws into its :class:`EstimatorRecord`."""
    params = tuple(
        parameter_statistics(
            name, g,
            reference.grads.get(name) if reference.kind != "none" else None,
            reference.se.get(name) if reference.kind != "none" else None,
        )
        for name, g in draws.grads.items()
    )
    elbo_mean, elbo_se = mean_and_se(draws.values)
    total_var, total_var_se = total_variance_and_se(
        np.concatenate([g.reshape(g.shape[0], -1) for g in draws.grads.values()], axis=1)
    )
    snr = np.concatenate([p.snr for p in params])
    snr = snr[~np.isnan(snr)]
    bias_norm = bias_max_z = None
    bias_unassessed = 0
    if reference.kind != "none":
        bias = np.concatenate([p.bias for p in params])
        bias_se = np.concatenate([p.bias_se for p in params])
        bias_norm = float(np.linalg.norm(bias))
        ref_grad = np.concatenate([p.reference for p in params])
        mean = np.concatenate([p.grad_mean for p in params])
        bias_max_z, bias_unassessed = standardized_bias(
            bias, bias_se, np.concatenate([p.grad_var for p in params]),
            rounding_floor(draws.eps, ref_grad, mean), stochastic=total_var > 0)
    exact = None
    if problem.exact_elbo is not None and reference.kind == "exact":
        exact = reference.elbo
    seconds = float(draws.seconds.mean())
    return EstimatorRecord(
        problem=problem.name,
        estimator=spec.name,
        description=spec.description,
        family=spec.family,
        objective=spec.objective,
        at=at,
        num_repeats=int(draws.values.shape[0]),
        num_particles=draws.num_particles,
        seed=seed,
        elbo_mean=float(elbo_mean),
        elbo_se=float(elbo_se),
        exact_elbo=exact,
        log_evidence=problem.log_evidence,
        grad_var_total=total_var,
        grad_var_total_se=total_var_se,
        snr_median=float(np.median(snr)) if snr.size else math.nan,
        bias_norm=bias_norm,
        bias_max_z=bias_max_z,
        bias_unassessed=bias_unassessed,
        reference=reference.label,
        time_per_eval_s=seconds,
        efficiency=efficiency(total_var, seconds),
        params=params,
    )


def compare_estimators(
    problem: Problem,
    estimators: Iterable[str] | None = None,
    num_repeats: int = 200,
    num_particles: int = 1,
    seed: int = 0,
    at: str | dict = "init",
    reference: str = "auto",
    reference_repeats: int = 2000,
    progress: bool | None = None,
) -> Comparison:
    """Measure the named estimators on ``problem`` over ``num_repeats`` evaluations each.

    Parameters
    ----------
    problem : Problem
    estimators : iterable of str, optional
        Registry names; default every estimator that applies to the problem.  A named
        estimator that does not apply raises :class:`IncompatibleEstimatorError`.
    num_repeats : int
        R, the number of evaluations per estimator (>= 3).
    num_particles : int
        Particles per evaluation.
    seed : int
        Repetition r uses seed ``seed + r`` for every estimator (common random numbers).
    at : {"init", "posterior"} or dict
        The parameter values: the problem's start, its exact posterior, or given values.
    reference : str
        ``"auto"`` (exact when available, else a many-sample estimate), an estimator name for
        the estimate, or ``"none"``.
    reference_repeats : int
        Draws of the reference estimate when it is not exact.
    progress : bool or None
        Show a tqdm bar (None: only on a terminal, and only after 2 s).

    Returns
    -------
    Comparison
        Its ``summary()`` is the table; ``tidy()`` the per-element statistics.
    """
    at_label, params = resolve_params(problem, at)
    names = applicable_estimators(problem) if estimators is None else list(estimators)
    specs = [get_estimator(n) for n in names]
    for spec in specs:  # fail before any work on an incompatible pair
        spec.build(problem, num_particles)
    store = pyro.get_param_store()
    saved, rng = store.get_state(), get_rng_state()
    try:
        ref = reference_gradient(problem, params, reference, reference_repeats, seed)
        records = []
        bar = tqdm(specs, desc=f"compare {problem.name}", unit="estimator",
                   disable=_disable(progress), delay=0 if progress else 2.0, leave=False)
        for spec in bar:
            bar.set_postfix_str(spec.name)
            draws = draw_estimates(problem, spec, num_repeats, seed, num_particles, params)
            records.append(summarize(problem, spec, draws, ref, at_label, seed))
    finally:
        store.set_state(saved)
        set_rng_state(rng)
    return Comparison(problem.name, at_label, ref, tuple(records))


def _disable(progress: bool | None) -> bool | None:
    """tqdm's ``disable``: False to force a bar, True for none, None for terminals only."""
    return None if progress is None else not progress


__all__ = [
    "Draws",
    "compare_estimators",
    "draw_estimates",
    "efficiency",
    "max_abs_z",
    "mean_and_se",
    "parameter_statistics",
    "reference_gradient",
    "resolve_params",
    "rounding_floor",
    "signal_to_noise",
    "summarize",
    "total_variance_and_se",
    "variance_and_se",
]
