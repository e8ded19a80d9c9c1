"""Bayesian logistic regression on scikit-learn's bundled breast-cancer data (no download)."""

from __future__ import annotations

import torch

from .._extras import require
from .base import Problem
from .logistic import logistic_problem


def load_breast_cancer_standardized(
    num_data: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wisconsin breast-cancer data (569 x 30), standardized, with an intercept column.

    Each feature is centred and scaled to unit standard deviation over the whole data set, then
    a column of ones is prepended.  ``num_data`` takes a seeded random subset of the rows.

    Returns
    -------
    features : Tensor, shape (N, 31), float64
    labels : Tensor, shape (N,), float64 in {0, 1} (1 = benign)
    """
    datasets = require("sklearn.datasets", "compare", "the breast-cancer data set")
    data = datasets.load_breast_cancer()
    features = torch.as_tensor(data.data, dtype=torch.float64)
    labels = torch.as_tensor(data.target, dtype=torch.float64)
    features = (features - features.mean(0)) / features.std(0)
    features = torch.cat([torch.ones(features.shape[0], 1, dtype=torch.float64), features], -1)
    if num_data is not None:
        if not 1 <= num_data <= features.shape[0]:
            raise ValueError(f"num_data must be in 1..{features.shape[0]}, got {num_data}")
        order = torch.randperm(features.shape[0], generator=torch.Generator().manual_seed(seed))
        features, labels = features[order[:num_data]], labels[order[:num_data]]
    return features, labels


def logistic_breast_cancer(
    num_data: int | None = None,
    prior_scale: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> Problem:
    """Bayesian logistic regression on the breast-cancer data; mean-field Normal guide.

    Model::

        w ~ Normal(0, prior_scale^2 I_D)                 (D = 31: intercept + 30 features)
        y_i | w ~ Bernoulli(logits = x_i . w)            (plate "data"; vectorizable over w)

    Guide: q(w) = Normal(w_loc, diag w_scale^2), starting at w_loc = 0, w_scale = 0.1.

    The posterior, L and log p(X) have no closed form (``exact_elbo`` and ``log_evidence`` are
    None): gradient bias is measured against a many-sample reference estimate.
    """
    dtype = dtype or torch.get_default_dtype()
    features, labels = load_breast_cancer_standardized(num_data, seed)
    features = features.to(dtype=dtype, device=device)
    labels = labels.to(dtype=dtype, device=device)
    num_features = features.shape[-1]

    return logistic_problem(
        name="logistic_breast_cancer",
        description="Bayesian logistic regression on sklearn's breast-cancer data (standardized)",
        features=features,
        labels=labels,
        prior_scale=prior_scale,
        init_scale=0.1,
        notes={"num_data": features.shape[0], "num_features": num_features,
               "prior_scale": prior_scale,
               "data": "sklearn.datasets.load_breast_cancer, standardized, intercept first"},
    )


__all__ = ["load_breast_cancer_standardized", "logistic_breast_cancer"]
