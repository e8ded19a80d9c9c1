r"""Exact answers for gradient estimators of :math:`\mathbb{E}_{q_\alpha(b)}[f(b)]`, by enumeration.

For :math:`n` independent discrete variables (Bernoulli with logits :math:`\alpha_i`, or
Categorical with logits :math:`\alpha_{i\cdot}`) and any :math:`f` given on the configurations:

* :func:`exact_expectation` -- :math:`\mathbb{E}[f] = \sum_b q_\alpha(b) f(b)`, differentiable,
  so its autograd gradient is the exact :math:`\nabla_\alpha \mathbb{E}[f]`;
  :func:`exact_gradient` returns that gradient;
* :func:`exact_variance` -- the exact per-coordinate variance of an estimator of that gradient
  at :math:`E` evaluations of :math:`f`:

  - ``"reinforce"``: :math:`\mathrm{Var}[f(b)\, s(b)] / K`, :math:`K = E` independent samples,
    with the score :math:`s(b) = \nabla_\alpha \log q_\alpha(b)`, which is
    :math:`b - \sigma(\alpha)` for Bernoulli and
    :math:`\mathrm{onehot}(b) - \mathrm{softmax}(\alpha)` for Categorical;
  - ``"loo"``: the leave-one-out estimator with :math:`K = E` samples, by enumerating all
    :math:`C^K` ordered :math:`K`-tuples of configurations (refused beyond
    :data:`MAX_TUPLES`);
  - ``"disarm"`` (Bernoulli): :math:`m = E/2` independent antithetic pairs; the pair
    :math:`(b_i, \tilde b_i)` of each dimension has probabilities
    :math:`P(1,1) = \max(0, 2p-1)`, :math:`P(0,0) = \max(0, 1-2p)`,
    :math:`P(1,0) = P(0,1) = \min(p, 1-p)`, and the estimate is a function of the pair, so the
    :math:`4^n` joint pairs give its variance exactly, divided by :math:`m`.

These are written from the formulas, independently of
:mod:`pyro_elbo_ext.elbos.discrete_estimators`, whose Monte Carlo draws the tests compare
against them.  ``f`` takes a batch of configurations: for Bernoulli a float tensor ``(C, n)``
of 0/1, for Categorical a one-hot float tensor ``(C, n, K)``, and returns ``(C,)``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

#: the largest number of K-tuples :func:`exact_variance` enumerates for the leave-one-out case
MAX_TUPLES = 2_000_000


def configurations(logits: torch.Tensor, family: str) -> torch.Tensor:
    """Every configuration of the variables, in :func:`exact_expectation`'s order.

    Bernoulli (``logits`` of shape ``(n,)``): ``(2**n, n)`` floats in {0, 1}.
    Categorical (``(n, K)``): ``(K**n, n, K)`` one-hot floats.
    """
    if family == "bernoulli":
        n = logits.shape[-1]
        rows = list(itertools.product((0.0, 1.0), repeat=n))
        return torch.tensor(rows, dtype=logits.dtype, device=logits.device)
    if family == "categorical":
        n, k = logits.shape[-2:]
        rows = torch.tensor(list(itertools.product(range(k), repeat=n)), device=logits.device)
        return torch.nn.functional.one_hot(rows, k).to(logits.dtype)
    raise ValueError(f"family must be 'bernoulli' or 'categorical', got {family!r}")


def log_probabilities(logits: torch.Tensor, configs: torch.Tensor, family: str) -> torch.Tensor:
    """:math:`\\log q_\\alpha(b)` of each configuration, ``(C,)``, differentiable in ``logits``."""
    if family == "bernoulli":
        log_p = torch.nn.functional.logsigmoid(logits)
        log_not_p = torch.nn.functional.logsigmoid(-logits)
        return (configs * log_p + (1 - configs) * log_not_p).sum(-1)
    return (configs * torch.log_softmax(logits, -1)).sum((-1, -2))


def scores(logits: torch.Tensor, configs: torch.Tensor, family: str) -> torch.Tensor:
    """:math:`\\nabla_\\alpha \\log q_\\alpha(b)` of each configuration, ``(C, *logits.shape)``."""
    logits = logits.detach()
    if family == "bernoulli":
        return configs - torch.sigmoid(logits)
    return configs - torch.softmax(logits, -1)


def exact_expectation(
    f: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, family: str
) -> torch.Tensor:
    r""":math:`\mathbb{E}_{q_\alpha}[f(b)]` by enumeration (differentiable in ``logits``)."""
    configs = configurations(logits, family)
    return (log_probabilities(logits, configs, family).exp() * f(configs).detach()).sum()


def exact_gradient(
    f: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, family: str
) -> torch.Tensor:
    r"""The exact :math:`\nabla_\alpha \mathbb{E}_{q_\alpha}[f(b)]`, shaped like ``logits``."""
    leaf = logits.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(exact_expectation(f, leaf, family), leaf)
    return grad


def _moments(probs: torch.Tensor, estimates: torch.Tensor) -> torch.Tensor:
    """Per-coordinate variance of a discrete random vector: ``probs`` (N,), ``estimates``
    (N, ...)."""
    w = probs.reshape((-1,) + (1,) * (estimates.dim() - 1))
    mean = (w * estimates).sum(0)
    return (w * (estimates - mean) ** 2).sum(0)


def exact_variance(
    estimator: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    family: str,
    evaluations: int,
) -> torch.Tensor:
    """The exact per-coordinate variance of ``estimator`` at ``evaluations`` evaluations of f.

    Parameters
    ----------
    estimator : {"reinforce", "loo", "disarm"}
    f : callable
        ``f(configs) -> (C,)`` (see the module docstring).
    logits : Tensor
        ``(n,)`` for Bernoulli, ``(n, K)`` for Categorical.
    family : {"bernoulli", "categorical"}
    evaluations : int
        Evaluations of ``f`` per estimate: ``K`` samples, or ``2m`` for ``m`` DisARM pairs.

    Returns
    -------
    Tensor
        Shaped like ``logits``; sum it for the total variance (trace of the covariance).

    Raises
    ------
    ValueError
        For an estimator without an exact variance here, too few or an odd number of
        evaluations for the estimator, or a leave-one-out enumeration beyond
        :data:`MAX_TUPLES` tuples.
    """
    logits = logits.detach()
    configs = configurations(logits, family)
    probs = log_probabilities(logits, configs, family).exp()
    values = f(configs).detach().to(logits.dtype)
    score = scores(logits, configs, family)
    expand = (-1,) + (1,) * logits.dim()
    if estimator == "reinforce":
        return _moments(probs, values.reshape(expand) * score) / evaluations
    if estimator == "loo":
        k = evaluations
        if k < 2:
            raise ValueError("the leave-one-out estimator needs evaluations >= 2")
        count = configs.shape[0] ** k
        if count > MAX_TUPLES:
            raise ValueError(
                f"the leave-one-out variance at {k} samples enumerates {count:,} tuples "
                f"(more than {MAX_TUPLES:,}); estimate it by Monte Carlo instead"
            )
        index = torch.cartesian_prod(*[torch.arange(configs.shape[0])] * k).reshape(-1, k)
        tuple_probs = probs[index].prod(-1)
        f_k = values[index]  # (T, k)
        others = (f_k.sum(-1, keepdim=True) - f_k) / (k - 1)
        signal = (f_k - others).reshape(f_k.shape + (1,) * logits.dim())
        estimate = (signal * score[index]).mean(1)
        return _moments(tuple_probs, estimate)
    if estimator == "disarm":
        if family != "bernoulli":
            raise ValueError("DisARM is defined for Bernoulli variables only")
        if evaluations < 2 or evaluations % 2:
            raise ValueError("DisARM needs an even number of evaluations (antithetic pairs)")
        p = torch.sigmoid(logits)
        # per-dimension joint of (b_i, b~_i): rows (0,0), (0,1), (1,0), (1,1)
        table = torch.stack([(1 - 2 * p).clamp(min=0), torch.minimum(p, 1 - p),
                             torch.minimum(p, 1 - p), (2 * p - 1).clamp(min=0)], -1)
        n = logits.shape[-1]
        pairs = list(itertools.product(range(4), repeat=n))
        pair_index = torch.tensor(pairs)  # (4^n, n)
        joint = table[torch.arange(n), pair_index].prod(-1)
        b = (pair_index >= 2).to(logits.dtype)
        b_tilde = (pair_index % 2).to(logits.dtype)
        f_b, f_bt = f(b).detach(), f(b_tilde).detach()
        sign = 1.0 - 2.0 * b_tilde
        weight = 0.5 * sign * (b != b_tilde).to(logits.dtype) * torch.sigmoid(logits.abs())
        estimate = (f_b - f_bt).unsqueeze(-1) * weight
        return _moments(joint, estimate) / (evaluations // 2)
    raise ValueError(
        f"no exact variance for estimator {estimator!r}; exact: 'reinforce', 'loo', 'disarm'"
    )


__all__ = [
    "MAX_TUPLES",
    "configurations",
    "exact_expectation",
    "exact_gradient",
    "exact_variance",
    "log_probabilities",
    "scores",
]
