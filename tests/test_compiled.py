"""The compiled path (jit=True) gives the eager path's values and gradients for the same draws."""

import pyro
import pytest
import torch

from pyro_elbo_ext import HardAttentionELBO, JensenELBO, empty_guide
from pyro_elbo_ext.problems import PROBLEMS, get_problem

# the hard-attention problems draw their latents from the model (an empty guide): JensenELBO
# does not apply to them, HardAttentionELBO does (tested below)
ATTENTION_PROBLEMS = {"random_attention", "cluttered_digits"}
COMPILABLE = sorted(set(PROBLEMS) - ATTENTION_PROBLEMS)


@pytest.mark.parametrize("entropy", ["analytic", "path"])
@pytest.mark.parametrize("particles", [1, 8])
@pytest.mark.parametrize("name", COMPILABLE)
def test_compiled_equals_eager(name, particles, entropy):
    problem = get_problem(name, dtype=torch.float64)
    problem.set_params()
    leaves = list(problem.unconstrained_params().values())
    options = dict(num_particles=particles, vectorize_particles=particles > 1,
                   max_plate_nesting=problem.max_plate_nesting, entropy=entropy)
    results = []
    for jit in (False, True):
        elbo = JensenELBO(jit=jit, ignore_jit_warnings=True, **options)
        if jit:  # compile first: tracing draws random numbers of its own
            elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        for seed in (1, 2):
            pyro.set_rng_seed(seed)
            loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            results.append((loss.detach(), grads))
    for (eager_loss, eager_grads), (jit_loss, jit_grads) in zip(results[:2], results[2:]):
        torch.testing.assert_close(jit_loss, eager_loss, rtol=1e-10, atol=1e-10)
        for a, b in zip(jit_grads, eager_grads):
            if a is None or b is None:
                assert a is None and b is None
            else:
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # and the two seeds gave different draws: the comparison is not vacuous
    assert not torch.equal(results[0][0], results[1][0])


def test_compiled_loss_and_grads_matches_value():
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    elbo = JensenELBO(jit=True, ignore_jit_warnings=True)
    elbo.loss_and_grads(problem.model, problem.guide, *problem.args)  # compiles
    pyro.set_rng_seed(3)
    value = elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    pyro.set_rng_seed(3)
    eager = JensenELBO().loss(problem.model, problem.guide, *problem.args)
    assert value == pytest.approx(eager, abs=1e-10)


def _attention_problem(name):
    options = {"num_train": 64, "num_test": 16, "batch_size": 16} if name == "cluttered_digits" \
        else {}
    problem = get_problem(name, dtype=torch.float64, **options)
    problem.set_params()
    assert problem.guide is empty_guide  # every latent is drawn from the model
    return problem


def _loss_and_grads_by_name(elbo, problem):
    """-L and its gradient, per parameter name (the compiled path visits them in another order)."""
    with pyro.poutine.trace(param_only=True) as capture:
        loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    names = sorted(capture.trace.nodes)
    leaves = [capture.trace.nodes[n]["value"].unconstrained() for n in names]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), dict(zip(names, grads))


@pytest.mark.parametrize(
    "options",
    [
        {"estimator": "enum"},
        {"estimator": "enum", "num_particles": 3, "vectorize_particles": True},
        {"estimator": "reinforce"},
        {"estimator": "reinforce", "reward": "zero_one"},
        {"estimator": "reinforce", "baseline": "leave_one_out", "num_particles": 4,
         "vectorize_particles": True},
    ],
    ids=["enum", "enum-3", "reinforce", "reinforce-zero-one", "reinforce-loo-4"],
)
@pytest.mark.parametrize("name", sorted(ATTENTION_PROBLEMS))
def test_hard_attention_compiled_equals_eager(name, options):
    """Stateless HardAttentionELBO configurations compile; for the same seed the compiled loss
    draws the same attention locations and gives the eager value and gradients."""
    problem = _attention_problem(name)
    results = []
    for jit in (False, True):
        elbo = HardAttentionELBO(jit=jit, ignore_jit_warnings=True,
                                 max_plate_nesting=problem.max_plate_nesting, **options)
        if jit:  # compile first: tracing draws random numbers of its own
            elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
            assert elbo._compiled  # the compiled path, not the eager one, is under test
        for seed in (1, 2):
            pyro.set_rng_seed(seed)
            results.append(_loss_and_grads_by_name(elbo, problem))
    for (eager_loss, eager_grads), (jit_loss, jit_grads) in zip(results[:2], results[2:]):
        torch.testing.assert_close(jit_loss, eager_loss, rtol=1e-10, atol=1e-10)
        assert eager_grads.keys() == jit_grads.keys() and eager_grads
        for key, grad in eager_grads.items():
            torch.testing.assert_close(jit_grads[key], grad, rtol=1e-9, atol=1e-10)
    if options["estimator"] == "reinforce" or name == "cluttered_digits":
        # sampled locations or a sampled minibatch: the two seeds differ, the test is not vacuous
        assert not torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize(
    "options, match",
    [
        ({"baseline": "moving_average"}, "baseline='moving_average' cannot be compiled"),
        ({"baseline": "learned"}, "baseline='learned' cannot be compiled"),
        ({"normalize": True}, "normalize=True cannot be compiled"),
    ],
)
def test_hard_attention_refuses_to_compile_state_that_learns(options, match):
    with pytest.raises(ValueError, match=match):
        HardAttentionELBO(estimator="reinforce", jit=True, **options)
