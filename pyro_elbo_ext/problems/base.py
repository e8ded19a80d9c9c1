"""The :class:`Problem` record shared by tests, benchmarks, the CLI and the notebooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.poutine as poutine
import torch
from pyro.params import param_with_module_name
from pyro.util import get_rng_state, set_rng_state
from torch.distributions import biject_to, constraints

#: what ``pyro.module`` puts between a module's name and its parameters' ("$$$")
MODULE_DIVIDER = param_with_module_name("", "")


@dataclass
class Problem:
    """A named inference problem: a model, a guide, data, and exact answers where known.

    Attributes
    ----------
    name, description : str
    model, guide : callable
        Ordinary Pyro callables taking ``*args, **kwargs``.
    args : tuple
        The data (and any other positional inputs) to pass to model and guide.
    kwargs : dict
        Keyword inputs to pass to model and guide.
    init_params : dict of str to Tensor
        Constrained starting values of every ``pyro.param`` the model and guide read
        (a deliberately misfit guide), ``pyro.module`` parameters included under their
        param-store names (``"decoder$$$fc.weight"``: ``pyro.params.param_with_module_name``).
    param_constraints : dict of str to Constraint
        The constraint of each parameter (real where absent).
    posterior_params : dict of str to Tensor or None
        Guide parameter values at which q equals the exact posterior, where one exists.
    log_evidence : float or None
        log p(X) in closed form (or by exact enumeration).
    exact_elbo : callable or None
        ``exact_elbo(params) -> Tensor``: L(q) in closed form (or by exact enumeration) for any
        parameter values given as a dict of constrained tensors; differentiable, so its
        autograd gradient is the exact dL.
    max_plate_nesting : int
        The number of nested plates the model declares.
    notes : dict
        Free-form facts about the problem (e.g. the generating parameters).
    """

    name: str
    description: str
    model: Callable
    guide: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    init_params: dict[str, torch.Tensor] = field(default_factory=dict)
    param_constraints: dict[str, constraints.Constraint] = field(default_factory=dict)
    posterior_params: dict[str, torch.Tensor] | None = None
    log_evidence: float | None = None
    exact_elbo: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None = None
    max_plate_nesting: int = 1
    notes: dict = field(default_factory=dict)

    def constraint(self, name: str) -> constraints.Constraint:
        """The constraint of parameter ``name``."""
        return self.param_constraints.get(name, constraints.real)

    def set_params(self, values: dict[str, torch.Tensor] | None = None) -> None:
        """Clear Pyro's param store and load ``values`` (default: ``init_params``).

        Parameters missing from ``values`` take their ``init_params`` value.  A ``pyro.module``
        parameter keeps being the tensor the module computes with: its value is written into
        the module's own parameter, which becomes the store's leaf (see
        :meth:`module_parameters`), so that SVI trains it and gradients are read from it
        whether the module is registered with ``update_module_params=True`` or with Pyro's
        default ``False`` (where a fresh store tensor would get no gradient at all).
        """
        pyro.clear_param_store()
        merged = {**self.init_params, **(values or {})}
        for name, value in merged.items():
            pyro.param(name, value.detach().clone(), constraint=self.constraint(name))
        store = pyro.get_param_store()
        for name, own in self.module_parameters().items():
            leaf = store[name].unconstrained()
            if own is leaf:
                continue
            if self.constraint(name) is not constraints.real:
                raise ValueError(
                    f"problem '{self.name}': module parameter '{name}' has the constraint "
                    f"{self.constraint(name)}, but a pyro.module computes with its own "
                    "unconstrained tensor; drop it from param_constraints"
                )
            with torch.no_grad():
                own.copy_(leaf)
            del store[name]
            pyro.param(name, own)

    def module_parameters(self) -> dict[str, torch.Tensor]:
        """The tensors that ``pyro.module`` registrations in the model and guide compute with,
        by param-store name, for the ``init_params`` entries that have one.

        ``pyro.module(name, net)`` registers each parameter of ``net`` with
        ``pyro.param(name + "$$$" + param_name, parameter)``; with Pyro's default
        ``update_module_params=False`` the module keeps computing with ``parameter`` even when
        the store holds another tensor under that name; with ``update_module_params=True`` it
        takes the store's tensor when it runs.  Found by running the guide and the model twice
        (the second run sees each module as it stays; without gradients, Pyro's random state
        restored); empty, and nothing is run, when no ``init_params`` name is a module's.
        """
        listed = {n for n in self.init_params if MODULE_DIVIDER in n}
        if not listed:
            return {}
        state = get_rng_state()
        try:
            with torch.no_grad():
                for _ in range(2):
                    traces = [poutine.trace(fn).get_trace(*self.args, **self.kwargs)
                              for fn in (self.guide, self.model)]
        finally:
            set_rng_state(state)
        found = {}
        for trace in traces:
            for name, site in trace.nodes.items():
                if (site["type"] == "param" and name in listed and len(site["args"]) > 1
                        and isinstance(site["args"][1], torch.Tensor)):
                    found[name] = site["args"][1]
        return found

    def unlisted_params(self) -> list[str]:
        """Names in Pyro's param store that ``init_params`` does not list: parameters that
        :meth:`set_params` neither resets nor a comparison measures."""
        return sorted(set(pyro.get_param_store().keys()) - set(self.init_params))

    def set_posterior(self) -> None:
        """Load the exact posterior into the guide (the other parameters at their start)."""
        if self.posterior_params is None:
            raise ValueError(f"problem '{self.name}' has no closed-form posterior")
        self.set_params(self.posterior_params)

    def unconstrained_params(self) -> dict[str, torch.Tensor]:
        """The param store's leaf tensors (the ones SVI optimizes), by name."""
        store = pyro.get_param_store()
        return {name: store[name].unconstrained() for name in self.init_params}

    def exact_elbo_and_grad(self) -> tuple[float, dict[str, torch.Tensor]]:
        """Closed-form L at the param store's values and its gradient wrt the unconstrained leaves.

        The gradient is what an ELBO's surrogate gradient (on the same leaves) estimates.
        """
        if self.exact_elbo is None:
            raise ValueError(f"problem '{self.name}' has no closed-form L")
        leaves = {
            name: leaf.detach().clone().requires_grad_(True)
            for name, leaf in self.unconstrained_params().items()
        }
        values = {name: biject_to(self.constraint(name))(leaf) for name, leaf in leaves.items()}
        elbo = self.exact_elbo(values)
        grads = torch.autograd.grad(elbo, list(leaves.values()), allow_unused=True)
        return float(elbo.detach()), {
            name: torch.zeros_like(leaf) if g is None else g
            for (name, leaf), g in zip(leaves.items(), grads)
        }
