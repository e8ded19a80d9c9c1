"""The :class:`Problem` record shared by tests, benchmarks, the CLI and the notebooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from torch.distributions import biject_to, constraints


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
        (a deliberately misfit guide).
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

        Parameters missing from ``values`` take their ``init_params`` value.
        """
        pyro.clear_param_store()
        merged = {**self.init_params, **(values or {})}
        for name, value in merged.items():
            pyro.param(name, value.detach().clone(), constraint=self.constraint(name))

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
