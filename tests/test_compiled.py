"""``jit=True``: the loss and its gradient from one traced (and compiled) graph.

The traced ATen graph is the eager computation: run uncompiled (``backend.BACKEND = None``) it
draws the eager path's random numbers in the same order, so for one seed it gives the eager
value and gradients to floating-point rounding, on every registry problem.  Compiled by
Inductor it draws other numbers (its own generator), so there the test is distributional: L and
dL within ``K_SE`` standard errors of their closed forms; and with Inductor's ``fallback_random``
it is again draw for draw.
"""

import functools

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import biject_to

from pyro_elbo_ext import HardAttentionELBO, JensenELBO, empty_guide
from pyro_elbo_ext.compiled import backend, jit
from pyro_elbo_ext.problems import PROBLEMS, get_problem
from tests.mc import assert_mean_close, draw_loss_and_grads

# the hard-attention problems draw their latents from the model (an empty guide): JensenELBO
# does not apply to them, HardAttentionELBO does (tested below)
ATTENTION_PROBLEMS = {"random_attention", "cluttered_digits"}
COMPILABLE = sorted(set(PROBLEMS) - ATTENTION_PROBLEMS)


@pytest.fixture
def traced_only(monkeypatch):
    """Run the traced graph uncompiled: the trace is under test, not Inductor."""
    monkeypatch.setattr(backend, "BACKEND", None)


def _loss_and_grads_by_name(elbo, model, guide, *args):
    """-L and its gradient, per parameter name (every leaf of the param store)."""
    loss = elbo.differentiable_loss(model, guide, *args)
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return loss.detach(), dict(zip(names, grads))


def _assert_same_draws(make_elbo, model, guide, args, seeds=(1, 2)):
    results = []
    for jit_flag in (False, True):
        elbo = make_elbo(jit_flag)
        if jit_flag:  # trace first: tracing draws random numbers of its own
            elbo.differentiable_loss(model, guide, *args)
            assert elbo._compiled  # the compiled path, not the eager one, is under test
        for seed in seeds:
            pyro.set_rng_seed(seed)
            results.append(_loss_and_grads_by_name(elbo, model, guide, *args))
    half = len(seeds)
    for (eager_loss, eager_grads), (jit_loss, jit_grads) in zip(results[:half], results[half:]):
        torch.testing.assert_close(jit_loss, eager_loss, rtol=1e-10, atol=1e-10)
        assert eager_grads.keys() == jit_grads.keys() and eager_grads
        for key, grad in eager_grads.items():
            if grad is None:
                assert jit_grads[key] is None or not jit_grads[key].any()
            else:
                torch.testing.assert_close(jit_grads[key], grad, rtol=1e-9, atol=1e-10)
    return results


@pytest.mark.parametrize("entropy", ["analytic", "path"])
@pytest.mark.parametrize("particles", [1, 8])
@pytest.mark.parametrize("name", COMPILABLE)
def test_traced_graph_equals_eager(traced_only, name, particles, entropy):
    problem = get_problem(name, dtype=torch.float64)
    problem.set_params()
    options = dict(num_particles=particles, vectorize_particles=particles > 1,
                   max_plate_nesting=problem.max_plate_nesting, entropy=entropy)
    results = _assert_same_draws(lambda jit_flag: JensenELBO(jit=jit_flag, **options),
                                 problem.model, problem.guide, problem.args)
    # and the two seeds gave different draws: the comparison is not vacuous
    assert not torch.equal(results[0][0], results[1][0])


def _masked_scaled_subsampled(data):
    """Masks, scales and a subsampled plate (the minibatch drawn inside the graph)."""
    loc = pyro.param("loc", torch.tensor(0.3, dtype=data.dtype))
    z = pyro.sample("z", dist.Normal(loc, 1.0))
    with pyro.plate("data", data.shape[0], subsample_size=4) as idx, \
            pyro.poutine.scale(scale=0.7), pyro.poutine.mask(mask=idx % 3 != 0):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])


def _guide_for_masked(data):
    loc = pyro.param("q_loc", torch.tensor(0.1, dtype=data.dtype))
    scale = pyro.param("q_scale", torch.tensor(0.8, dtype=data.dtype),
                       constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def test_traced_graph_follows_masks_scales_and_subsampling(traced_only):
    data = torch.arange(10, dtype=torch.float64) / 5
    results = _assert_same_draws(lambda jit_flag: JensenELBO(jit=jit_flag, max_plate_nesting=1),
                                 _masked_scaled_subsampled, _guide_for_masked, (data,))
    assert not torch.equal(results[0][0], results[1][0])


def test_compiled_loss_and_grads_matches_value(traced_only):
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    elbo = JensenELBO(jit=True)
    elbo.loss_and_grads(problem.model, problem.guide, *problem.args)  # traces
    pyro.set_rng_seed(3)
    value = elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    pyro.set_rng_seed(3)
    eager = JensenELBO().loss(problem.model, problem.guide, *problem.args)
    assert value == pytest.approx(eager, abs=1e-10)


def test_compiled_loss_and_grads_accumulates_like_backward(traced_only):
    """``loss_and_grads`` adds the compiled gradient into ``.grad`` without autograd: two
    calls without zeroing hold the sum of the two draws' eager gradients."""
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    leaves = list(problem.unconstrained_params().values())
    expected = [torch.zeros_like(leaf) for leaf in leaves]
    for seed in (3, 4):
        pyro.set_rng_seed(seed)
        loss = JensenELBO().differentiable_loss(problem.model, problem.guide, *problem.args)
        for total, grad in zip(expected, torch.autograd.grad(loss, leaves)):
            total += grad
    elbo = JensenELBO(jit=True)
    elbo.loss_and_grads(problem.model, problem.guide, *problem.args)  # traces
    for leaf in leaves:
        leaf.grad = None
    for seed in (3, 4):
        pyro.set_rng_seed(seed)
        elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    for leaf, total in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, total, rtol=1e-10, atol=1e-12)
    assert elbo.step_count == 3


def _attention_problem(name):
    options = {"num_train": 64, "num_test": 16, "batch_size": 16} if name == "cluttered_digits" \
        else {}
    problem = get_problem(name, dtype=torch.float64, **options)
    problem.set_params()
    assert problem.guide is empty_guide  # every latent is drawn from the model
    return problem


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
def test_hard_attention_traced_graph_equals_eager(traced_only, name, options):
    """Stateless HardAttentionELBO configurations trace; for the same seed the graph draws
    the same attention locations and gives the eager value and gradients."""
    problem = _attention_problem(name)
    results = _assert_same_draws(
        lambda jit_flag: HardAttentionELBO(
            jit=jit_flag, max_plate_nesting=problem.max_plate_nesting, **options),
        problem.model, problem.guide, problem.args)
    if options["estimator"] == "reinforce" or name == "cluttered_digits":
        # sampled locations or a sampled minibatch: the two seeds differ, the test is not vacuous
        assert not torch.equal(results[0][0], results[1][0])


# ---------------------------------------------------------------- Inductor (two compilations)
def test_inductor_loss_and_gradient_are_unbiased():
    """Inductor's own random numbers: the compiled L and dL average to the closed forms."""
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    elbo = JensenELBO(jit=True)
    elbo.differentiable_loss(problem.model, problem.guide, *problem.args)  # trace
    values, grads = draw_loss_and_grads(elbo, problem, num_draws=300)
    leaves = {n: leaf.detach().clone().requires_grad_()
              for n, leaf in problem.unconstrained_params().items()}
    exact = problem.exact_elbo({n: biject_to(problem.constraint(n))(leaf)
                                for n, leaf in leaves.items()})
    exact_grads = torch.autograd.grad(exact, list(leaves.values()))
    assert_mean_close(values, exact.detach(), what="L")
    for name, g in zip(leaves, exact_grads):
        assert_mean_close(grads[name], g, what=f"dL/d{name} (unconstrained)")
    assert not torch.equal(values[0], values[1])


def test_inductor_with_eager_random_equals_eager():
    """With Inductor's fallback_random the compiled graph draws torch's numbers: draw for draw
    equal to the eager loss."""
    problem = get_problem("logistic_regression", dtype=torch.float64)
    problem.set_params()
    model, guide = problem.model, problem.guide

    def make(jit_flag):
        elbo = JensenELBO(jit=jit_flag, num_particles=4, vectorize_particles=True,
                          max_plate_nesting=problem.max_plate_nesting)
        if jit_flag:
            elbo._jit().for_pair(model, guide).eager_random = True
        return elbo

    def traced_then_compiled(jit_flag):
        elbo = make(jit_flag)
        if jit_flag:  # the first call returns the trace's own result; the second compiles
            elbo.differentiable_loss(model, guide, *problem.args)
        return elbo

    _assert_same_draws(traced_then_compiled, model, guide, problem.args, seeds=(4,))


# ---------------------------------------------------------------- caches (issue 19, item 8)
def _model_with_scale(data, factor):
    loc = pyro.param("loc", torch.tensor(0.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, factor), obs=data)


def test_a_new_callable_per_call_is_bounded_and_warns(traced_only):
    """A functools.partial built per step used to compile on every step and keep every graph;
    the cache of (model, guide) pairs is bounded and says why it evicts."""
    elbo = JensenELBO(jit=True)
    data = torch.randn(5)
    with pytest.warns(RuntimeWarning, match="created anew for every call"):
        for _ in range(jit.MAX_PAIRS + 3):
            model = functools.partial(_model_with_scale, factor=1.0)
            elbo.loss_and_grads(model, empty_guide, data)
    assert len(elbo._compiled) == jit.MAX_PAIRS
    assert elbo._compiled.evictions == 3


def test_bound_methods_of_one_object_share_one_entry(traced_only):
    class Holder:
        def model(self, data):
            _model_with_scale(data, 1.0)

    holder, elbo = Holder(), JensenELBO(jit=True)
    for _ in range(3):
        elbo.loss_and_grads(holder.model, empty_guide, torch.randn(4))
    assert len(elbo._compiled) == 1


def test_the_compiled_gradient_refuses_a_second_derivative(traced_only):
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    elbo = JensenELBO(jit=True)
    leaves = list(problem.unconstrained_params().values())
    loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
    (grad,) = torch.autograd.grad(loss, leaves[:1], create_graph=True)
    with pytest.raises(RuntimeError, match="does not require grad|once_differentiable"):
        torch.autograd.grad(grad, leaves[:1])
