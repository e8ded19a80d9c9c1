"""Pyro's contract: whatever Pyro's ELBOs accept, our losses accept with the same values; whatever
Pyro's validation refuses, ours refuse (``elbos/tracing.py``, ``elbos/validation.py``).

References are Pyro's own ``Trace_ELBO`` on the same draws (same seed), or its mean within
``K_SE`` standard errors.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import (
    AutoHierarchicalNormalMessenger,
    AutoNormalMessenger,
    AutoRegressiveMessenger,
)

from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, ImportanceWeightedELBO, JensenELBO

from .mc import K_SE, standard_error

LOSSES = {
    "jensen_sampled": lambda **kw: JensenELBO(entropy="sampled", **kw),
    "jensen_analytic": lambda **kw: JensenELBO(**kw),
    "jensen_path": lambda **kw: JensenELBO(entropy="path", **kw),
    "analytic_kl": lambda **kw: AnalyticKLELBO(**kw),
    "hard_attention": lambda **kw: HardAttentionELBO(estimator="reinforce", entropy="sampled",
                                                     **kw),
    "importance_weighted": lambda **kw: ImportanceWeightedELBO(num_particles=1, **kw),
}


def _hierarchical_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(loc, scale), obs=data)


DATA = torch.tensor([0.4, -0.3, 1.2, 0.8])


def _loss_and_grads(elbo, model, guide, *args, seed=0):
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(model, guide, *args)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), {name: g for name, g in zip(pyro.get_param_store().keys(), grads)}


# ---------------------------------------------------------------------------- messenger guides
@pytest.mark.parametrize("guide_class", [AutoNormalMessenger, AutoHierarchicalNormalMessenger,
                                         AutoRegressiveMessenger])
def test_guide_messenger_matches_trace_elbo_draw_for_draw(guide_class):
    """Pyro's effect-based guides run the model themselves; the sampled entropy is
    Trace_ELBO's estimator, so value and gradient agree draw for draw."""
    guide = guide_class(_hierarchical_model)
    _loss_and_grads(Trace_ELBO(), _hierarchical_model, guide, DATA)  # create the parameters
    for seed in range(3):
        ours = _loss_and_grads(JensenELBO(entropy="sampled"), _hierarchical_model, guide, DATA,
                               seed=seed)
        pyros = _loss_and_grads(Trace_ELBO(), _hierarchical_model, guide, DATA, seed=seed)
        torch.testing.assert_close(ours[0], pyros[0], rtol=1e-6, atol=1e-6)
        for name in pyros[1]:
            torch.testing.assert_close(ours[1][name], pyros[1][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss_name", ["jensen_analytic", "jensen_path", "analytic_kl",
                                       "hard_attention"])
def test_guide_messenger_every_loss_estimates_pyros_value(loss_name):
    """Every loss takes AutoNormalMessenger and estimates Trace_ELBO's L (K_SE standard
    errors, 300 vectorized-free draws each)."""
    guide = AutoNormalMessenger(_hierarchical_model)
    _loss_and_grads(Trace_ELBO(), _hierarchical_model, guide, DATA)
    values = {}
    for name, elbo in (("ours", LOSSES[loss_name]()), ("pyro", Trace_ELBO())):
        with torch.no_grad():
            values[name] = torch.tensor([-elbo.loss(_hierarchical_model, guide, DATA)
                                         for _ in range(300)])
    diff = values["ours"].mean() - values["pyro"].mean()
    se = (standard_error(values["ours"]) ** 2 + standard_error(values["pyro"]) ** 2) ** 0.5
    assert abs(float(diff)) < K_SE * float(se)


def test_guide_messenger_with_vectorized_particles():
    guide = AutoNormalMessenger(_hierarchical_model)
    options = dict(num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    _loss_and_grads(Trace_ELBO(**options), _hierarchical_model, guide, DATA)
    ours = _loss_and_grads(JensenELBO(entropy="sampled", **options), _hierarchical_model,
                           guide, DATA, seed=4)
    pyros = _loss_and_grads(Trace_ELBO(**options), _hierarchical_model, guide, DATA, seed=4)
    torch.testing.assert_close(ours[0], pyros[0], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- size-less plates
def _sizeless_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    with pyro.plate("data"):  # the size is taken from the batch
        pyro.sample("x", dist.Normal(loc, 1.0).expand(data.shape), obs=data)


def _sizeless_guide(data):
    loc = pyro.param("q_loc", torch.tensor(0.1))
    pyro.sample("loc", dist.Normal(loc, 0.7))


@pytest.mark.parametrize("loss_name", sorted(set(LOSSES) - {"importance_weighted"}))
def test_plate_without_a_size_matches_trace_elbo(loss_name):
    """(ImportanceWeightedELBO always vectorizes its particles, which this model's
    ``.expand(data.shape)`` does not allow, as for any ELBO with vectorize_particles.)"""
    ours = _loss_and_grads(LOSSES[loss_name](), _sizeless_model, _sizeless_guide, DATA, seed=2)
    pyros = _loss_and_grads(Trace_ELBO(), _sizeless_model, _sizeless_guide, DATA, seed=2)
    if loss_name in ("jensen_sampled", "hard_attention"):  # Trace_ELBO's estimator
        torch.testing.assert_close(ours[0], pyros[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[1]["q_loc"], pyros[1]["q_loc"], rtol=1e-6, atol=1e-6)
    else:  # same model, same guide: both finite, and L's value is that of the same draw's
        assert torch.isfinite(ours[0]) and torch.isfinite(ours[1]["q_loc"])


def test_plate_without_a_size_for_hard_attention_sites():
    """A model-drawn attention site in a size-less plate, under enumeration and REINFORCE."""

    def model(data):
        w = pyro.param("w", torch.tensor([0.3, -0.2]))
        with pyro.plate("data"):
            loc = pyro.sample("where", dist.Categorical(logits=w.expand(data.shape + (2,))))
            pyro.sample("x", dist.Normal(loc.to(data.dtype), 1.0), obs=data)

    enum = HardAttentionELBO(estimator="enum", max_plate_nesting=1)
    exact = -enum.loss(model, lambda data: None, DATA)
    probs = torch.softmax(torch.tensor([0.3, -0.2]), 0)
    hand = sum(float(probs[k]) * float(dist.Normal(float(k), 1.0).log_prob(DATA).sum())
               for k in range(2))
    assert exact == pytest.approx(hand, rel=1e-6)
    reinforce = HardAttentionELBO(estimator="reinforce", max_plate_nesting=1)
    draws = torch.tensor([-reinforce.loss(model, lambda data: None, DATA) for _ in range(400)])
    assert abs(float(draws.mean()) - hand) < K_SE * float(standard_error(draws))


# ---------------------------------------------------------------------------- Pyro's checks
def _shape_model():
    pyro.sample("z", dist.Normal(torch.zeros(1, 3), 1.0).to_event(2))
    pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.2))


def _shape_guide():
    pyro.sample("z", dist.Normal(torch.zeros(3, 1), 1.0).to_event(2))


def _event_guide():
    pyro.sample("z", dist.Normal(torch.zeros(1, 3), 1.0).to_event(1))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("guide, pattern", [
    (_shape_guide, "shapes disagree at site 'z'"),
    (_event_guide, "event_dims disagree at site 'z'"),
])
def test_model_and_guide_disagreeing_on_a_site_are_refused(loss_name, guide, pattern):
    with pytest.raises(ValueError, match=pattern):
        LOSSES[loss_name]().loss(_shape_model, guide)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_factor_in_the_guide_needs_has_rsample(loss_name):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.factor("penalty", -z**2)

    with pytest.raises(ValueError, match="has_rsample"):
        LOSSES[loss_name]().loss(model, guide)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_plate_only_in_the_guide_is_reported(loss_name):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        with pyro.plate("extra", 10, subsample_size=2):
            pass
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.warns(UserWarning, match="plate statements in guide but not model"):
        LOSSES[loss_name]().loss(model, guide)


# ---------------------------------------------------------------------------- as Pyro allows
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_empty_model_and_guide_have_zero_loss(loss_name):
    def empty(*args):
        pass

    assert Trace_ELBO().loss(empty, empty) == 0.0
    elbo = LOSSES[loss_name]()
    assert elbo.loss(empty, empty) == 0.0
    assert float(elbo.differentiable_loss(empty, empty)) == 0.0


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_enumerate_marked_guide_site_warns_then_is_sampled(loss_name):
    def model():
        z = pyro.sample("z", dist.Bernoulli(0.3))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(1.0))

    def guide():
        p = pyro.param("p", torch.tensor(0.6))
        pyro.sample("z", dist.Bernoulli(p), infer={"enumerate": "parallel"})

    ours = LOSSES[loss_name]()
    with pytest.warns(UserWarning, match="you need to use TraceEnum_ELBO"):
        ours.loss(model, guide)
    pyro.set_rng_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = ours.loss(model, guide)
        pyro.set_rng_seed(5)
        reference = JensenELBO(entropy="sampled").loss(model, guide)
    if loss_name in ("jensen_sampled", "hard_attention"):
        assert value == pytest.approx(reference, rel=1e-12)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_deterministic_sites_in_the_guide_are_accepted(loss_name):
    """pyro.deterministic in the guide (alone, or beside the model's of the same name): no
    density, Trace_ELBO's value draw for draw."""

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.deterministic("z_plus_one", z + 1)
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.5))

    def guide():
        loc = pyro.param("loc", torch.tensor(0.2))
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.deterministic("z_plus_one", z + 1)
        pyro.deterministic("guide_only", 2 * z)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        pyro.set_rng_seed(1)
        ours = LOSSES[loss_name]().loss(model, guide)
    pyro.set_rng_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = Trace_ELBO().loss(model, guide)
    if loss_name in ("jensen_sampled", "hard_attention"):
        assert ours == pytest.approx(reference, rel=1e-12)
    else:
        assert torch.isfinite(torch.tensor(ours))


# ---------------------------------------------------------------------------- stricter, on purpose
@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_guide_site_missing_from_the_model_is_an_error(loss_name):
    def model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("typo", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="guide site 'typo' does not appear in the model"):
        LOSSES[loss_name]().loss(model, guide)


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
def test_batch_dims_beyond_max_plate_nesting_are_an_error(loss_name):
    def model():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0))

    def guide():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0))

    # (ImportanceWeightedELBO's particle plate at dim -1 meets the extra dimension first)
    with pytest.raises(ValueError, match="more dimensions than max_plate_nesting=0|"
                       "Shape mismatch inside plate\\('num_particles_vectorized'\\)"):
        LOSSES[loss_name](max_plate_nesting=0).loss(model, guide)
