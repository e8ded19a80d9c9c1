"""The engine loop of every loss (``elbos/base.py``): per-plan caches, vectorized particles.

References: a warning a fresh loss gives (the non-finite gradient's site), and Pyro's own
error for a model run unvectorized.
"""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_ext import JensenELBO
from pyro_elbo_ext.elbos import base
from pyro_elbo_ext.elbos.base import MAX_CACHED_PLANS


def _model():
    pyro.sample("z", dist.Normal(0.0, 1.0))


def _guide_factory(bad: bool):
    def guide():
        if bad:  # d sqrt(b)/db at b = 0 is infinite: a non-finite gradient, a finite L
            scale = pyro.param("b", torch.tensor(0.0)).sqrt() + 1.0
        else:
            scale = pyro.param("a", torch.tensor(1.0))
        pyro.sample("z", dist.Normal(0.0, scale))

    return guide


def _gradient_warnings(loss, guide) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss.loss_and_grads(_model, guide)
    return [str(w.message) for w in caught if "gradient is not" in str(w.message)]


def test_a_new_guide_is_never_given_a_dropped_guides_parameters(monkeypatch):
    """Issue 27 row 7: the parameters checked for a non-finite gradient were cached per
    (id(model), id(guide)) and never evicted, so a new closure that got a dropped one's id
    was checked against the old one's parameters, and its NaN gradient went unreported.  A
    fresh loss warns; so must a used one, even where every object had the same id (ids
    reused: the engine's module sees ``id`` return 0)."""
    fresh = _gradient_warnings(JensenELBO(), _guide_factory(True))
    assert len(fresh) == 1 and "site 'z'" in fresh[0]
    pyro.clear_param_store()
    monkeypatch.setattr(base, "id", lambda obj: 0, raising=False)
    loss = JensenELBO()
    loss.loss_and_grads(_model, _guide_factory(False))
    assert _gradient_warnings(loss, _guide_factory(True)) == fresh
    for _ in range(MAX_CACHED_PLANS + 8):
        loss.loss_and_grads(_model, _guide_factory(False))
    assert len(loss._plans) <= MAX_CACHED_PLANS  # the per-plan caches are bounded with it


def _indexing_model(data):
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        which = pyro.sample("which", dist.Bernoulli(0.5)).long()
        pyro.sample("obs", dist.Normal(locs[which], 1.0), obs=data)


def _indexing_guide(data):
    pyro.sample("locs", dist.Normal(pyro.param("m", torch.zeros(2)), 1.0).to_event(1))
    with pyro.plate("data", len(data)):
        pyro.sample("which", dist.Bernoulli(0.5))


def test_a_model_that_breaks_under_vectorized_particles_names_the_option():
    data = torch.tensor([-1.0, 0.5, 2.0])
    JensenELBO(num_particles=3).loss(_indexing_model, _indexing_guide, data)  # sequential: fine
    with pytest.raises((RuntimeError, ValueError),
                       match=r"(?s)3 particles vectorized.*and runs without: .*"
                             r"vectorize_particles=False"):
        JensenELBO(num_particles=3, vectorize_particles=True).loss(
            _indexing_model, _indexing_guide, data)


def test_an_error_of_the_model_itself_is_not_blamed_on_vectorization():
    def broken(data):
        raise RuntimeError("the model's own bug")

    with pytest.raises(RuntimeError, match="the model's own bug") as raised:
        JensenELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).loss(
            broken, _indexing_guide, torch.zeros(3))
    assert "vectoriz" not in str(raised.value)
