"""A plan per trace structure, keyed by everything its decisions depend on (``elbos/plan.py``).

A decision cached for one model, or one argument value, must never be reused for another: the
analytic KL's validity depends on the model's dependencies, which a site name does not show.
References: Pyro's ``Trace_ELBO`` on the same model (means within ``K_SE`` standard errors).
"""

from __future__ import annotations

import dataclasses
import gc
import types
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, JensenELBO
from pyro_elbo_ext.elbos import PriorProposal, Treatment, TreatmentWrapper
from pyro_elbo_ext.elbos.keys import argument_signature, trace_structure_key
from pyro_elbo_ext.elbos.plan import PlanCache

from .mc import K_SE, assert_mean_close, standard_error

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
    model, guide = _plate_model, _plate_guide

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


# ---------------------------------------------------------------------------- arguments by content
@dataclasses.dataclass
class Config:
    """A non-frozen dataclass: unhashable, and mutable."""

    coupled: bool


def _model_with_config(config: Config):
    _model_with_flag(config.coupled)


def test_an_unhashable_argument_is_keyed_by_its_contents_not_its_id():
    """Issue 27 row 5: a new config object that gets a freed one's id, and whose guide
    dependencies differ, gets a plan of its own (reference: Trace_ELBO's means)."""
    elbo = AnalyticKLELBO()
    _guide()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = Config(False)
        elbo.loss(_model_with_config, _guide, config)  # analytic KL valid for z2
        freed = id(config)
        del config
        gc.collect()
        kept = []
        for _ in range(1000):  # CPython usually hands the freed memory to the next object
            coupled = Config(True)
            if id(coupled) == freed:
                break
            kept.append(coupled)
        ours = _draws(elbo, _model_with_config, coupled)
    reference = _draws(Trace_ELBO(), _model_with_config, Config(True))
    _assert_agree(ours, reference, "a new Config(True) after Config(False)")


def test_a_mutated_argument_is_a_new_key():
    """Issue 27 row 6: the same config object mutated between calls is planned anew."""
    elbo = AnalyticKLELBO()
    _guide()
    config = Config(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        elbo.loss(_model_with_config, _guide, config)
        config.coupled = True
        ours = _draws(elbo, _model_with_config, config)
    reference = _draws(Trace_ELBO(), _model_with_config, Config(True))
    _assert_agree(ours, reference, "Config mutated to coupled=True")
    with pytest.raises(ValueError, match=r"'z2'.*depends on 'z1'"):
        AnalyticKLELBO(on_dependency_violation="raise").loss(_model_with_config, _guide,
                                                             config)


class _Opaque:
    """Unhashable, and without a __dict__ whose contents could be read."""

    __slots__ = ("coupled",)
    __hash__ = None

    def __init__(self, coupled):
        self.coupled = coupled


def test_an_argument_that_cannot_be_summarized_gets_a_plan_that_is_not_kept():
    elbo = AnalyticKLELBO(on_dependency_violation="raise")
    opaque = _Opaque(False)
    elbo.loss(lambda o: _model_with_flag(o.coupled), _guide, opaque)
    assert len(elbo._plans) == 0
    opaque.coupled = True
    with pytest.raises(ValueError, match=r"'z2'.*depends on 'z1'"):
        elbo.loss(lambda o: _model_with_flag(o.coupled), _guide, opaque)


def test_argument_signature_reads_contents():
    config = Config(True)
    signature = argument_signature((config,))
    config.coupled = False
    assert argument_signature((config,)) != signature
    assert argument_signature((Config(True),)) == signature  # contents, not identity
    assert argument_signature(({"a": [1, 2]},)) != argument_signature(({"a": [1, 3]},))
    namespace = types.SimpleNamespace(scale=2.0)
    assert argument_signature(namespace) == argument_signature(types.SimpleNamespace(scale=2.0))
    assert argument_signature(_Opaque(True)) is None
    cyclic: list = []
    cyclic.append(cyclic)
    assert argument_signature(cyclic) is None
    assert argument_signature(list(range(10_000))) is None  # too large to walk per step
    assert argument_signature((torch.zeros(3), torch.zeros(3, requires_grad=True))) == \
        argument_signature((torch.ones(3), torch.ones(3)))


def test_the_trace_structure_holds_has_rsample():
    """A site made non-reparameterized (``has_rsample_(False)``) is another structure: its
    estimator (pathwise or score function) is decided anew."""

    def guide(rsample: bool):
        pyro.sample("z", dist.Normal(pyro.param("m", torch.tensor(0.2)), 1.0)
                    .has_rsample_(rsample))

    def model(rsample: bool):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=X)

    keys = []
    for rsample in (True, False):
        guide_trace = pyro.poutine.trace(guide).get_trace(rsample)
        model_trace = pyro.poutine.trace(pyro.poutine.replay(model, guide_trace)).get_trace(
            rsample)
        keys.append(trace_structure_key(model_trace, guide_trace))
    assert keys[0] != keys[1]


# ---------------------------------------------------------------------------- treatments checked
class _DropsFacts(Treatment):
    """A pass-through wrapper written without TreatmentWrapper: it drops the inner
    treatment's sampling facts."""

    def __init__(self, inner):
        self.inner = inner

    def terms(self, ctx, model_site, guide_site):
        return self.inner.terms(ctx, model_site, guide_site)


@dataclasses.dataclass(frozen=True)
class _KeepsFacts(TreatmentWrapper):
    """The same wrapper on TreatmentWrapper: it keeps them by construction."""


def _attention_model():
    logits = pyro.param("logits", torch.tensor([0.3, -0.2]))
    where = pyro.sample("where", dist.Categorical(logits=logits))
    pyro.sample("y", dist.Normal(where.to(torch.get_default_dtype()), 1.0),
                obs=torch.tensor(1.0))


def _wrapping(wrapper):
    class Wrapping(HardAttentionELBO):
        def treat(self, site, planning):
            treatment = super().treat(site, planning)
            return wrapper(treatment) if site.role == "unguided" else treatment

    return Wrapping(estimator="reinforce", num_particles=32, vectorize_particles=True,
                    max_plate_nesting=0)


def test_a_wrapper_that_drops_the_sampling_facts_is_refused_naming_the_site():
    """Issue 26: a pass-through wrapper around the prior-proposal treatment used to drop the
    REINFORCE term silently (the attention policy got no gradient)."""
    with pytest.raises(ValueError, match=r"site 'where'.*guide does not sample.*_DropsFacts"
                                         r".*TreatmentWrapper"):
        _wrapping(_DropsFacts).differentiable_loss(_attention_model, lambda: None)


def test_a_treatment_wrapper_keeps_the_score_term():
    """TreatmentWrapper keeps sampled_by/learning_signal: the wrapped loss's gradient equals
    the exact dF by enumeration (E_p(l)[log p(y|l)] over l in {0, 1}), in expectation."""
    elbo = _wrapping(_KeepsFacts)
    logits = pyro.param("logits", torch.tensor([0.3, -0.2]))
    probs = torch.softmax(logits, -1)
    log_lik = dist.Normal(torch.tensor([0.0, 1.0]), 1.0).log_prob(torch.tensor(1.0))
    (exact,) = torch.autograd.grad((probs * log_lik).sum(), [logits])
    grads = []
    for _ in range(200):  # each a mean over 32 particles
        loss = elbo.differentiable_loss(_attention_model, lambda: None)
        (grad,) = torch.autograd.grad(loss, [pyro.param("logits").unconstrained()])
        grads.append(-grad)
    assert_mean_close(torch.stack(grads), exact, what="wrapped prior proposal")


def test_make_plan_refuses_a_guide_site_treated_as_the_models():
    class Confused(JensenELBO):
        def treat(self, site, planning):
            if site.role == "guided":
                return PriorProposal()
            return super().treat(site, planning)

    with pytest.raises(ValueError, match=r"site 'loc' is sampled by the guide.*sampled_by="):
        Confused().loss(_plate_model, _plate_guide, torch.randn(3))


def _plate_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


def _plate_guide(data):
    pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0))
