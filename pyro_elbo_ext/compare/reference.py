"""The reference gradient that biases are measured against.

* :func:`reference_gradient` -- the exact dL where the problem has a closed-form L, else a
  many-sample estimate by an unbiased estimator under seeds independent of the compared draws;
* :data:`REFERENCE_PREFERENCE` -- the unbiased estimators tried, in order, for the estimate.
"""

from __future__ import annotations

import numpy as np

from ..problems import Problem
from .draws import draw_estimates
from .estimators import ESTIMATORS, applicable_estimators
from .records import ReferenceGradient
from .statistics import mean_and_se

#: seed offset of the reference estimator's draws (independent of the compared draws)
REFERENCE_SEED_OFFSET = 1_000_003

#: unbiased estimators tried, in order, for a many-sample reference gradient
REFERENCE_PREFERENCE = ("hard_attention_enum", "jensen_analytic", "trace_elbo",
                        "hard_attention_reinforce_ma")


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
        candidates = [n for n in REFERENCE_PREFERENCE if n in ESTIMATORS]
        usable = applicable_estimators(problem, candidates)
        if not usable:
            return ReferenceGradient("none", "none")
        estimator = usable[0]
    draws = draw_estimates(problem, estimator, num_repeats, seed + REFERENCE_SEED_OFFSET,
                           params=params)
    means, ses = {}, {}
    for name, g in draws.grads.items():
        means[name], ses[name] = mean_and_se(g)
    return ReferenceGradient("estimate", f"estimate: {estimator} x {num_repeats}", means, ses,
                             float(draws.values.mean()))


__all__ = ["REFERENCE_PREFERENCE", "REFERENCE_SEED_OFFSET", "reference_gradient"]
