"""Named example problems: model, guide, data and exact answers, shared by every consumer.

>>> from pyro_elbo_ext.problems import get_problem
>>> problem = get_problem("normal_normal", num_data=50)   # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Problem
from .conjugate import beta_bernoulli, gamma_poisson, normal_normal
from .discrete import tiny_discrete
from .hard_attention import cluttered_digits, random_attention
from .logistic import logistic_regression
from .logistic_real import logistic_breast_cancer
from .vae import vae_digits

#: problem name -> factory taking keyword options (num_data, seed, dtype, device, ...)
PROBLEMS: dict[str, Callable[..., Problem]] = {
    "normal_normal": normal_normal,
    "beta_bernoulli": beta_bernoulli,
    "gamma_poisson": gamma_poisson,
    "tiny_discrete": tiny_discrete,
    "logistic_regression": logistic_regression,
    "logistic_breast_cancer": logistic_breast_cancer,
    "vae_digits": vae_digits,
    "random_attention": random_attention,
    "cluttered_digits": cluttered_digits,
}

#: the problems whose posterior, evidence and L(q) have closed forms
CONJUGATE_PROBLEMS = ("normal_normal", "beta_bernoulli", "gamma_poisson")


def get_problem(name: str, **options) -> Problem:
    """Build the problem ``name`` with the given options.

    Raises
    ------
    KeyError
        For an unknown name, listing the known ones.
    """
    try:
        factory = PROBLEMS[name]
    except KeyError:
        raise KeyError(f"unknown problem {name!r}; known problems: {sorted(PROBLEMS)}") from None
    return factory(**options)


__all__ = ["CONJUGATE_PROBLEMS", "PROBLEMS", "Problem", "get_problem"]
