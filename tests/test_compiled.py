"""The compiled path (jit=True) gives the eager path's values and gradients for the same draws."""

import pyro
import pytest
import torch

from pyro_elbo_ext import JensenELBO, empty_guide
from pyro_elbo_ext.problems import PROBLEMS, get_problem

# every problem a compilable loss applies to: the hard-attention problems draw their latents
# from the model (an empty guide), and HardAttentionELBO refuses jit=True (stateful baselines)
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


@pytest.mark.parametrize("name", sorted(ATTENTION_PROBLEMS))
def test_attention_problems_are_the_ones_left_out(name):
    assert get_problem(name, **({"num_train": 64, "num_test": 16} if name == "cluttered_digits"
                                else {})).guide is empty_guide
