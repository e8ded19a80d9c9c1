"""Problems by name for the comparison tools: the package registry plus the ones added here.

:data:`pyro_elbo_ext.problems.PROBLEMS` is the source of truth; this module adds the
factories that are not (yet) registered there (the digits VAE, breast-cancer logistic
regression, and, when their modules exist, the synthetic logistic regression and the
hard-attention problems), so that the CLI
finds every problem by name.  Once they are registered in ``PROBLEMS`` this merge is a no-op.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable

from ..problems import PROBLEMS, Problem
from ..problems.logistic_real import logistic_breast_cancer
from ..problems.vae import vae_digits


class UnknownProblemError(KeyError):
    """A problem name that is in neither registry."""

    def __str__(self) -> str:
        return str(self.args[0])


def _optional_factory(module: str, name: str) -> Callable[..., Problem] | None:
    if importlib.util.find_spec(module) is None:
        return None
    return getattr(importlib.import_module(module), name, None)


def all_problems() -> dict[str, Callable[..., Problem]]:
    """Every known problem factory by name: ``PROBLEMS`` first, then the extra ones."""
    extra: dict[str, Callable[..., Problem] | None] = {
        "logistic_regression": _optional_factory(
            "pyro_elbo_ext.problems.logistic", "logistic_regression"
        ),
        "logistic_breast_cancer": logistic_breast_cancer,
        "vae_digits": vae_digits,
        "random_attention": _optional_factory(
            "pyro_elbo_ext.problems.hard_attention", "random_attention"
        ),
        "cluttered_digits": _optional_factory(
            "pyro_elbo_ext.problems.hard_attention", "cluttered_digits"
        ),
    }
    merged = dict(PROBLEMS)
    for name, factory in extra.items():
        if factory is not None and name not in merged:
            merged[name] = factory
    return merged


def problem_options(name: str) -> dict[str, object]:
    """The keyword options of problem ``name``'s factory and their defaults."""
    factory = _factory(name)
    return {
        p.name: p.default
        for p in inspect.signature(factory).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def describe_problem(name: str) -> str:
    """The first line of the factory's docstring."""
    doc = inspect.getdoc(_factory(name)) or ""
    return doc.splitlines()[0] if doc else ""


def build_problem(name: str, **options) -> Problem:
    """Build problem ``name`` with keyword ``options``.

    Raises
    ------
    UnknownProblemError
        For an unknown name, listing the known ones.
    ValueError
        For an option the factory does not take, listing the ones it does.
    """
    factory = _factory(name)
    known = problem_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"problem {name!r} has no option(s) {unknown}; its options are {sorted(known)}"
        )
    return factory(**options)


def _factory(name: str) -> Callable[..., Problem]:
    problems = all_problems()
    try:
        return problems[name]
    except KeyError:
        raise UnknownProblemError(
            f"unknown problem {name!r}; known problems: {', '.join(problems)}"
        ) from None


__all__ = [
    "UnknownProblemError",
    "all_problems",
    "build_problem",
    "describe_problem",
    "problem_options",
]
