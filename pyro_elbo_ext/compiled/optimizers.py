r"""Pyro's optimizers as the compiled step's pure functions: which one mirrors a ``PyroOptim``.

The pure updates themselves (:class:`~pyro_elbo_ext.functional_optim.FunctionalOptimizer` and
its subclasses, re-exported here) live in :mod:`pyro_elbo_ext.functional_optim`, which the
losses use too; this module maps a :class:`pyro.optim.PyroOptim` (its constructor, its
per-parameter arguments, its ``clip_args``, a checkpoint's hyper-parameters) onto them.

State moves to and from torch's ``state_dict`` format for one parameter (what
:meth:`pyro.optim.PyroOptim.get_state` stores per parameter name), so checkpoints move between
:class:`pyro.infer.SVI` and :class:`~pyro_elbo_ext.CompiledSVI` in both directions.

Supported (:func:`functional_optimizer`): ``pyro.optim.Adam``, ``pyro.optim.ClippedAdam``
(with ``lrd``), ``pyro.optim.SGD`` (momentum, dampening, Nesterov), ``pyro.optim.RMSprop``
(momentum, centered), each also inside :class:`~pyro_elbo_ext.GroupedOptim`, with Pyro's
``clip_args`` (``clip_norm``, ``clip_value``).  References: Kingma & Ba 2014 (Adam,
arXiv:1412.6980); Tieleman & Hinton 2012 (RMSprop); Sutskever et al. 2013 (momentum).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.optim import PyroOptim
from pyro.optim.clipped_adam import ClippedAdam as _TorchClippedAdam
from torch.optim.adam import adam as multi_tensor_adam

from ..functional_optim import (
    SGD,
    Adam,
    ClippedAdam,
    FunctionalOptimizer,
    RMSprop,
    clip_gradient,
)
from ..optim import GroupedOptim

#: optimizers the compiled step supports, as the error message lists them
SUPPORTED = (
    "pyro.optim.Adam, pyro.optim.ClippedAdam, pyro.optim.SGD, pyro.optim.RMSprop, and "
    "pyro_elbo_ext.GroupedOptim over torch.optim.Adam / SGD / RMSprop or ClippedAdam"
)


_BY_CONSTRUCTOR = {
    torch.optim.Adam: Adam,
    _TorchClippedAdam: ClippedAdam,
    torch.optim.SGD: SGD,
    torch.optim.RMSprop: RMSprop,
}


@dataclass(frozen=True)
class ParamOptimizer:
    """The optimizer of one named parameter: its update and its gradient clipping."""

    optimizer: FunctionalOptimizer
    clip: dict

    def update(self, param, grad, state):
        if self.clip:
            grad = clip_gradient(grad, **self.clip)
        return self.optimizer.update(param, grad, state)


def check_supported(optim) -> type[FunctionalOptimizer]:
    """The functional optimizer class mirroring ``optim``, or a TypeError listing
    :data:`SUPPORTED`."""
    kind = _BY_CONSTRUCTOR.get(getattr(optim, "pt_optim_constructor", None))
    if not isinstance(optim, PyroOptim) or kind is None:
        what = getattr(optim, "pt_optim_constructor", type(optim))
        raise TypeError(
            f"CompiledSVI cannot compile the optimizer {getattr(what, '__name__', what)}; "
            f"supported: {SUPPORTED}. Use pyro.infer.SVI for other optimizers"
        )
    return kind


def functional_optimizer(optim, param: torch.Tensor, saved: dict | None = None) -> ParamOptimizer:
    """The functional mirror of ``optim`` (a :class:`pyro.optim.PyroOptim`) for one parameter.

    Hyper-parameters are ``optim``'s for this parameter (a callable ``optim_args`` is called
    as Pyro calls it); under a :class:`pyro.optim.PyroOptim`, a ``saved`` checkpoint's
    hyper-parameters win, as ``torch.optim.Optimizer.load_state_dict`` makes them win there
    (a :class:`~pyro_elbo_ext.GroupedOptim` keeps its own; see its docstring).

    Raises
    ------
    TypeError
        For any other optimizer, listing :data:`SUPPORTED`.
    """
    kind = check_supported(optim)
    args = dict(optim._get_optim_args(param))
    clip = optim._get_grad_clip_args(param) or {}
    unknown = set(clip) - {"clip_norm", "clip_value"}
    if unknown:
        raise ValueError(f"clip_args keys must be 'clip_norm'/'clip_value', got {sorted(unknown)}")
    if saved and not isinstance(optim, GroupedOptim):
        groups = saved.get("param_groups") or [{}]
        args.update({k: v for k, v in groups[0].items() if k != "params" and k != "initial_lr"})
    for key in ("lr",):
        if key in args and not math.isfinite(float(args[key])):
            raise ValueError(f"optimizer {key} must be finite, got {args[key]!r}")
    return ParamOptimizer(kind.from_args(args), dict(clip))


def apply_eagerly(entries: list[tuple[ParamOptimizer, torch.Tensor, torch.Tensor, dict]]) -> None:
    """Apply the updates of ``(optimizer, param, grad, state)`` entries in place, eagerly (the
    steps :class:`~pyro_elbo_ext.CompiledSVI` takes before a structure compiles).

    Plain Adam parameters (no ``clip_args``) with the same hyper-parameters, dtype and device
    are stepped together by torch's own multi-tensor Adam (``torch.optim.adam.adam`` with
    ``foreach=True``: the update ``pyro.optim.Adam`` applies, a few kernels for all of them
    instead of some twenty per parameter); every other entry by its functional update.  The
    state is the functional optimizer's (``step``, ``exp_avg``, ``exp_avg_sq``), so a compiled
    step continues from it.  Call under ``torch.no_grad()``.
    """
    groups: dict[tuple, list] = {}
    for entry in entries:
        optimizer, param = entry[0], entry[1]
        hyper = optimizer.optimizer.hyper
        if type(optimizer.optimizer) is Adam and not optimizer.clip and all(
                isinstance(value, (int, float, tuple)) for value in hyper.values()):
            key = (tuple(sorted(hyper.items())), param.dtype, param.device)
            groups.setdefault(key, []).append(entry)
            continue
        new, new_state = optimizer.update(param, entry[2], entry[3])
        param.copy_(new)
        for slot, tensor in entry[3].items():
            tensor.copy_(new_state[slot])
    for (hyper, _, _), members in groups.items():
        hyper = dict(hyper)
        beta1, beta2 = hyper["betas"]
        multi_tensor_adam(
            [m[1] for m in members], [m[2] for m in members],
            [m[3]["exp_avg"] for m in members], [m[3]["exp_avg_sq"] for m in members], [],
            [m[3]["step"] for m in members], foreach=True, amsgrad=False, beta1=beta1,
            beta2=beta2, lr=hyper["lr"], weight_decay=hyper["weight_decay"], eps=hyper["eps"],
            maximize=False)


__all__ = ["SUPPORTED", "ClippedAdam", "Adam", "SGD", "RMSprop", "FunctionalOptimizer",
           "ParamOptimizer", "apply_eagerly", "check_supported", "clip_gradient",
           "functional_optimizer"]
