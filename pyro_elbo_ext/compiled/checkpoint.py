"""Pyro's checkpoint recipe on the optimizer a :class:`~pyro_elbo_ext.CompiledSVI` steps with.

Pyro saves an optimizer with ``optim.get_state()`` / ``optim.save(path)`` and restores it with
``optim.set_state(state)`` / ``optim.load(path)``.  :class:`~pyro_elbo_ext.CompiledSVI` keeps
the optimizer's state itself (as tensors its compiled graph updates), so the
:class:`pyro.optim.PyroOptim` passed to it would hold nothing to save.  :func:`adopt` routes
that optimizer's ``get_state`` and ``set_state`` (and so ``save`` and ``load``, which call them)
through every CompiledSVI using it: ``get_state`` returns the optimizer's own state (steps taken
under :class:`pyro.infer.SVI`) updated with each CompiledSVI's, ``set_state`` hands the state to
the optimizer (for :class:`pyro.infer.SVI`) and to each CompiledSVI.
"""

from __future__ import annotations

import functools
import weakref

#: optimizer -> the CompiledSVIs that step with it
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def own_state(optim) -> dict:
    """The optimizer's own state (its class's ``get_state``), whatever :func:`adopt` routed."""
    return type(optim).get_state(optim)


def adopt(optim, svi) -> None:
    """Route ``optim.get_state`` / ``set_state`` (so ``save`` / ``load``) through ``svi`` too."""
    owners = _OWNERS.get(optim)
    if owners is None:
        owners = _OWNERS[optim] = weakref.WeakSet()
        # instance attributes (partials of module functions, so the optimizer still pickles)
        optim.get_state = functools.partial(_get_state, optim)
        optim.set_state = functools.partial(_set_state, optim)
    owners.add(svi)


def _get_state(optim) -> dict:
    state = own_state(optim)
    for svi in list(_OWNERS.get(optim, ())):
        state.update(svi.get_state())
    return state


def _set_state(optim, state: dict) -> None:
    type(optim).set_state(optim, state)
    for svi in list(_OWNERS.get(optim, ())):
        svi.set_state(state)
