"""Checks of arguments and of a (model trace, guide trace) pair, and non-finite attribution.

Each check raises an error that names the argument or site and says how to fix it.  The trace
checks run under ``is_validation_enabled()`` only, so they reward nothing on the hot path of a
tuned run.

Functions
---------
check_positive_int, check_number, check_choice
    The one way every loss validates its numeric and named options.
check_guide_sites, check_batch_dims
    Where we are deliberately stricter than Pyro's own validation (which also runs).
first_nonfinite_term, warn_nonfinite, warn_nonfinite_gradient, all_finite, graph_leaves
    Naming the site behind a non-finite L or gradient.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from .engine import Term
from .sites import (
    is_auxiliary_site,
    is_deterministic_site,
    is_subsample_site,
)


def check_positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (any integral type: ``int``, ``numpy.int64``, ...), or a
    ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_number(name: str, value, low: float = -math.inf, high: float = math.inf,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in the given range, or a ValueError naming the argument.

    Any real number type is accepted (``int``, ``float``, ``numpy.float64``, a 0-d tensor
    is not: pass a number); ``bool`` and strings are refused.
    """
    if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    below = number <= low if low_open else number < low
    above = number >= high if high_open else number > high
    if not math.isfinite(number) or below or above:
        if math.isinf(high):
            where = f"{'>' if low_open else '>='} {low:g}"
        else:
            where = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number {where}, got {value!r}")
    return number


def check_choice(name: str, value, choices: Sequence) -> object:
    """``value`` if it is one of ``choices``, else a ValueError listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_guide_sites(model_trace, guide_trace) -> None:
    """Where we are stricter than Pyro's ``check_model_guide_match`` (which only warns).

    - a guide sample site that is not in the model and not marked auxiliary: L would no longer
      be a bound (its ``log q`` enters with nothing to cancel it);
    - a guide sample site that the model observes: an observed value is never drawn from q.

    (A model latent that the guide does not sample is refused when the loss plans its
    treatments, validation or not, by every loss but ``HardAttentionELBO``:
    :func:`missing_guide_site_error`.)

    ``pyro.deterministic`` sites (in either trace) hold no density and are never an error.

    Raises
    ------
    ValueError
        Naming the first offending site and what to do about it.
    """
    model_nodes = model_trace.nodes
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or is_subsample_site(site) or is_deterministic_site(site):
            continue
        model_site = model_nodes.get(name)
        if model_site is None or model_site["type"] != "sample":
            if not is_auxiliary_site(site):
                raise ValueError(
                    f"guide site '{name}' does not appear in the model; fix its name, or mark it "
                    "infer={'is_auxiliary': True} if it is an auxiliary variable of the guide"
                )
        elif model_site["is_observed"] and not is_deterministic_site(model_site):
            raise ValueError(
                f"guide site '{name}' samples a site that the model observes; remove it from "
                "the guide (observed values are never drawn from q)"
            )


def missing_guide_site_error(name: str, loss_name: str) -> ValueError:
    """The error for a model latent that the guide does not sample."""
    return ValueError(
        f"model latent site '{name}' is not sampled by the guide. {loss_name} needs q({name}) "
        f"for every latent: add pyro.sample('{name}', ...) to the guide. If '{name}' is a "
        "discrete latent to be summed out of the model (a mixture assignment, marked "
        "infer={'enumerate': 'parallel'} or by config_enumerate), keep Pyro's TraceEnum_ELBO: "
        "it maximizes log p(x) = log sum_z p(x, z), which no loss of this package does. If "
        f"'{name}' is a hard-attention location drawn from the model's own distribution, use "
        "HardAttentionELBO (it maximizes E_p(z)[log p(x | z)], a lower bound on log p(x), "
        "not log p(x))."
    )


def check_batch_dims(trace, max_plate_nesting: float) -> None:
    """No sample site has batch dimensions of size > 1 left of ``max_plate_nesting``.

    Stricter than Pyro's ``check_site_shape``, which ignores those dimensions: their terms
    would be summed into L as if they were independent copies (L multiplied, not bounded).
    """
    if not math.isfinite(max_plate_nesting):
        return
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or is_subsample_site(site):
            continue
        batch_shape = site["fn"].batch_shape
        plated = len(batch_shape) - max_plate_nesting
        if plated > 0 and any(d != 1 for d in batch_shape[:plated]):
            raise ValueError(
                f"site '{name}' has batch shape {tuple(batch_shape)} with more dimensions "
                f"than max_plate_nesting={max_plate_nesting}; declare its batch dimensions "
                "with pyro.plate, or move them into the event with .to_event()"
            )


def first_nonfinite_term(terms: Sequence[Term]) -> Term | None:
    """The first term (in trace order) whose contribution has a NaN or infinite entry."""
    for term in terms:
        if not bool(term.contribution.detach().isfinite().all()):
            return term
    return None


def warn_nonfinite(terms: Sequence[Term], loss_name: str, quantity: str = "L") -> None:
    """Warn, naming the site, when the estimate (of ``quantity``) is not finite."""
    bad = first_nonfinite_term(terms)
    where = (
        f"the first non-finite term is the {bad.kind} of site '{bad.site}'"
        if bad is not None
        else "no single term is non-finite (the sum overflowed)"
    )
    warnings.warn(f"{loss_name}: the estimate of {quantity} is not finite; {where}",
                  stacklevel=4)


def graph_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors (parameters) that ``tensor`` was computed from, by an autograd walk."""
    leaves: list[torch.Tensor] = []
    seen: set = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None:
            leaves.append(variable)
        else:
            stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def all_finite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of ``tensors`` is finite, with one synchronization.

    Sums the tensors' norms (``torch._foreach_norm``): a NaN or infinite entry makes the sum
    non-finite.  The converse can fail only by overflow (finite entries whose norms sum past
    the dtype's range), so a ``False`` is a reason to look closer, not proof.  (The public
    :func:`torch.nn.utils.get_total_norm` gives the same answer at 2.5x the reward on a CPU,
    16 µs against 6 µs for two parameters: this runs on every step under validation.)
    """
    try:
        norms = torch._foreach_norm(list(tensors))
        total = torch.stack(norms).sum()
    except (RuntimeError, TypeError):  # mixed devices or layouts: one by one
        return all(bool(t.isfinite().all()) for t in tensors)
    return math.isfinite(float(total))


def warn_nonfinite_gradient(estimate, leaves: list[torch.Tensor], loss_name: str) -> None:
    """After ``backward``: warn, naming the site, when a parameter's gradient is not finite.

    L may be finite while its gradient is not (e.g. ``sqrt`` of a parameter at 0).  The
    gradient of each term is recomputed, in trace order, on the parameters whose gradient is
    not finite, and the first term with a non-finite gradient is named (``estimate.terms``:
    a :class:`~.combination.Estimate`'s).  ``leaves`` are the
    parameters to check (see :func:`graph_leaves`); the estimate's graph must be retained.
    Runs only under validation.
    """
    grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
    if not grads or all_finite(grads):
        return
    bad = [
        leaf for leaf in leaves
        if leaf.grad is not None and not bool(leaf.grad.isfinite().all())
    ]
    if not bad:
        return  # all_finite's sum of norms overflowed: every gradient is finite
    for term in estimate.terms:
        if term.pathwise is None or not term.pathwise.requires_grad:
            continue
        grads = torch.autograd.grad(
            term.pathwise.sum(), bad, retain_graph=True, allow_unused=True
        )
        if any(g is not None and not bool(g.isfinite().all()) for g in grads):
            where = f"the {term.kind} of site '{term.site}'"
            break
    else:
        where = "a score-function term (a non-reparameterized site's log-density or its reward)"
    warnings.warn(
        f"{loss_name}: L is finite but its gradient is not; the first term with a non-finite "
        f"gradient is {where}. Check that term's parameters (e.g. a sqrt or log at 0, a scale "
        "that reaches 0)",
        stacklevel=4,
    )
