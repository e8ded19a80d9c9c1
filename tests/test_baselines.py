"""Learning signals with explicit state (``elbos/baselines.py``): read in the forward pass,
written by a guarded update after the gradient, checked when loaded from a checkpoint."""

from __future__ import annotations

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_ext import HardAttentionELBO
from pyro_elbo_ext.elbos.baselines import MovingAverageBaseline
from pyro_elbo_ext.problems.hard_attention import random_attention

STATEFUL = [
    dict(baseline="moving_average"),
    dict(baseline="learned"),
    dict(baseline=None, normalize=True),
    dict(baseline="moving_average", normalize=True),
]


def _problem():
    problem = random_attention(num_glimpses=2, num_data=6, num_locations=3)
    problem.set_params()
    return problem


def _elbo(**options):
    return HardAttentionELBO(estimator="reinforce", num_particles=4, vectorize_particles=True,
                             max_plate_nesting=1, **options)


def _state_tensors(elbo) -> dict[str, torch.Tensor]:
    """Every tensor of the learning signal's state, extra state included."""
    out = {}

    def collect(prefix, value):
        if torch.is_tensor(value):
            out[prefix] = value.detach().clone()
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}.{key}", item)

    collect("", elbo.state_dict())
    return out


def test_moving_average_advance_is_a_pure_state_transition():
    zero = torch.zeros(())
    average, count = MovingAverageBaseline.advance(zero, zero, torch.tensor(2.0), 0.9)
    assert float(average) == pytest.approx(0.2) and float(count) == 1
    average, count = MovingAverageBaseline.advance(average, count, torch.tensor(4.0), 0.9)
    assert float(average) == pytest.approx(0.9 * 0.2 + 0.1 * 4.0) and float(count) == 2
    assert float(zero) == 0.0  # the input state is untouched
    baseline = MovingAverageBaseline(0.9)
    assert float(baseline.value("l", torch.zeros(()))) == 0.0  # before the first update
    baseline.slots[("l", "average")], baseline.slots[("l", "count")] = average, count
    assert float(baseline.value("l", torch.zeros(()))) == pytest.approx(
        float(average) / (1 - 0.9**2))


@pytest.mark.parametrize("options", STATEFUL, ids=str)
def test_the_forward_pass_only_reads_the_state(options):
    """The surrogate is built from the state before this step; the state moves only in the
    update that follows (so two losses with the same state give the same gradient)."""
    problem = _problem()
    elbo = _elbo(**options)
    elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    before = _state_tensors(elbo)
    signal = elbo.learning_signal
    with torch.no_grad():  # an evaluation: state untouched
        elbo.loss(problem.model, problem.guide, *problem.args)
    assert all(torch.equal(v, _state_tensors(elbo)[k]) for k, v in before.items())
    # a training call binds, reads, then updates once the surrogate exists
    pyro.set_rng_seed(3)
    elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    after = _state_tensors(elbo)
    assert any(not torch.equal(v, after[k]) for k, v in before.items())
    assert elbo.learning_signal is signal


@pytest.mark.parametrize("options", STATEFUL, ids=str)
def test_a_non_finite_step_does_not_poison_the_state(options):
    """Validation off, one batch with a NaN: the update is skipped with a warning naming the
    site, the last finite state is kept, and the next clean step is finite (issue 19.3)."""
    problem = _problem()
    elbo = _elbo(**options)
    with pyro.validation_enabled(False):
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        before = _state_tensors(elbo)
        x, glimpses, y = problem.args
        bad = (x, glimpses.clone().fill_(float("nan")), y)
        with pytest.warns(RuntimeWarning, match=r"site 'l\d' was not updated"):
            elbo.differentiable_loss(problem.model, problem.guide, *bad)
        kept = _state_tensors(elbo)
        assert all(torch.equal(v, kept[k]) for k, v in before.items())
        assert all(bool(torch.isfinite(v).all()) for v in kept.values())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        assert bool(torch.isfinite(loss))
        leaves = list(problem.unconstrained_params().values())
        assert all(bool(torch.isfinite(g).all()) for g in torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("saved, loaded, pattern", [
    (dict(baseline="moving_average", decay=0.9), dict(baseline="moving_average", decay=0.5),
     r"saved with decay=0.9, but this loss has decay=0.5"),
    (dict(baseline="learned", baseline_hidden_dim=8), dict(baseline="learned"),
     r"saved with baseline_hidden_dim=8, but this loss has baseline_hidden_dim=32"),
    (dict(baseline="learned", baseline_lr=0.1), dict(baseline="learned"),
     r"saved with baseline_lr=0.1, but this loss has baseline_lr=0.01"),
    (dict(baseline="learned"), dict(baseline="moving_average"),
     r"baseline='learned' into a loss with baseline='moving_average'"),
    (dict(baseline="moving_average"), dict(baseline="learned"),
     r"baseline='moving_average' into a loss with baseline='learned'"),
    (dict(baseline="moving_average", normalize=True), dict(baseline="moving_average"),
     r"saved with normalize=True, but this loss has normalize=False"),
])
def test_a_checkpoint_with_other_settings_is_refused(saved, loaded, pattern):
    problem = _problem()
    source = _elbo(**saved)
    source.differentiable_loss(problem.model, problem.guide, *problem.args)
    with pytest.raises(ValueError, match=pattern):
        _elbo(**loaded).load_state_dict(source.state_dict())


def test_a_matching_checkpoint_continues_identically():
    problem = _problem()
    elbo = _elbo(baseline="learned", decay=0.7, normalize=True)
    for _ in range(3):
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    fresh = _elbo(baseline="learned", decay=0.7, normalize=True)
    fresh.load_state_dict(elbo.state_dict())
    leaves = list(problem.unconstrained_params().values())
    results = []
    for loss in (elbo, fresh):
        pyro.set_rng_seed(9)
        value = loss.differentiable_loss(problem.model, problem.guide, *problem.args)
        results.append((value.detach(), torch.autograd.grad(value, leaves)))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
    assert all(torch.equal(v, _state_tensors(fresh)[k]) for k, v in _state_tensors(elbo).items())


# ---------------------------------------------------------------------------- baseline_input
def _model_with_input(baseline_input):
    data = torch.tensor([1.0, 0.0, 2.0])

    def model():
        w = pyro.param("w", torch.zeros(3))
        with pyro.plate("data", 3):
            loc = pyro.sample("where", dist.Categorical(logits=w.expand(3, 3)),
                              infer={"baseline_input": baseline_input})
            pyro.sample("y", dist.Normal(loc.to(data.dtype), 1.0), obs=data)

    return model


@pytest.mark.parametrize("baseline_input, pattern", [
    (torch.ones(3, 2, dtype=torch.float64), r"site 'where' has dtype torch.float64.*float32"),
    ([[1.0, 2.0]] * 3, r"site 'where' must be a tensor.*got a list"),
    (torch.ones(5, 2), r"site 'where' has batch shape \(5,\).*does not broadcast"),
])
def test_a_bad_baseline_input_names_the_site_and_the_fix(baseline_input, pattern):
    elbo = HardAttentionELBO(estimator="reinforce", baseline="learned", max_plate_nesting=1)
    if torch.is_tensor(baseline_input) and baseline_input.dtype == torch.float64:
        elbo.differentiable_loss(_model_with_input(torch.ones(3, 2)), lambda: None)  # float32
    with pytest.raises(ValueError, match=pattern):
        elbo.differentiable_loss(_model_with_input(baseline_input), lambda: None)


def test_a_nan_baseline_input_skips_the_update_naming_the_site():
    elbo = HardAttentionELBO(estimator="reinforce", baseline="learned", max_plate_nesting=1)
    elbo.differentiable_loss(_model_with_input(torch.ones(3, 2)), lambda: None)
    before = _state_tensors(elbo)
    with pytest.warns(RuntimeWarning, match=r"learned baseline of site 'where' was not updated"):
        elbo.differentiable_loss(_model_with_input(torch.full((3, 2), float("nan"))),
                                 lambda: None)
    assert all(torch.equal(v, _state_tensors(elbo)[k]) for k, v in before.items())


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0, -1.0, "0.1", True])
def test_baseline_lr_must_be_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match="baseline_lr must be a"):
        HardAttentionELBO(estimator="reinforce", baseline="learned", baseline_lr=bad)
