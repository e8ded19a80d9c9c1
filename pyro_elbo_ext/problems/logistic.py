"""Bayesian logistic regression on synthetic data with known generating weights."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from .base import Problem


def logistic_regression(
    num_data: int = 200,
    num_features: int = 5,
    subsample_size: int | None = None,
    prior_scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """Bayesian logistic regression with a diagonal-Normal guide; no closed form.

    Data: ``x_i ~ N(0, I_D)``, ``w_true ~ N(0, I_D)`` and
    ``y_i ~ Bernoulli(sigmoid(x_i . w_true))``, all drawn from a ``torch.Generator`` seeded
    with ``seed`` (``w_true`` is in ``notes``).

    Model::

        w ~ Normal(0, prior_scale^2 I_D)                  (one site, event dim D)
        y_i | w ~ Bernoulli(logits = x_i . w)             (plate "data", optional subsampling)

    Guide: ``q(w) = Normal(w_loc, diag w_scale^2)``, starting at ``w_loc = 0``,
    ``w_scale = 0.5``.  The logits are ``(x * w).sum(-1)``, so the model and guide vectorize
    over particles.

    ``exact_elbo``, ``posterior_params`` and ``log_evidence`` are None.
    """
    if num_data < 1 or num_features < 1:
        raise ValueError(
            f"num_data and num_features must be >= 1, got {num_data} and {num_features}"
        )
    if subsample_size is not None and not 1 <= subsample_size <= num_data:
        raise ValueError(f"subsample_size must be in 1..num_data={num_data}, got {subsample_size}")
    dtype = dtype or torch.get_default_dtype()
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(num_features, generator=gen, dtype=torch.float64)
    x = torch.randn(num_data, num_features, generator=gen, dtype=torch.float64)
    y = (torch.rand(num_data, generator=gen, dtype=torch.float64) < torch.sigmoid(x @ w_true))
    x = x.to(dtype=dtype, device=device)
    y = y.to(dtype=dtype, device=device)

    return logistic_problem(
        name="logistic_regression",
        description="Bayesian logistic regression on synthetic data; q(w) = diagonal Normal",
        features=x,
        labels=y,
        prior_scale=prior_scale,
        init_scale=0.5,
        subsample_size=subsample_size,
        notes={"w_true": w_true.tolist(), "num_data": num_data, "num_features": num_features,
               "prior_scale": prior_scale, "subsample_size": subsample_size},
    )


def logistic_problem(
    name: str,
    description: str,
    features: torch.Tensor,
    labels: torch.Tensor,
    prior_scale: float,
    init_scale: float,
    subsample_size: int | None = None,
    notes: dict | None = None,
) -> Problem:
    """Bayesian logistic regression on given data, with a diagonal-Normal guide.

    Model::

        w ~ Normal(0, prior_scale^2 I_D)                  (one site, event dim D)
        y_i | w ~ Bernoulli(logits = x_i . w)             (plate "data", optional subsampling)

    Guide: ``q(w) = Normal(w_loc, diag w_scale^2)`` from ``w_loc = 0``, ``w_scale = init_scale``.
    The logits are ``(x * w).sum(-1)``, so model and guide vectorize over particles.
    """
    num_features = features.shape[-1]

    def model(features, labels):
        prior = dist.Normal(
            features.new_zeros(num_features), features.new_full((num_features,), prior_scale)
        )
        w = pyro.sample("w", prior.to_event(1))
        with pyro.plate("data", features.shape[0], subsample_size=subsample_size) as idx:
            if subsample_size is not None:  # a full plate needs no gather of the data
                features, labels = features[idx], labels[idx]
            logits = (features * w).sum(-1)
            pyro.sample("obs", dist.Bernoulli(logits=logits), obs=labels)

    def guide(features, labels):
        loc = pyro.param("w_loc", lambda: features.new_zeros(num_features))
        scale = pyro.param(
            "w_scale",
            lambda: features.new_full((num_features,), init_scale),
            constraint=constraints.positive,
        )
        pyro.sample("w", dist.Normal(loc, scale).to_event(1))

    return Problem(
        name=name,
        description=description,
        model=model,
        guide=guide,
        args=(features, labels),
        init_params={
            "w_loc": features.new_zeros(num_features),
            "w_scale": features.new_full((num_features,), init_scale),
        },
        param_constraints={"w_scale": constraints.positive},
        max_plate_nesting=1,
        notes=notes or {},
    )


__all__ = ["logistic_problem", "logistic_regression"]
