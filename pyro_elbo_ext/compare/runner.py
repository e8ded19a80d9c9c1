"""The runner: several estimators on one problem, at one or more parameter points.

* :func:`compare_estimators` -- R draws of each named estimator at one point, summarized
  against one reference gradient, as a :class:`~.records.Comparison`;
* :func:`compare_at_points` -- the same at several points (e.g. the start and the exact
  posterior), as one :class:`~.records.Comparison` whose rows carry their point in ``at``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pyro
from pyro.util import get_rng_state, set_rng_state

from .._extras import require
from ..problems import Problem
from .draws import draw_estimates, module_values_restored, resolve_params
from .estimators import chosen_estimators, get_estimator
from .records import Comparison
from .reference import reference_gradient
from .summary import summarize

tqdm = require("tqdm", "compare", "progress bars").tqdm  # the plain bar: no ipywidgets needed


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
        Registry names, each at most once; default every estimator that applies to the
        problem.  A named estimator that does not apply raises
        :class:`~.estimators.IncompatibleEstimatorError`.
    num_repeats : int
        R, the number of evaluations per estimator (>= 3).
    num_particles : int
        Particles per evaluation (an estimator that needs more uses its minimum; the records
        say how many were used).
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
    return compare_at_points(problem, estimators, (at,), num_repeats, num_particles, seed,
                             reference, reference_repeats, progress)


def compare_at_points(
    problem: Problem,
    estimators: Iterable[str] | None = None,
    points: Sequence[str | dict] = ("init", "posterior"),
    num_repeats: int = 200,
    num_particles: int = 1,
    seed: int = 0,
    reference: str = "auto",
    reference_repeats: int = 2000,
    progress: bool | None = None,
) -> Comparison:
    """:func:`compare_estimators` at each of ``points``, in one :class:`Comparison`.

    Each point has its own reference gradient (:attr:`Comparison.references`); the rows are
    ordered by point, then by estimator, and their ``at`` column says the point.  The same
    seeds are used at every point.
    """
    resolved = [resolve_params(problem, at) for at in points]
    labels = [label for label, _ in resolved]
    if len(set(labels)) != len(labels):
        raise ValueError(f"each parameter point must be given once, got {labels}")
    names = chosen_estimators(problem, estimators)
    specs = [get_estimator(n) for n in names]
    for spec in specs:  # fail before any work on an incompatible pair
        spec.build(problem, num_particles)
    store = pyro.get_param_store()
    saved, rng = store.get_state(), get_rng_state()
    references, records = {}, []
    try:
        with module_values_restored(problem):
            for label, params in resolved:
                ref = reference_gradient(problem, params, reference, reference_repeats, seed)
                references[label] = ref
                bar = tqdm(specs, desc=f"compare {problem.name} at {label}", unit="estimator",
                           disable=None if progress is None else not progress,
                           delay=0 if progress else 2.0, leave=False)
                for spec in bar:
                    bar.set_postfix_str(spec.name)
                    draws = draw_estimates(problem, spec, num_repeats, seed, num_particles,
                                           params)
                    records.append(summarize(problem, spec, draws, ref, label, seed))
    finally:
        store.set_state(saved)
        set_rng_state(rng)
    return Comparison(problem.name, ", ".join(labels), references[labels[0]], tuple(records),
                      references=references)


__all__ = ["compare_at_points", "compare_estimators"]
