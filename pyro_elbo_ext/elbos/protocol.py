"""What a compiled path needs from a loss: the protocol, and the registry of the jit backend.

The compiled path (:mod:`pyro_elbo_ext.compiled`) sits on top of the losses: it imports this
module and drives a loss only through :class:`CompilableLoss`; nothing in :mod:`.elbos`
imports the compiled path.  ``jit=True`` on a loss reaches it through the registry here: the
compiled package registers its factory when it is imported (``pyro_elbo_ext/__init__.py``
imports it, so it is always registered once the package is), and a loss asks
:func:`jit_backend` for it.

A compiled step traces :meth:`CompilableLoss.eager_differentiable_loss` (``-L_hat`` whose
gradient is the surrogate's) through Pyro's handlers with the parameters as graph inputs.
Whatever the loss carries from step to step (a baseline's state) enters the graph as tensors
(:meth:`~CompilableLoss.carried_state`) and leaves it as the new tensors, which the compiled
path hands back (:meth:`~CompilableLoss.load_carried_state`); values that change from step to
step by schedule (a KL weight) are graph inputs too (:meth:`~CompilableLoss.step_inputs`).
The loss's step counter moves only through :meth:`~CompilableLoss.advance_step`: the compiled
path never writes onto the loss.

Contents: :class:`CompilableLoss`, :func:`is_compilable`, :func:`register_jit_backend`,
:func:`jit_backend`, :data:`PROTOCOL_METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class CompilableLoss(Protocol):
    """A loss that a compiled path can trace, step and checkpoint faithfully.

    Every :class:`~pyro_elbo_ext.elbos.base.SiteTreatmentELBO` implements it.
    """

    def eager_differentiable_loss(self, model, guide, args: tuple, kwargs: dict
                                  ) -> torch.Tensor:
        """``-L_hat`` on the eager path, with the surrogate's gradient (what is traced).

        A training call: a learning signal reads its state, then updates it (unless
        :meth:`state_updates_paused`); the step counter does not move.
        """

    def carried_state(self) -> dict:
        """The tensors the loss carries from step to step, keyed by hashable keys (empty for
        a stateless loss).  Updates replace these tensors; they never write into them."""

    def load_carried_state(self, state: dict) -> None:
        """Replace the carried tensors by ``state`` (keys as :meth:`carried_state`'s)."""

    def state_updates_paused(self) -> AbstractContextManager:
        """A context in which training calls read (and create) the carried state but do not
        update it: a compiled path's discovery run, which is not a step."""

    def report_carried_state(self) -> None:
        """After a compiled step: warn, naming the site, for each state update it skipped."""

    def step_inputs(self) -> tuple[torch.Tensor, ...]:
        """Tensors the loss reads that change from step to step by schedule (graph inputs,
        refreshed in place by :meth:`prepare_step_inputs` before every call)."""

    def prepare_step_inputs(self) -> None:
        """Write this step's values into :meth:`step_inputs`."""

    def advance_step(self) -> None:
        """One training step was taken: the loss's step counter moves by one."""

    def compile_refusal(self, model, guide) -> str | None:
        """Why this loss cannot be compiled faithfully for ``(model, guide)`` (e.g. a gradient
        hook a traced graph would not keep), or ``None`` when it can."""


#: the methods :func:`is_compilable` looks for
PROTOCOL_METHODS = (
    "eager_differentiable_loss",
    "carried_state",
    "load_carried_state",
    "state_updates_paused",
    "report_carried_state",
    "step_inputs",
    "prepare_step_inputs",
    "advance_step",
    "compile_refusal",
)


def is_compilable(loss: Any) -> bool:
    """Whether ``loss`` has every method of :class:`CompilableLoss` (Pyro's own ELBOs do not)."""
    return all(callable(getattr(loss, name, None)) for name in PROTOCOL_METHODS)


#: ``factory(loss) -> backend``: what ``jit=True`` compiles with (see :func:`jit_backend`)
JitFactory = Callable[[Any], Any]

_JIT_FACTORY: JitFactory | None = None


def register_jit_backend(factory: JitFactory) -> None:
    """Register the factory of ``jit=True``'s compiled losses.

    ``factory(loss)`` returns an object the loss keeps (one per loss) and calls as
    ``backend.differentiable_loss(model, guide, args, kwargs) -> Tensor`` (``-L_hat`` whose
    ``backward()`` hands out the compiled gradient) and
    ``backend.loss_and_grads(model, guide, args, kwargs) -> Tensor`` (``-L_hat``, its
    gradient added into the parameters' ``.grad``).  :mod:`pyro_elbo_ext.compiled` registers
    its own when imported; registering again replaces it.
    """
    global _JIT_FACTORY
    _JIT_FACTORY = factory


def jit_backend() -> JitFactory:
    """The registered factory of ``jit=True`` (see :func:`register_jit_backend`).

    Raises
    ------
    RuntimeError
        When none is registered (the compiled package was never imported).
    """
    if _JIT_FACTORY is None:
        raise RuntimeError(
            "jit=True needs the compiled path, which registers itself when "
            "pyro_elbo_ext.compiled is imported (importing pyro_elbo_ext does it); import "
            "pyro_elbo_ext (or pyro_elbo_ext.compiled) first, or use jit=False"
        )
    return _JIT_FACTORY


__all__ = [
    "PROTOCOL_METHODS",
    "CompilableLoss",
    "JitFactory",
    "is_compilable",
    "jit_backend",
    "register_jit_backend",
]
