"""The sampler messenger (elbos/discrete_sampling.py) under Pyro's own particle machinery.

Each member of a DisARM pair is an exact draw of the site's distribution (marginal frequencies
within 4 SE), the two members are the antithetic pair of one uniform, and a RELAX or
straight-through value is the discrete draw its recorded noise gives.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_elbo_ext.elbos.discrete_estimators import logistic_relaxation
from pyro_elbo_ext.elbos.discrete_sampling import DRAW_KEY, DiscreteSampler
from tests.mc import assert_mean_close

LOGITS = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)


def _guide(estimator="disarm"):
    def guide():
        a = pyro.param("a", LOGITS.clone())
        with pyro.plate("p", 3):
            pyro.sample("b", dist.Bernoulli(logits=a), infer={"discrete_estimator": estimator})
            pyro.sample("c", dist.Categorical(logits=torch.zeros(3, 4, dtype=torch.float64)),
                        infer={"discrete_estimator": "relax"})
    return guide


def _model():
    with pyro.plate("p", 3):
        pyro.sample("b", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        pyro.sample("c", dist.Categorical(torch.ones(4, dtype=torch.float64) / 4))


def _traces(estimator, particles, vectorized, default="reinforce"):
    elbo = Trace_ELBO(num_particles=particles, vectorize_particles=vectorized,
                      max_plate_nesting=1)
    with DiscreteSampler(default, particles, vectorized):
        return list(elbo._get_traces(_model, _guide(estimator), (), {}))


def test_vectorized_disarm_pairs_are_antithetic_and_exact_draws():
    (model_trace, guide_trace), = _traces("disarm", 4000, True)
    site = guide_trace.nodes["b"]
    draw = site["infer"][DRAW_KEY]
    b, u = site["value"], draw.noise
    first, second = b[:2000], b[2000:]
    torch.testing.assert_close(u[2000:], 1.0 - u[:2000])
    assert_mean_close(first, torch.sigmoid(LOGITS), what="first members")
    assert_mean_close(second, torch.sigmoid(LOGITS), what="second members")
    # p < 1/2 (second element): never both 1; p > 1/2 (third): never both 0
    assert not bool((first[:, 1] * second[:, 1]).any())
    assert bool(((first[:, 2] + second[:, 2]) > 0).all())
    assert model_trace.nodes["b"]["value"] is b  # the model replays the pair


def test_sequential_disarm_pairs_consecutive_particles():
    traces = _traces("disarm", 4, False)
    draws = [g.nodes["b"]["infer"][DRAW_KEY] for _, g in traces]
    assert [d.pair_member for d in draws] == [0, 1, 0, 1]
    torch.testing.assert_close(draws[1].noise, 1.0 - draws[0].noise)
    assert not torch.equal(draws[2].noise, 1.0 - draws[1].noise)


def test_relax_and_straight_through_values_come_from_their_noise():
    (_, guide_trace), = _traces("gumbel_st", 1, False)
    site = guide_trace.nodes["b"]
    draw = site["infer"][DRAW_KEY]
    hard = (logistic_relaxation(LOGITS, draw.noise) > 0).double()
    assert torch.equal(site["value"].detach(), hard)  # exactly the discrete draw
    (grad,) = torch.autograd.grad(site["value"].sum(), pyro.param("a").unconstrained())
    assert bool((grad > 0).all())  # the straight-through gradient of the relaxed sample
    categorical = guide_trace.nodes["c"]
    z = draw_z = categorical["infer"][DRAW_KEY]
    assert z.estimator == "relax" and draw_z.noise.shape == (3, 4)


def test_the_sampler_checks_each_site():
    with pytest.raises(ValueError, match=r"site 'b' needs an even num_particles"):
        _traces("disarm", 3, True)

    def guide():
        with pyro.plate("p", 3):
            pyro.sample("c", dist.Categorical(logits=torch.zeros(3, 4)))  # the loss's default

    with pytest.raises(ValueError, match=r"does not apply to site 'c' \(Categorical\).*"
                       r"use one of reinforce, loo, relax"):
        with DiscreteSampler("disarm", 2, True):
            list(Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
                 ._get_traces(lambda: None, guide, (), {}))
