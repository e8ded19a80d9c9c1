"""A plan per trace structure, keyed by everything its decisions depend on (``elbos/plan.py``).

A decision cached for one model, or one argument value, must never be reused for another: the
analytic KL's validity depends on the model's dependencies, which a site name does not show.
References: Pyro's ``Trace_ELBO`` on the same model (means within ``K_SE`` standard errors).
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_elbo_ext import AnalyticKLELBO, JensenELBO
from pyro_elbo_ext.elbos.plan import PlanCache, argument_signature

from .mc import K_SE, standard_error

X = torch.tensor(0.7)


def _independent_model():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z1 + z2, 1.0), obs=X)


def _coupled_model():
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))  # p(z2 | z1): z1 is sampled later in q
    pyro.sample("x", dist.Normal(z1 + z2, 1.0), obs=X)


def _model_with_flag(coupled: bool):
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1 if coupled else 0.0, 1.0))
    pyro.sample("x", dist.Normal(z1 + z2, 1.0), obs=X)


def _guide(*args):
    coupling = pyro.param("coupling", torch.tensor(0.6))
    z2 = pyro.sample("z2", dist.Normal(0.3, 1.0))
    pyro.sample("z1", dist.Normal(coupling * z2, 0.8))


def _draws(elbo, model, *args, num_draws=400):
    values, grads = [], []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(model, _guide, *args)
        (grad,) = torch.autograd.grad(loss, pyro.param("coupling").unconstrained())
        values.append(-loss.detach())
        grads.append(-grad)
    return torch.stack(values), torch.stack(grads)


def _assert_agree(ours, reference, what):
    for a, b, name in zip(ours, reference, ("L", "dL/dcoupling")):
        se = (standard_error(a) ** 2 + standard_error(b) ** 2) ** 0.5
        assert abs(float(a.mean() - b.mean())) < K_SE * float(se), f"{what}: {name}"


def test_a_plan_made_for_one_model_is_not_reused_for_another():
    elbo = AnalyticKLELBO()
    _guide()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's warning on the coupled model
        elbo.loss(_independent_model, _guide)  # plans: analytic KL valid for both sites
        ours = _draws(elbo, _coupled_model)
    reference = _draws(Trace_ELBO(), _coupled_model)
    _assert_agree(ours, reference, "the same loss on a second model")


def test_a_plan_made_for_one_argument_value_is_not_reused_for_another():
    elbo = AnalyticKLELBO()
    _guide()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elbo.loss(_model_with_flag, _guide, False)
        ours = _draws(elbo, _model_with_flag, True)
    reference = _draws(Trace_ELBO(), _model_with_flag, True)
    _assert_agree(ours, reference, "the same loss with coupled=True after coupled=False")


def test_raise_on_violation_sees_a_dependency_that_appears_with_an_argument():
    elbo = AnalyticKLELBO(on_dependency_violation="raise")
    elbo.loss(_model_with_flag, _guide, False)
    with pytest.raises(ValueError, match=r"'z2'.*depends on 'z1'"):
        elbo.loss(_model_with_flag, _guide, True)


def test_plans_are_reused_within_a_structure_and_bounded():
    elbo = JensenELBO()
    data = torch.randn(5)

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=data)

    def guide(data):
        pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))

    for _ in range(3):
        elbo.loss(model, guide, data)
        elbo.loss(model, guide, torch.randn(5))  # new values, same signature
    assert len(elbo._plans) == 1
    for n in range(1, 40):  # each new data size is a new structure
        elbo.loss(model, guide, torch.randn(n))
    assert len(elbo._plans) == elbo._plans.maxsize


def test_argument_signature():
    a, b = torch.zeros(3), torch.ones(3)
    assert argument_signature((a, 1.0)) == argument_signature((b, 1.0))
    assert argument_signature((a, 1.0)) != argument_signature((torch.zeros(4), 1.0))
    assert argument_signature((a,)) != argument_signature((a.double(),))
    assert argument_signature({"coupled": True}) != argument_signature({"coupled": False})
    cache = PlanCache(maxsize=2)
    for key in "abc":
        cache.put(key, key)
    assert cache.get("a") is None and cache.get("c") == "c" and len(cache) == 2
