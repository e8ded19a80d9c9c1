"""Summaries: one estimator's draws against the reference, as an :class:`~.records.EstimatorRecord`.

* :func:`summarize` -- per-parameter statistics, the total variance, median SNR, worst
  standardized bias with its 99% threshold and Cochran's check of R, timing and efficiency.
"""

from __future__ import annotations

import math

import numpy as np

from ..problems import Problem
from .draws import Draws
from .estimators import EstimatorSpec
from .records import EstimatorRecord, ReferenceGradient
from .statistics import (
    efficiency,
    max_z_threshold,
    mean_and_se,
    parameter_statistics,
    repeats_for_normal_mean,
    rounding_floor,
    standardized_bias,
    total_variance_and_se,
)

#: the level of :attr:`EstimatorRecord.bias_z_threshold`
BIAS_Z_LEVEL = 0.99


def summarize(
    problem: Problem,
    spec: EstimatorSpec,
    draws: Draws,
    reference: ReferenceGradient,
    at: str,
    seed: int,
) -> EstimatorRecord:
    """Turn one estimator's draws into its :class:`EstimatorRecord`."""
    has_reference = reference.kind != "none"
    params = tuple(
        parameter_statistics(
            name, g,
            reference.grads.get(name) if has_reference else None,
            reference.se.get(name) if has_reference else None,
        )
        for name, g in draws.grads.items()
    )
    flat = np.concatenate([g.reshape(g.shape[0], -1) for g in draws.grads.values()], axis=1)
    elbo_mean, elbo_se = mean_and_se(draws.values)
    total_var, total_var_se = total_variance_and_se(flat)
    snr = np.concatenate([p.snr for p in params])
    snr = snr[~np.isnan(snr)]
    bias_norm = bias_max_z = threshold = None
    bias_unassessed = 0
    num_repeats = int(draws.values.shape[0])
    if has_reference:
        bias = np.concatenate([p.bias for p in params])
        bias_se = np.concatenate([p.bias_se for p in params])
        bias_norm = float(np.linalg.norm(bias))
        ref_grad = np.concatenate([p.reference for p in params])
        mean = np.concatenate([p.grad_mean for p in params])
        bias_max_z, bias_unassessed = standardized_bias(
            bias, bias_se, np.concatenate([p.grad_var for p in params]),
            rounding_floor(draws.eps, ref_grad, mean), stochastic=total_var > 0)
        threshold = max_z_threshold(bias.size, num_repeats, BIAS_Z_LEVEL)
    exact = reference.elbo if problem.exact_elbo is not None and reference.kind == "exact" \
        else None
    seconds = float(draws.seconds.mean())
    return EstimatorRecord(
        problem=problem.name,
        estimator=spec.name,
        description=spec.description,
        family=spec.family,
        objective=spec.objective,
        at=at,
        num_repeats=num_repeats,
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
        bias_z_threshold=threshold,
        repeats_for_normal_mean=repeats_for_normal_mean(flat),
    )


__all__ = ["BIAS_Z_LEVEL", "summarize"]
