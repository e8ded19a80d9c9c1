"""Monte Carlo helpers for tests: draws of L and dL, and standard-error tolerances.

Every Monte Carlo assertion in the suite compares an estimate with an exact value using a
tolerance that is a stated multiple ``K_SE`` of the estimate's own standard error.
"""

from __future__ import annotations

import torch

#: tolerance multiple of the standard error for Monte Carlo assertions (two-sided z-test)
K_SE = 4.0


def draw_loss_and_grads(elbo, problem, num_draws: int):
    """``num_draws`` independent (L, dL) draws of ``elbo`` at the param store's values.

    Returns
    -------
    values : Tensor, shape (num_draws,)
        Draws of L (the negated loss).
    grads : dict of str to Tensor, each (num_draws, *param_shape)
        Draws of dL wrt the unconstrained leaves of the problem's parameters.
    """
    leaves = problem.unconstrained_params()
    values, grads = [], {name: [] for name in leaves}
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args,
                                        **problem.kwargs)
        gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        values.append(-loss.detach())
        for (name, leaf), g in zip(leaves.items(), gs):
            grads[name].append(torch.zeros_like(leaf) if g is None else -g)
    return torch.stack(values), {name: torch.stack(v) for name, v in grads.items()}


def standard_error(draws: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean along dim 0."""
    return draws.std(0) / draws.shape[0] ** 0.5


def assert_mean_close(draws: torch.Tensor, exact, k: float = K_SE, atol: float = 1e-9, what=""):
    """The mean of ``draws`` is within ``k`` standard errors of ``exact`` (elementwise).

    ``atol`` is a floating-point floor for estimators whose draws are all equal (zero variance).
    """
    exact = torch.as_tensor(exact, dtype=draws.dtype)
    mean, se = draws.mean(0), standard_error(draws)
    bound = k * se + atol * (1 + exact.abs())
    err = (mean - exact).abs()
    assert bool((err <= bound).all()), (
        f"{what}: mean {mean} vs exact {exact}; |error| {err} exceeds {k} SE = {k * se}"
    )
