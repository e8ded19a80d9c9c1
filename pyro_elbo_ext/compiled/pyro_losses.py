r"""Pyro's ``TraceEnum_ELBO`` traced through its own enumeration and tensor contraction.

``TraceEnum_ELBO.differentiable_loss`` enumerates the discrete sites marked for enumeration,
contracts the factors (``pyro.ops.contract``) and forms the Dice estimator of the remaining
ones.  Traced by :func:`torch.fx.experimental.proxy_tensor.make_fx`, all of it becomes one
ATen graph, except two reads of tensor values into Python, which would freeze a decision into
the graph:

1. ``Dice.compute_expectation`` asks ``(prob > 0).all()`` to choose between the plain dot
   product :math:`\sum p \cdot c` and the one restricted to :math:`p > 0` (``masked_select``,
   whose output shape depends on the values).  While a trace is recorded, the restricted form
   is taken and computed as :math:`\sum \mathrm{where}(p > 0, p, 0) \cdot
   \mathrm{where}(p > 0, c, 0)`: the same sum (the dropped terms are exact zeros), the same
   gradient (none to the masked terms, as ``masked_select`` gives none), with a shape that
   does not depend on the values;
2. ``warn_if_nan`` reads the loss's NaN flag (and hooks its gradient): it is skipped while
   tracing; :class:`~pyro_elbo_ext.CompiledSVI` warns after a step whose loss is NaN, as
   Pyro does.

Both patches are active only while ``make_fx`` records (:func:`tracing`), and only inside
``Dice.compute_expectation`` and ``TraceEnum_ELBO.differentiable_loss``; the eager run that
finds the parameters, and every other caller, run Pyro's code unchanged.  Tested against
Pyro's eager values and gradients (``tests/test_compiled_adapter.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext

import pyro.infer.traceenum_elbo as traceenum_elbo
import torch
from pyro.infer.traceenum_elbo import TraceEnum_ELBO
from pyro.infer.util import Dice
from torch.fx.experimental.proxy_tensor import get_proxy_mode
from torch.overrides import TorchFunctionMode

_MASK = "_pyro_elbo_ext_positive_mask"


class _MaskedDot(TorchFunctionMode):
    """Inside ``Dice.compute_expectation``: ``(p > 0).all()`` is not read (the restricted
    branch is taken), and ``masked_select`` becomes ``where(mask, x, 0).reshape(-1)``, which
    the dot product that follows sums to the same value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.gt or func is torch.Tensor.__gt__:
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and len(args) == 2 and not isinstance(
                    args[1], torch.Tensor) and args[1] == 0:
                setattr(out, _MASK, True)
            return out
        if (func is torch.Tensor.all and len(args) == 1 and not kwargs
                and getattr(args[0], _MASK, False)):
            return False  # "not all positive": take the restricted branch, without a read
        if func is torch.Tensor.masked_select or func is torch.masked_select:
            tensor, mask = args
            zero = torch.zeros((), dtype=tensor.dtype, device=tensor.device)
            return torch.where(mask, tensor, zero).reshape(-1)
        return func(*args, **kwargs)


def _is_tracing() -> bool:
    return get_proxy_mode() is not None


@contextmanager
def tracing():
    """While active, ``Dice.compute_expectation`` and ``TraceEnum_ELBO``'s NaN warning take
    no value into Python when (and only when) ``make_fx`` is recording."""
    original_expectation = Dice.compute_expectation
    original_warn = traceenum_elbo.warn_if_nan

    def compute_expectation(self, costs):
        if not _is_tracing():
            return original_expectation(self, costs)
        with _MaskedDot():
            return original_expectation(self, costs)

    def warn_if_nan(value, *args, **kwargs):
        if _is_tracing():
            return value
        return original_warn(value, *args, **kwargs)

    Dice.compute_expectation = compute_expectation
    traceenum_elbo.warn_if_nan = warn_if_nan
    try:
        yield
    finally:
        Dice.compute_expectation = original_expectation
        traceenum_elbo.warn_if_nan = original_warn


class PyroEnumLoss:
    """Pyro's ``TraceEnum_ELBO`` (or ``JitTraceEnum_ELBO``) as a loss the compiled path traces.

    Its eager differentiable loss is ``TraceEnum_ELBO.differentiable_loss`` of the user's
    instance (the TorchScript of ``JitTraceEnum_ELBO`` is bypassed: the same computation),
    with :func:`tracing`'s patches active.  It implements
    :class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss` as a loss without state: nothing
    carried between steps, no scheduled inputs, no step counter, no refusal.
    """

    def __init__(self, elbo: TraceEnum_ELBO):
        self.elbo = elbo

    def eager_differentiable_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        with tracing():
            return TraceEnum_ELBO.differentiable_loss(self.elbo, model, guide, *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        return self.elbo.loss(model, guide, *args, **kwargs)

    # ------------------------------------------------------------ the protocol (stateless)
    def carried_state(self) -> dict:
        return {}

    def load_carried_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"TraceEnum_ELBO carries no state; got keys {list(state)}")

    def state_updates_paused(self) -> AbstractContextManager:
        return nullcontext()

    def report_carried_state(self) -> None:
        pass

    def step_inputs(self) -> tuple[torch.Tensor, ...]:
        return ()

    def prepare_step_inputs(self) -> None:
        pass

    def advance_step(self) -> None:
        pass

    def compile_refusal(self, model, guide) -> str | None:
        return None


__all__ = ["PyroEnumLoss", "tracing"]
