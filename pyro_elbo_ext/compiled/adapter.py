"""How the compiled path talks to a loss: through :mod:`pyro_elbo_ext.elbos.protocol` only.

Every call the compiled path makes on a loss goes through this module, so that the protocol
(:class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss`) is the one surface between them.  A
loss that does not implement it (one of Pyro's own ELBOs) is driven by its public
``differentiable_loss`` alone: no carried state, no step inputs, no step counter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..elbos.protocol import is_compilable as _has_protocol

#: per loss type: whether it implements the protocol (asked once per type: this is on the path
#: of every compiled step)
_COMPILABLE: dict[type, bool] = {}


def is_compilable(loss) -> bool:
    """Whether ``loss`` implements :class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss`."""
    kind = type(loss)
    known = _COMPILABLE.get(kind)
    if known is None:
        known = _COMPILABLE[kind] = _has_protocol(loss)
    return known


def eager_loss_fn(loss) -> Callable:
    """``(model, guide, args, kwargs) -> -L_hat`` on the eager path of ``loss`` (what a
    compiled path traces)."""
    if is_compilable(loss):
        return loss.eager_differentiable_loss
    return lambda model, guide, args, kwargs: loss.differentiable_loss(
        model, guide, *args, **kwargs
    )


def state_carrier(loss):
    """``loss`` where it carries state through a compiled step (the protocol), else ``None``."""
    return loss if is_compilable(loss) else None


def step_inputs(loss) -> tuple[torch.Tensor, ...]:
    """The loss's per-step input tensors (``()`` for a loss without the protocol)."""
    return loss.step_inputs() if is_compilable(loss) else ()


def prepare_step_inputs(loss) -> None:
    """Refresh the loss's per-step inputs, where it has any."""
    if is_compilable(loss):
        loss.prepare_step_inputs()


def advance_step(loss) -> None:
    """One training step was taken: the loss's counter moves (a schedule's position)."""
    if is_compilable(loss):
        loss.advance_step()


def compile_refusal(loss, model, guide) -> str | None:
    """Why ``loss`` cannot be compiled faithfully for ``(model, guide)``, or ``None``."""
    return loss.compile_refusal(model, guide) if is_compilable(loss) else None


__all__ = ["advance_step", "compile_refusal", "eager_loss_fn", "is_compilable",
           "prepare_step_inputs", "state_carrier", "step_inputs"]
