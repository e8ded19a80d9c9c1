"""Timed draws: R evaluations of one estimator at fixed parameters, under common seeds.

* :class:`Draws` -- the R estimates of L, of dL (per parameter leaf) and their wall times;
* :func:`resolve_params` -- ``at="init" | "posterior" | {values}`` to parameter values;
* :func:`draw_estimates` -- evaluate an estimator R times;
* :func:`check_params_listed` -- refuse parameters that ``init_params`` leaves out;
* :func:`module_values_restored` -- put the values of a problem's ``pyro.module`` parameters
  back after a comparison.

Repetition r of every estimator runs under the seed ``seed + r`` (common random numbers): the
estimators that sample the guide the same way see the same draws, so their differences are
measured with less noise.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyro
import torch

from ..problems import Problem
from ..problems.base import MODULE_DIVIDER
from .estimators import EstimatorSpec, get_estimator


@dataclass(frozen=True, eq=False)
class Draws:
    """R evaluations of one estimator: L estimates, dL estimates and wall times.

    ``num_particles`` is the number the loss actually used (some estimators need at least 2,
    e.g. ``renyi_elbo`` and ``hard_attention_reinforce_loo``), which may exceed the number asked.
    """

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
        if r == min(0, -warmup):
            check_params_listed(problem)
        if r < 0:
            continue
        values[r], seconds[r] = -float(value), elapsed
        for name, leaf in leaves.items():
            grads[name][r] = 0.0 if leaf.grad is None else -leaf.grad.detach().cpu().numpy()
    for leaf in leaves.values():
        leaf.grad = None
    eps = max((torch.finfo(leaf.dtype).eps for leaf in leaves.values()
               if leaf.dtype.is_floating_point), default=float(np.finfo(np.float64).eps))
    used = int(getattr(loss, "num_particles", num_particles))
    return Draws(spec.name, values, grads, seconds, used, float(eps))


def check_params_listed(problem: Problem) -> None:
    """A ValueError naming the parameters in Pyro's param store (read by the model or guide)
    that ``problem.init_params`` leaves out: nothing would reset or measure them."""
    unlisted = problem.unlisted_params()
    if unlisted:
        modules = sorted({n.split(MODULE_DIVIDER)[0] for n in unlisted if MODULE_DIVIDER in n})
        hint = "" if not modules else (
            f"; for pyro.module({modules[0]!r}, net): {{param_with_module_name({modules[0]!r}, "
            "n): p.detach().clone() for n, p in net.named_parameters()}} "
            "(pyro.params.param_with_module_name)"
        )
        raise ValueError(
            f"problem {problem.name!r}: the model or guide reads the parameter(s) {unlisted}, "
            "which init_params does not list, so the comparison would neither reset nor "
            f"measure them; add each to init_params with its starting value{hint}"
        )


@contextmanager
def module_values_restored(problem: Problem) -> Iterator[None]:
    """On exit, write back the values that the problem's ``pyro.module`` parameters had on
    entry (:meth:`Problem.set_params` writes each point's values into the module's own
    tensors; a training run steps them)."""
    saved = {name: (own, own.detach().clone())
             for name, own in problem.module_parameters().items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for own, value in saved.values():
                own.copy_(value)


__all__ = ["Draws", "check_params_listed", "draw_estimates", "module_values_restored",
           "resolve_params"]
