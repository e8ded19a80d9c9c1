"""Estimator comparison: gradient statistics, references, timing, training runs and plots.

Modules, each with one job:

* :mod:`.applicability` -- a problem's trace structure and the rules that say whether an
  estimator applies;
* :mod:`.estimators` -- the named-estimator registry (:data:`ESTIMATORS`, :func:`get_estimator`);
* :mod:`.statistics` -- pure statistics of repeated draws (moments, SEs, standardized bias and
  its threshold);
* :mod:`.draws` -- R timed evaluations of one estimator under common seeds;
* :mod:`.reference` -- the exact or many-sample reference gradient;
* :mod:`.summary` -- one estimator's draws as an :class:`EstimatorRecord`;
* :mod:`.runner` -- :func:`compare_estimators` and :func:`compare_at_points`;
* :mod:`.records` -- the records and their tables / JSON / files;
* :mod:`.report` -- the text report of a comparison (table and what the numbers mean);
* :mod:`.training` -- :func:`fit_estimators`, learning curves;
* :mod:`.plots` -- the figures.

Problems come from the one registry, :mod:`pyro_elbo_ext.problems`.

>>> from pyro_elbo_ext.compare import compare_estimators
>>> from pyro_elbo_ext.problems import get_problem
>>> problem = get_problem("normal_normal")
>>> comparison = compare_estimators(problem, ["jensen_path", "trace_elbo"], at="posterior")
>>> comparison.summary()[["estimator", "grad_var_total"]]          # doctest: +SKIP

Needs the ``compare`` extra (pandas, matplotlib, tqdm, scikit-learn, scipy):
``pip install 'pyro-elbo-ext[compare]'``; the losses never import it.
"""

from .._extras import require

for _module in ("pandas", "matplotlib", "scipy"):
    require(_module, "compare", "estimator comparison (pyro_elbo_ext.compare)")

from .applicability import ProblemStructure, problem_structure  # noqa: E402
from .draws import Draws, draw_estimates  # noqa: E402
from .estimators import (  # noqa: E402
    ESTIMATORS,
    EstimatorSpec,
    IncompatibleEstimatorError,
    UnknownEstimatorError,
    applicable_estimators,
    get_estimator,
)
from .plots import plot_bound, plot_gradient_variance, plot_learning_curves  # noqa: E402
from .records import (  # noqa: E402
    Comparison,
    EstimatorRecord,
    ParameterRecord,
    ReferenceGradient,
)
from .reference import reference_gradient  # noqa: E402
from .runner import compare_at_points, compare_estimators  # noqa: E402
from .training import FitResult, fit_estimators  # noqa: E402

__all__ = [
    "ESTIMATORS",
    "Comparison",
    "Draws",
    "EstimatorRecord",
    "EstimatorSpec",
    "FitResult",
    "IncompatibleEstimatorError",
    "ParameterRecord",
    "ProblemStructure",
    "ReferenceGradient",
    "UnknownEstimatorError",
    "applicable_estimators",
    "compare_at_points",
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
