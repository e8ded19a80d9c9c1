"""Pyro's ``score_parts`` protocol decides each site's gradient estimator (``elbos/densities.py``).

A rejection-sampled guide site (Pyro's ``Rejector`` family) is reparameterized *and* has a score
function: dropping the score term biases the gradient.  Reference: the exact gradient of the
closed-form L of a Gamma-Poisson model with a Gamma guide (autograd of the formula), and Pyro's
``Trace_ELBO``; tolerance ``K_SE`` standard errors of the mean over draws.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.testing.rejection_gamma import RejectionGamma, ShapeAugmentedGamma
from pyro.infer import Trace_ELBO

from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, JensenELBO
from pyro_elbo_ext.elbos.densities import MIXED, PATHWISE, SCORE_FUNCTION, gradient_kind

from .mc import assert_mean_close

PRIOR = (2.0, 1.0)
COUNTS = torch.tensor([3.0, 1.0, 4.0, 2.0, 0.0])


def _model():
    rate = pyro.sample("rate", dist.Gamma(*PRIOR))
    with pyro.plate("data", len(COUNTS)):
        pyro.sample("x", dist.Poisson(rate), obs=COUNTS)


def _guide_of(family):
    def guide():
        log_alpha = pyro.param("log_alpha", torch.tensor(0.4))
        log_beta = pyro.param("log_beta", torch.tensor(0.1))
        pyro.sample("rate", family(log_alpha.exp(), log_beta.exp()))

    return guide


def _exact_L(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> torch.Tensor:
    """E_q[log p(z) + log p(x|z)] + H[q] for q = Gamma(alpha, beta), in closed form."""
    alpha, beta = log_alpha.exp(), log_beta.exp()
    a0, b0 = PRIOR
    e_z = alpha / beta
    e_log_z = torch.digamma(alpha) - log_beta
    log_prior = a0 * torch.log(torch.tensor(b0)) - torch.lgamma(torch.tensor(a0)) \
        + (a0 - 1) * e_log_z - b0 * e_z
    log_lik = (COUNTS.sum() * e_log_z - len(COUNTS) * e_z - torch.lgamma(COUNTS + 1).sum())
    entropy = alpha - log_beta + torch.lgamma(alpha) + (1 - alpha) * torch.digamma(alpha)
    return log_prior + log_lik + entropy


def _exact_gradient():
    log_alpha = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    log_beta = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    return torch.autograd.grad(_exact_L(log_alpha, log_beta), (log_alpha, log_beta))


def _gradient_draws(elbo, guide, num_draws: int):
    draws = []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(_model, guide)
        leaves = [pyro.param(n).unconstrained() for n in ("log_alpha", "log_beta")]
        draws.append(torch.stack(torch.autograd.grad(-loss, leaves)))
    return torch.stack(draws)


def test_gradient_kind_reads_score_parts():
    assert gradient_kind(dist.Normal(0.0, 1.0)) == PATHWISE
    assert gradient_kind(dist.Normal(torch.zeros(2), 1.0).to_event(1).mask(True)) == PATHWISE
    assert gradient_kind(dist.Categorical(logits=torch.zeros(3))) == SCORE_FUNCTION
    assert gradient_kind(RejectionGamma(torch.tensor(2.0), torch.tensor(1.0))) == MIXED
    assert gradient_kind(
        ShapeAugmentedGamma(torch.tensor(2.0), torch.tensor(1.0)).expand([3])) == MIXED


@pytest.mark.parametrize("family", [RejectionGamma, ShapeAugmentedGamma],
                         ids=["RejectionGamma", "ShapeAugmentedGamma"])
@pytest.mark.parametrize("loss", ["jensen_sampled", "jensen_analytic", "analytic_kl",
                                  "hard_attention", "trace_elbo"])
def test_rejection_sampled_guide_gradient_is_unbiased(family, loss):
    make = {
        "jensen_sampled": lambda: JensenELBO(entropy="sampled", num_particles=50,
                                             vectorize_particles=True, max_plate_nesting=1),
        "jensen_analytic": lambda: JensenELBO(num_particles=50, vectorize_particles=True,
                                              max_plate_nesting=1),
        "analytic_kl": lambda: AnalyticKLELBO(num_particles=50, vectorize_particles=True,
                                              max_plate_nesting=1),
        "hard_attention": lambda: HardAttentionELBO(estimator="reinforce", num_particles=50,
                                                    vectorize_particles=True,
                                                    max_plate_nesting=1),
        "trace_elbo": lambda: Trace_ELBO(num_particles=50, vectorize_particles=True,
                                         max_plate_nesting=1),
    }[loss]
    torch.set_default_dtype(torch.float64)
    try:
        pyro.set_rng_seed(11)
        guide = _guide_of(family)
        draws = _gradient_draws(make(), guide, 120)
    finally:
        torch.set_default_dtype(torch.float32)
    exact = torch.stack(_exact_gradient())
    assert_mean_close(draws, exact, what=f"{loss} with a {family.__name__} guide")
