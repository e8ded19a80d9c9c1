"""One torch optimizer for all of SVI's parameters, instead of one per parameter.

:class:`pyro.optim.PyroOptim` builds a separate ``torch.optim`` object for every parameter it
sees and calls ``step()`` on each of them; a torch ``step()`` has a fixed cost (its profiler
record, the grad-mode guard, the state lookup) of some tens of microseconds on a CPU, so a model
with eight parameter tensors pays it eight times per SVI step.  On small models that is a large
part of the step (``python -m benchmarks.decompose_step``).  :class:`GroupedOptim` keeps the
same interface and checkpoint format, and steps every parameter with one optimizer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pyro
import torch
from pyro.optim import PyroOptim


class GroupedOptim(PyroOptim):
    r"""A :class:`~pyro.optim.PyroOptim` that steps all parameters with one torch optimizer.

    A drop-in replacement for ``pyro.optim.Adam(...)`` and its siblings wherever every parameter
    uses the same hyper-parameters::

        svi = SVI(model, guide, GroupedOptim(torch.optim.Adam, {"lr": 0.01}), loss=...)

    For the element-wise optimizers (Adam, AdamW, SGD, RMSprop, Adagrad, ...) each parameter's
    update depends only on that parameter, so one optimizer over all of them takes exactly the
    steps of one optimizer per parameter (with torch's default ``foreach=None`` on CPU the
    arithmetic is the same, bit for bit).  Optimizers that couple parameters (LBFGS) are not
    element-wise and should keep :class:`~pyro.optim.PyroOptim`.

    As with :class:`~pyro.optim.PyroOptim`, only the parameters passed to a call are stepped:
    parameters the optimizer already holds but that this step did not use keep their values
    and their moment estimates.  New parameters join the optimizer when first seen.
    :meth:`get_state` writes the per-parameter format of :class:`~pyro.optim.PyroOptim`, so a
    checkpoint moves between the two in either direction.  What is restored is each
    parameter's optimizer *state* (moments, step count); the hyper-parameters are this
    object's ``optim_args`` (a ``pyro.optim`` checkpoint saved with another ``lr`` continues
    at this one's).

    An optimizer that changes its own hyper-parameters on every step, such as Pyro's
    ``ClippedAdam`` with ``lrd < 1``, changes them once per step for all parameters here, but
    once per step *of each parameter* under :class:`~pyro.optim.PyroOptim`: the two part ways
    as soon as some parameter sits a step out.

    Parameters
    ----------
    optim_constructor : type
        A ``torch.optim.Optimizer`` class, e.g. ``torch.optim.Adam``.
    optim_args : dict
        Its keyword arguments, shared by every parameter.  Per-parameter arguments (a callable)
        are refused: use :class:`~pyro.optim.PyroOptim` for those.
    clip_args : dict, optional
        ``{"clip_norm": ...}`` and/or ``{"clip_value": ...}``, applied to each parameter's
        gradient separately, as :class:`~pyro.optim.PyroOptim` does.
    """

    def __init__(
        self,
        optim_constructor: Callable[..., torch.optim.Optimizer],
        optim_args: dict,
        clip_args: dict | None = None,
    ):
        if not isinstance(optim_args, dict):
            raise ValueError(
                "GroupedOptim takes one dict of optimizer arguments shared by every parameter, "
                f"got {type(optim_args).__name__}; for per-parameter arguments use "
                "pyro.optim.PyroOptim (e.g. pyro.optim.Adam(callable))"
            )
        if clip_args is not None and not isinstance(clip_args, dict):
            raise ValueError(
                "GroupedOptim takes clip_args as a dict ({'clip_norm': ...} or "
                f"{{'clip_value': ...}}), got {type(clip_args).__name__}"
            )
        unknown = set(clip_args or {}) - {"clip_norm", "clip_value"}
        if unknown:
            raise ValueError(
                f"clip_args keys must be 'clip_norm' and/or 'clip_value', got {sorted(unknown)}"
            )
        super().__init__(optim_constructor, optim_args, clip_args)
        self.optimizer: torch.optim.Optimizer | None = None
        self._members: set[torch.Tensor] = set()

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """One optimizer step for ``params`` (SVI passes the unconstrained parameters)."""
        params = params if isinstance(params, (set, frozenset)) else set(params)
        if not params:
            return  # a step without parameters (as pyro.optim: nothing to do)
        new = [p for p in params if p not in self._members]
        if new:
            self._add(new)
        if self.pt_clip_args:
            for p in params:
                self._clip_grad(p, **self.pt_clip_args)
        # members now include params; a larger set holds parameters this step did not use
        idle = (
            [p for p in self._members if p not in params]
            if len(self._members) > len(params) else ()
        )
        stashed = [(p, p.grad) for p in idle if p.grad is not None]
        for p, _ in stashed:  # not part of this step: no gradient, no update
            p.grad = None
        try:
            self.optimizer.step(*args, **kwargs)
        finally:
            for p, grad in stashed:
                p.grad = grad

    def _add(self, params: list[torch.Tensor]) -> None:
        """Let new parameters join the optimizer, with any state waiting for them."""
        if self.optimizer is None:
            self.optimizer = self.pt_optim_constructor(params, **self.pt_optim_args)
        else:
            self.optimizer.add_param_group({"params": params})
        self._members.update(params)
        store = pyro.get_param_store()
        for p in params:
            state = self._state_waiting_to_be_consumed.pop(store.param_name(p), None)
            if state is not None:
                # a one-parameter optimizer of the same kind parses (and casts) the state
                single = self.pt_optim_constructor([p], **self.pt_optim_args)
                single.load_state_dict(state)
                self.optimizer.state[p] = single.state[p]

    def get_state(self) -> dict:
        """``{param_name: state_dict}`` in :class:`~pyro.optim.PyroOptim`'s format."""
        if self.optimizer is None:
            return {}
        store = pyro.get_param_store()
        out = {}
        for group in self.optimizer.param_groups:
            settings = {key: value for key, value in group.items() if key != "params"}
            for p in group["params"]:
                name = store.param_name(p)
                if name is None:
                    continue  # no longer in the param store
                state = self.optimizer.state.get(p)
                out[name] = {
                    "state": {0: dict(state)} if state else {},
                    "param_groups": [dict(settings, params=[0])],
                }
        return out


__all__ = ["GroupedOptim"]
