"""Named example problems: model, guide, data and exact answers, shared by every consumer.

* :class:`Problem` (:mod:`.base`) -- the record: model, guide, data, exact answers;
* :mod:`.registry` -- :data:`PROBLEMS`, :func:`get_problem`, :func:`problem_options`,
  :func:`describe_problem`, :class:`UnknownProblemError`, :class:`ProblemOptionError`;
* the factories: :mod:`.conjugate` (normal_normal, beta_bernoulli, gamma_poisson),
  :mod:`.discrete` (tiny_discrete), :mod:`.logistic` (logistic_regression),
  :mod:`.logistic_real` (logistic_breast_cancer), :mod:`.vae` (vae_digits),
  :mod:`.sbn` (sbn_digits, a sigmoid belief network), :mod:`.hard_attention`
  (random_attention, cluttered_digits).

Importing this package needs the core install only; the digits and breast-cancer factories
need scikit-learn (``pip install 'pyro-elbo-ext[compare]'``) when called; ``sbn_digits`` on
the 5,000 MNIST digits (``data="mnist5k"``) needs ``pip install 'pyro-elbo-ext[mnist]'``.

>>> from pyro_elbo_ext.problems import get_problem
>>> problem = get_problem("normal_normal", num_data=50)   # doctest: +SKIP
"""

from __future__ import annotations

from .base import Problem
from .registry import (
    CONJUGATE_PROBLEMS,
    PROBLEMS,
    ProblemOptionError,
    UnknownProblemError,
    describe_problem,
    get_problem,
    problem_options,
)

__all__ = [
    "CONJUGATE_PROBLEMS",
    "PROBLEMS",
    "Problem",
    "ProblemOptionError",
    "UnknownProblemError",
    "describe_problem",
    "get_problem",
    "problem_options",
]
