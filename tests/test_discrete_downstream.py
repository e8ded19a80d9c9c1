"""The discrete estimators meet the reward Rao-Blackwellized by the data flow (issue 23's rule,
:mod:`pyro_elbo_ext.elbos.downstream`), and Pyro's per-site baselines where they can act.

Independent sites each with its own factor: a site's reward holds only its own terms, so its
gradient cannot move when another site's factor is scaled (exact, draw for draw), and every
estimator stays unbiased against enumeration (4 standard errors, fixed seed).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_ext import JensenELBO
from tests.mc import assert_mean_close

R = 200  # independent copies per call
CALLS = 100
T = torch.tensor([0.45, 0.55, 0.3], dtype=torch.float64)
HALF = torch.tensor(0.5, dtype=torch.float64)


def independent_model(scale_last=1.0):
    def model():
        with pyro.plate("copies", R, dim=-1):
            for i in range(3):
                b = pyro.sample(f"b{i}", dist.Bernoulli(HALF))
                scale = scale_last if i == 2 else 1.0
                pyro.factor(f"f{i}", -scale * (b - T[i]) ** 2)
    return model


def independent_guide(infer=None):
    def guide():
        a = pyro.param("a", torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64))
        with pyro.plate("copies", R, dim=-1):
            for i in range(3):
                pyro.sample(f"b{i}", dist.Bernoulli(logits=a[i]), infer=dict(infer or {}))
    return guide


def _exact():
    """dL/da of one copy, each site enumerated on its own (the sites are independent)."""
    a = pyro.param("a").detach().clone().requires_grad_()
    total = 0.0
    for b in (0.0, 1.0):
        b = torch.tensor(b, dtype=torch.float64)
        log_q = dist.Bernoulli(logits=a).log_prob(b)
        log_p = dist.Bernoulli(HALF).log_prob(b)
        total = total + (log_q.exp() * (log_p - (b - T) ** 2 - log_q)).sum()
    return torch.autograd.grad(total, a)[0]


def _loss(estimator, **kwargs):
    return JensenELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1,
                      discrete_estimator=estimator, entropy="sampled", **kwargs)


def _gradient(elbo, model, guide, seed):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide()
    leaf = pyro.param("a").unconstrained()
    return torch.autograd.grad(elbo.differentiable_loss(model, guide), leaf)[0]


@pytest.mark.parametrize("estimator", ["reinforce", "loo", "disarm", "relax"])
def test_a_site_does_not_meet_the_terms_it_cannot_reach(estimator):
    """Scaling b2's factor by 100 leaves b0's and b1's gradients unchanged, draw for draw (under
    the plate rule every site met every factor); b2's own gradient does move."""
    guide = independent_guide()
    plain = _gradient(_loss(estimator), independent_model(1.0), guide, seed=3)
    scaled = _gradient(_loss(estimator), independent_model(100.0), guide, seed=3)
    torch.testing.assert_close(scaled[:2], plain[:2], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(scaled[2], plain[2])


@pytest.mark.parametrize("estimator", ["loo", "disarm", "relax"])
def test_unbiased_with_the_downstream_reward(estimator):
    pyro.set_rng_seed(0)
    elbo, guide, model = _loss(estimator), independent_guide(), independent_model()
    pyro.clear_param_store()
    guide()
    leaf = pyro.param("a").unconstrained()
    draws = torch.stack([-torch.autograd.grad(elbo.differentiable_loss(model, guide), leaf)[0]
                         / R for _ in range(CALLS)])
    assert_mean_close(draws, _exact(), what=estimator)


@pytest.mark.parametrize("estimator", ["loo", "disarm", "gumbel_st"])
def test_a_per_site_baseline_where_it_cannot_act_is_an_error_naming_the_site(estimator):
    infer = {"discrete_estimator": estimator,
             "baseline": {"use_decaying_avg_baseline": True}}
    particles = 1 if estimator == "gumbel_st" else 2
    elbo = JensenELBO(num_particles=particles, vectorize_particles=True, max_plate_nesting=1)
    with pytest.raises(ValueError, match=rf"site 'b0'.*discrete_estimator='{estimator}'"):
        elbo.differentiable_loss(independent_model(), independent_guide(infer))


def test_relax_takes_a_per_site_baseline_and_stays_unbiased():
    pyro.set_rng_seed(1)
    infer = {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.5}}
    elbo, guide, model = _loss("relax"), independent_guide(infer), independent_model()
    pyro.clear_param_store()
    guide()
    leaf = pyro.param("a").unconstrained()
    draws = torch.stack([-torch.autograd.grad(elbo.differentiable_loss(model, guide), leaf)[0]
                         / R for _ in range(CALLS)])
    assert_mean_close(draws, _exact(), what="relax with a decaying-average baseline")
    state = elbo.state_dict()
    assert "site_baselines._extra_state" in state and "relax" in state
