"""Questions about distribution objects and autograd graphs that the treatments ask.

Contents: :func:`distribution_tensors` (the tensors a distribution holds), :func:`depends_on`
(is one tensor computed from another, by an autograd walk), :func:`stop_gradient` (a
distribution with its parameters detached), :func:`is_delta`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from pyro.distributions.util import detach


def depends_on(outputs: Iterable[torch.Tensor], sources: Iterable[torch.Tensor]) -> bool:
    """Whether any of ``outputs`` was computed (in the autograd graph) from any of ``sources``.

    Walks the autograd graph backward from ``outputs``; used once per site when a loss builds
    its plan, never on the per-step path.
    """
    targets = {t.grad_fn for t in sources if t.grad_fn is not None}
    if not targets:
        return False
    stack = [t.grad_fn for t in outputs if torch.is_tensor(t) and t.grad_fn is not None]
    seen = set()
    while stack:
        node = stack.pop()
        if node in targets:
            return True
        if node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return False


def distribution_tensors(fn) -> list[torch.Tensor]:
    """The tensors a distribution object holds (its parameters), through wrappers."""
    found: list[torch.Tensor] = []
    pending = [fn]
    visited: set[int] = set()
    while pending:
        obj = pending.pop()
        if id(obj) in visited:
            continue
        visited.add(id(obj))
        for value in vars(obj).values():
            if torch.is_tensor(value):
                found.append(value)
            elif hasattr(value, "__dict__") and hasattr(value, "batch_shape"):
                pending.append(value)
            elif isinstance(value, (list, tuple)):
                pending.extend(v for v in value if hasattr(v, "__dict__"))
    return found


#: values a distribution may hold that :func:`stop_gradient` copies by reference
_INERT = (bool, int, float, str, type(None), torch.Size)


def stop_gradient(fn):
    """A copy of distribution ``fn`` whose parameter tensors are detached.

    For distributions made of tensors, plain values and nested distributions (``Normal``,
    ``Independent``, ``MaskedDistribution``, ``MultivariateNormal`` with its cached factors,
    ...) this is a shallow copy with every tensor detached and every nested distribution
    copied the same way: about 5 µs, against about 25-50 µs for the deep copy of
    :func:`pyro.distributions.util.detach`, which is used for anything else (transforms and
    other objects that may hold parameters).  Either way ``stop_gradient(fn).log_prob(z)``
    has the value of ``fn.log_prob(z)`` and no gradient path to ``fn``'s parameters.
    """
    copied = _shallow_stop_gradient(fn)
    return detach(fn) if copied is None else copied


def _shallow_stop_gradient(fn):
    """:func:`stop_gradient` by shallow copies, or ``None`` where an attribute is not a tensor,
    a plain value or a distribution."""
    state = {}
    for key, value in vars(fn).items():
        if torch.is_tensor(value):
            state[key] = value.detach()
        elif isinstance(value, _INERT):
            state[key] = value
        elif isinstance(value, torch.distributions.Distribution):
            inner = _shallow_stop_gradient(value)
            if inner is None:
                return None
            state[key] = inner
        else:
            return None
    copied = copy.copy(fn)
    copied.__dict__ = state
    return copied


def is_delta(fn) -> bool:
    """A ``Delta`` site (an AutoGuide's latent): its only "parameter" is its own value."""
    return type(fn).__name__ == "Delta"


__all__ = ["depends_on", "distribution_tensors", "is_delta", "stop_gradient"]
