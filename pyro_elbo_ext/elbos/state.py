"""State as named tensors that each update replaces: the container of every learning signal.

:class:`StateSlots` holds a learning-signal part's state (a baseline's running average, a
network's weights and Adam moments, a normalizer's running variance) as a flat dict of tensors
keyed ``(site, what, ...)``.  An update computes the new tensors from the old ones and rebinds
the entries; it never writes into a tensor.  So the update is a pure function of the old state
and the step's observations, and the same code runs eagerly and traced into a compiled step,
which takes the tensors as inputs and returns the new ones (the loss's ``carried_state``).

Helpers: :func:`all_finite` (a 0-dim boolean, no Python read), :func:`warn_skipped`,
:func:`check_setting`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .tracing import graph_tracing

#: a state tensor's key within its object: ``(site, what, ...)``
SlotKey = tuple


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A 0-dim boolean tensor: every element of every tensor is finite (no Python read)."""
    flags = [torch.isfinite(t).all() for t in tensors]
    return torch.stack(flags).all() if len(flags) > 1 else flags[0]


def warn_skipped(what: str, site: str) -> None:
    """The warning of an update skipped for a non-finite input."""
    warnings.warn(
        f"the {what} of site '{site}' was not updated: this step's learning signal is not "
        "finite (a NaN or infinite reward or baseline input); the last finite state is kept",
        RuntimeWarning,
        stacklevel=5,
    )


def check_setting(kind: str, name: str, saved, own) -> None:
    """Refuse a checkpoint saved with another value of a setting, naming both values."""
    if saved != own:
        raise ValueError(
            f"cannot load the {kind} state: it was saved with {name}={saved!r}, but this loss "
            f"has {name}={own!r}; build the loss with {name}={saved!r} to continue from the "
            "checkpoint"
        )


class StateSlots(nn.Module):
    """State held as named tensors that each update *replaces* (it never writes in place).

    ``slots`` maps ``(site, what, ...)`` to a tensor, created with its initial value the first
    time the forward pass reads it.  Because an update only rebinds entries, the same code is
    the eager update and, traced, the graph's.  Every update also sets ``(site, "skipped")``,
    true when it was skipped for a non-finite input (:meth:`settle`).
    """

    #: how warnings name this object
    what = "state"

    def __init__(self):
        super().__init__()
        self.slots: dict[SlotKey, torch.Tensor] = {}

    def settle(self, site: str, ok: torch.Tensor) -> None:
        """Record whether ``site``'s update was taken; eager, warn at once if it was not."""
        self.slots[(site, "skipped")] = ~ok
        if not graph_tracing() and not bool(ok):
            warn_skipped(self.what, site)

    def skipped_sites(self) -> list[str]:
        """The sites whose last update was skipped (one read of all flags)."""
        flags = [(key[0], flag) for key, flag in self.slots.items() if key[1:] == ("skipped",)]
        if not flags or not bool(torch.stack([f for _, f in flags]).any()):
            return []
        return [site for site, flag in flags if bool(flag)]

    def saved_slots(self) -> dict:
        """The state for a checkpoint (the per-step skip flags are not state)."""
        return {k: v.detach().clone() for k, v in self.slots.items() if k[1:] != ("skipped",)}

    def load_slots(self, saved: dict) -> None:
        """Take the tensors of a checkpoint (copies), with fresh skip flags."""
        self.slots.update({k: v.detach().clone() for k, v in saved.items()})
        for site in {key[0] for key in saved}:
            device = saved[next(k for k in saved if k[0] == site)].device
            self.slots.setdefault((site, "skipped"),
                                  torch.zeros((), dtype=torch.bool, device=device))


def add_network(slots: dict, site: str, net: nn.Module, optimizer,
                like: torch.Tensor) -> None:
    """Put ``net``'s weights and ``optimizer``'s initial state for each into ``slots`` (keys
    ``(site, "weight", name)`` and ``(site, "adam", name, key)``), with a fresh skip flag: a
    network whose weights are state (the learned baseline, RELAX's control variates)."""
    slots[(site, "skipped")] = torch.zeros((), dtype=torch.bool, device=like.device)
    for name, param in net.named_parameters():
        slots[(site, "weight", name)] = param.detach().clone()
        for key, value in optimizer.init_state(param).items():
            slots[(site, "adam", name, key)] = value


def network_weights(slots: dict, site: str) -> dict[str, torch.Tensor]:
    """The weights :func:`add_network` put into ``slots`` for ``site``, by parameter name."""
    return {key[2]: value for key, value in slots.items()
            if key[0] == site and key[1] == "weight"}


def step_network(slots: dict, site: str, weights: dict, grads, ok: torch.Tensor, optimizer,
                 keys: tuple[str, ...]) -> None:
    """One step of ``optimizer`` (a pure one, :mod:`pyro_elbo_ext.functional_optim`) on the
    network's weights, replacing the slots; where ``ok`` is false, every tensor keeps its
    value (a non-finite step is skipped)."""
    for (name, weight), grad in zip(weights.items(), grads):
        state = {key: slots[(site, "adam", name, key)] for key in keys}
        new_weight, new_state = optimizer.update(weight, grad, state)
        slots[(site, "weight", name)] = torch.where(ok, new_weight, weight)
        for key in keys:
            slots[(site, "adam", name, key)] = torch.where(ok, new_state[key], state[key])


__all__ = ["SlotKey", "StateSlots", "add_network", "all_finite", "check_setting",
           "network_weights", "step_network", "warn_skipped"]
