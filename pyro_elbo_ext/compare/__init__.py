"""Estimator comparison: gradient statistics, references, timing, training runs and plots.

>>> from pyro_elbo_ext.compare import build_problem, compare_estimators
>>> problem = build_problem("normal_normal")
>>> comparison = compare_estimators(problem, ["jensen_path", "trace_elbo"], at="posterior")
>>> comparison.summary()[["estimator", "grad_var_total"]]          # doctest: +SKIP

``pandas``, ``matplotlib`` and ``tqdm`` are imported here and in the CLI only, never by the
losses.
"""

from .estimators import (
    ESTIMATORS,
    EstimatorSpec,
    IncompatibleEstimatorError,
    UnknownEstimatorError,
    applicable_estimators,
    get_estimator,
    problem_structure,
)
from .plots import plot_bound, plot_gradient_variance, plot_learning_curves
from .problems import UnknownProblemError, all_problems, build_problem
from .records import Comparison, EstimatorRecord, ParameterRecord, ReferenceGradient
from .statistics import compare_estimators, draw_estimates, reference_gradient
from .training import FitResult, fit_estimators

__all__ = [
    "ESTIMATORS",
    "Comparison",
    "EstimatorRecord",
    "EstimatorSpec",
    "FitResult",
    "IncompatibleEstimatorError",
    "ParameterRecord",
    "ReferenceGradient",
    "UnknownEstimatorError",
    "UnknownProblemError",
    "all_problems",
    "applicable_estimators",
    "build_problem",
    "compare_estimators",
    "draw_estimates",
    "fit_estimators",
    "get_estimator",
    "plot_bound",
    "plot_gradient_variance",
    "plot_learning_curves",
    "problem_structure",
    "reference_gradient",
]
