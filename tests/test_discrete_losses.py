"""The discrete estimators inside the losses (``discrete_estimator=`` and ``infer=``), against
exact gradients by enumeration.

Every model runs R independent copies of a small problem inside a ``copies`` plate (the
parameters shared), so one call of the loss gives the mean of R independent estimates; the
mean over calls is compared with the exact gradient of one copy (enumeration of its
configurations, written here from the distributions' log-densities) within 4 standard errors.
"""

from __future__ import annotations

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_elbo_ext import HardAttentionELBO, ImportanceWeightedELBO, JensenELBO, empty_guide
from tests.mc import K_SE, assert_mean_close

R = 200  # copies per call
CALLS = 150
T = torch.tensor([0.499, 0.45, 0.55], dtype=torch.float64)
W = torch.tensor([[0.30, 0.25, 0.20], [0.10, 0.40, 0.26]], dtype=torch.float64)
M = torch.tensor([[0.0, 0.2, -0.1], [0.1, 0.0, 0.3], [-0.2, 0.1, 0.0]], dtype=torch.float64)


def _f_bits(b):
    """-(sum_i (b_i - t_i)^2 + 0.1 b_1 b_2): the reward of three bits (last dim)."""
    return -((b - T) ** 2).sum(-1) - 0.1 * b[..., 0] * b[..., 1]


# ---------------------------------------------------------------------------- models
def bits_plate_guide(estimator=None):
    def guide():
        a = pyro.param("a", torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64))
        infer = {} if estimator is None else {"discrete_estimator": estimator}
        with pyro.plate("copies", R, dim=-2):
            with pyro.plate("s", 3, dim=-1):
                pyro.sample("b", dist.Bernoulli(logits=a), infer=infer)
    return guide


def bits_plate_model_with_factor():
    with pyro.plate("copies", R, dim=-2):
        with pyro.plate("s", 3, dim=-1):
            b = pyro.sample("b", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        pyro.factor("f", _f_bits(b).unsqueeze(-1))


def bits_sequence_model():
    with pyro.plate("copies", R, dim=-1):
        bits = [pyro.sample(f"b{i}", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
                for i in range(3)]
        pyro.factor("f", _f_bits(torch.stack(bits, -1)))


def bits_sequence_guide():
    a = pyro.param("a", torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64))
    with pyro.plate("copies", R, dim=-1):
        for i in range(3):
            pyro.sample(f"b{i}", dist.Bernoulli(logits=a[i]))


def _f_categories(c1, c2):
    """The Categorical toy's reward on one-hot c1, c2."""
    linear = (c1 * W[0]).sum(-1) + (c2 * W[1]).sum(-1)
    return -(linear + ((c1 @ M) * c2).sum(-1))


def categorical_model(one_hot=False):
    def model():
        with pyro.plate("copies", R, dim=-1):
            fn = (dist.OneHotCategorical if one_hot else dist.Categorical)(
                logits=torch.zeros(3, dtype=torch.float64))
            cs = [pyro.sample(f"c{i}", fn) for i in range(2)]
            if not one_hot:
                cs = [torch.nn.functional.one_hot(c, 3).to(torch.float64) for c in cs]
            pyro.factor("f", _f_categories(*cs))
    return model


def categorical_guide(one_hot=False):
    def guide():
        a = pyro.param("a", torch.tensor([[0.2, -0.3, 0.4], [0.0, 0.5, -0.2]],
                                         dtype=torch.float64))
        with pyro.plate("copies", R, dim=-1):
            for i in range(2):
                pyro.sample(f"c{i}", (dist.OneHotCategorical if one_hot else
                                      dist.Categorical)(logits=a[i]))
    return guide


# ---------------------------------------------------------------------------- exact answers
def _exact_bits():
    """dL/da of one copy: L = E_q[log p(b) + f(b) - log q(b)] over the 8 configurations."""
    a = pyro.param("a").detach().clone().requires_grad_()
    configs = torch.tensor(list(itertools.product((0.0, 1.0), repeat=3)), dtype=torch.float64)
    log_q = dist.Bernoulli(logits=a).log_prob(configs).sum(-1)
    log_p = dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)).log_prob(configs).sum(-1)
    elbo = (log_q.exp() * (log_p + _f_bits(configs) - log_q)).sum()
    return torch.autograd.grad(elbo, a)[0]


def _exact_categories():
    a = pyro.param("a").detach().clone().requires_grad_()
    eye = torch.eye(3, dtype=torch.float64)
    total = 0.0
    for i, j in itertools.product(range(3), repeat=2):
        log_q = torch.log_softmax(a[0], -1)[i] + torch.log_softmax(a[1], -1)[j]
        log_p = 2 * math.log(1 / 3)
        total = total + log_q.exp() * (log_p + _f_categories(eye[i], eye[j]) - log_q)
    return torch.autograd.grad(total, a)[0]


def _draws(elbo, model, guide, num_calls=CALLS):
    """Per call, the gradient of L per copy (the mean of R independent estimates)."""
    pyro.clear_param_store()
    guide()
    leaf = pyro.param("a").unconstrained()
    rows = []
    for _ in range(num_calls):
        loss = elbo.differentiable_loss(model, guide)
        rows.append(-torch.autograd.grad(loss, leaf)[0] / R)
    return torch.stack(rows)


def _loss(estimator, particles=2, vectorize=True, nesting=2, cls=JensenELBO, **kwargs):
    return cls(num_particles=particles, vectorize_particles=vectorize,
               max_plate_nesting=nesting, discrete_estimator=estimator, **kwargs)


# ---------------------------------------------------------------------------- unbiasedness
UNBIASED = [("reinforce", 1, False), ("reinforce", 2, True), ("loo", 2, True),
            ("loo", 3, True), ("disarm", 2, True), ("disarm", 4, True), ("relax", 1, False),
            ("relax", 2, True)]


@pytest.mark.parametrize("estimator, particles, vectorize", UNBIASED)
def test_bernoulli_sites_in_a_plate(estimator, particles, vectorize):
    elbo = _loss(estimator, particles, vectorize)
    draws = _draws(elbo, bits_plate_model_with_factor, bits_plate_guide())
    assert_mean_close(draws, _exact_bits(), what=f"{estimator} x {particles}")


@pytest.mark.parametrize("estimator", ["loo", "disarm", "relax"])
def test_several_bernoulli_sites_in_sequence(estimator):
    elbo = _loss(estimator, 2, True, nesting=1)
    draws = _draws(elbo, bits_sequence_model, bits_sequence_guide)
    assert_mean_close(draws, _exact_bits(), what=estimator)


def bits_event_model():
    with pyro.plate("copies", R, dim=-1):
        b = pyro.sample("b", dist.Bernoulli(torch.full((3,), 0.5, dtype=torch.float64))
                        .to_event(1))
        pyro.factor("f", _f_bits(b))


def bits_event_guide():
    a = pyro.param("a", torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64))
    with pyro.plate("copies", R, dim=-1):
        pyro.sample("b", dist.Bernoulli(logits=a).to_event(1))


@pytest.mark.parametrize("estimator", ["loo", "disarm", "relax"])
def test_bernoulli_bits_as_one_site_with_an_event_dimension(estimator):
    """The antithetic pairs run along the particle dimension, left of the event dimension."""
    elbo = _loss(estimator, 4, True, nesting=1)
    draws = _draws(elbo, bits_event_model, bits_event_guide)
    assert_mean_close(draws, _exact_bits(), what=estimator)


@pytest.mark.parametrize("estimator", ["reinforce", "loo", "relax"])
def test_categorical_sites(estimator):
    elbo = _loss(estimator, 2, True, nesting=1)
    draws = _draws(elbo, categorical_model(), categorical_guide())
    assert_mean_close(draws, _exact_categories(), what=estimator)


def test_a_site_chooses_its_own_estimator():
    """infer={"discrete_estimator": ...} overrides the loss's default for that site only."""
    elbo = _loss("reinforce", 2, True)
    draws = _draws(elbo, bits_plate_model_with_factor, bits_plate_guide("disarm"))
    assert_mean_close(draws, _exact_bits(), what="per-site disarm")
    plain = _draws(_loss("reinforce", 2, True), bits_plate_model_with_factor,
                   bits_plate_guide())
    # REINFORCE's reward is Rao-Blackwellized by the data flow (issue 23): the ratio measured
    # at this seed is about 4 (it was above 5 under the plate rule)
    assert float(draws.var(0).sum()) < float(plain.var(0).sum()) / 3


def test_straight_through_is_biased_on_one_hot_sites_and_says_so():
    elbo = _loss("gumbel_st", 1, False, nesting=1)
    model, guide = categorical_model(one_hot=True), categorical_guide(one_hot=True)
    draws = _draws(elbo, model, guide)
    exact = _exact_categories()
    z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(CALLS))
    assert float(z.abs().max()) > K_SE  # the bias the docs report, not hidden
    notes = elbo.decompose(model, guide).notes
    assert any("'c0', 'c1' use the straight-through estimator" in n and "biased" in n
               for n in notes)


def test_subsampled_plate():
    """A local Bernoulli site in a plate of 6 subsampled to 3 (scale 2): the exact gradient of
    the full L, by enumerating the 64 configurations (independent per point)."""
    x = torch.tensor([0.4, -1.3, 2.2, 0.1, 1.7, -0.6], dtype=torch.float64)
    mu = torch.tensor([-1.0, 1.5], dtype=torch.float64)

    def model():
        with pyro.plate("copies", R, dim=-2):
            with pyro.plate("data", 6, subsample_size=3, dim=-1) as idx:
                z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)))
                pyro.sample("x", dist.Normal(mu[z.long()], 1.0), obs=x[idx])

    def guide():
        a = pyro.param("a", torch.linspace(-1, 1, 6, dtype=torch.float64))
        with pyro.plate("copies", R, dim=-2):
            with pyro.plate("data", 6, subsample_size=3, dim=-1) as idx:
                pyro.sample("z", dist.Bernoulli(logits=a[idx]))

    pyro.clear_param_store()
    guide()
    a = pyro.param("a").detach().clone().requires_grad_()
    z = torch.tensor([0.0, 1.0], dtype=torch.float64).unsqueeze(-1)  # (2, 1) x (6,)
    log_q = dist.Bernoulli(logits=a).log_prob(z)
    log_p = dist.Bernoulli(torch.tensor(0.3, dtype=torch.float64)).log_prob(z) + \
        dist.Normal(mu[z.long()], 1.0).log_prob(x)
    exact = torch.autograd.grad((log_q.exp() * (log_p - log_q)).sum(), a)[0]
    for estimator in ("loo", "disarm", "relax"):
        pyro.set_rng_seed(3)
        draws = _draws(_loss(estimator, 2, True), model, guide)
        assert_mean_close(draws, exact, what=f"subsampled, {estimator}")


def test_model_drawn_site_of_hard_attention():
    """HardAttentionELBO's prior-proposal site with the discrete estimators: the gradient of
    F = sum_l p(l) log p(y | l) wrt the attention logits, exactly."""
    y = torch.tensor(1.0, dtype=torch.float64)
    means = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)

    def model():
        a = pyro.param("a", torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64))
        with pyro.plate("copies", R, dim=-1):
            where = pyro.sample("where", dist.Categorical(logits=a))
            pyro.sample("y", dist.Normal(means[where], 1.0), obs=y)

    pyro.clear_param_store()
    model()
    a = pyro.param("a").detach().clone().requires_grad_()
    log_lik = dist.Normal(means, 1.0).log_prob(y)
    exact = torch.autograd.grad((torch.softmax(a, -1) * log_lik).sum(), a)[0]
    for estimator in ("loo", "relax"):
        elbo = HardAttentionELBO(estimator="reinforce", num_particles=2,
                                 vectorize_particles=True, max_plate_nesting=1,
                                 discrete_estimator=estimator)
        leaf = pyro.param("a").unconstrained()
        rows = []
        for _ in range(CALLS):
            loss = elbo.differentiable_loss(model, empty_guide)
            rows.append(-torch.autograd.grad(loss, leaf)[0] / R)
        draws = torch.stack(rows)
        assert_mean_close(draws, exact, what=f"hard attention, {estimator}")


# ---------------------------------------------------------------------------- errors
def test_errors_name_the_site_and_what_applies():
    with pytest.raises(ValueError, match="discrete_estimator must be one of reinforce, loo"):
        JensenELBO(discrete_estimator="arm")
    with pytest.raises(ValueError, match=r"site 'c0' \(Categorical\).*use one of reinforce, "
                       r"loo, relax"):
        _loss("disarm", 2, True, nesting=1).differentiable_loss(
            categorical_model(), categorical_guide())
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"'b' needs num_particles >= 2"):
        _loss("loo", 1, False).differentiable_loss(bits_plate_model_with_factor,
                                                   bits_plate_guide())
    with pytest.raises(ValueError, match=r"'b' needs vectorize_particles=True"):
        _loss("disarm", 2, False).differentiable_loss(bits_plate_model_with_factor,
                                                      bits_plate_guide())
    with pytest.raises(ValueError, match="does not support discrete_estimator='disarm'"):
        ImportanceWeightedELBO(discrete_estimator="disarm")

    def normal_guide():
        pyro.sample("z", dist.Normal(0.0, 1.0), infer={"discrete_estimator": "loo"})

    def normal_model():
        pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match=r"site 'z' asks for discrete_estimator='loo', but "
                       r"its distribution \(Normal\) is reparameterized"):
        JensenELBO().differentiable_loss(normal_model, normal_guide)


def test_disarm_refuses_a_site_whose_logits_depend_on_another_draw():
    def model():
        with pyro.plate("copies", 5, dim=-1):
            b1 = pyro.sample("b1", dist.Bernoulli(torch.tensor(0.5)))
            pyro.sample("b2", dist.Bernoulli(0.2 + 0.6 * b1))

    def guide():
        a = pyro.param("a", torch.tensor(0.3))
        with pyro.plate("copies", 5, dim=-1):
            b1 = pyro.sample("b1", dist.Bernoulli(logits=a))
            pyro.sample("b2", dist.Bernoulli(logits=a + 2 * b1),
                        infer={"discrete_estimator": "disarm"})

    with pytest.raises(ValueError, match=r"at site 'b2': the site's logits differ between the "
                       r"two members of an antithetic pair"):
        for _ in range(20):  # until a pair's b1 differ
            _loss("reinforce", 2, True, nesting=1).differentiable_loss(model, guide)


# ---------------------------------------------------------------------------- RELAX's state
def test_relax_control_variates_are_state():
    elbo = _loss("relax", 2, True)
    model, guide = bits_plate_model_with_factor, bits_plate_guide()
    pyro.clear_param_store()
    before = None
    for step in range(30):
        elbo.differentiable_loss(model, guide)
        if step == 0:
            before = {k: v.clone() for k, v in elbo.carried_state().items()}
    state = elbo.carried_state()
    assert any(key[0] == "relax" for key in state)
    moved = [k for k in state if k[2] == "weight" and not torch.equal(state[k], before[k])]
    assert moved  # trained after each step
    saved = elbo.state_dict()
    fresh = _loss("relax", 2, True)
    fresh.load_state_dict(saved)
    for key, value in elbo.carried_state().items():
        torch.testing.assert_close(fresh.carried_state()[key], value)
    with elbo.state_updates_paused():
        elbo.differentiable_loss(model, guide)
    for key, value in elbo.carried_state().items():
        assert torch.equal(value, state[key]) or key[-1] == "skipped"


# ---------------------------------------------------------------------------- compiled
@pytest.mark.parametrize("estimator, particles, vectorize",
                         [("loo", 2, True), ("disarm", 2, True), ("relax", 2, True),
                          ("gumbel_st", 1, False)])
def test_jit_graph_equals_eager_draw_for_draw(monkeypatch, estimator, particles, vectorize):
    """jit=True's traced graph (run uncompiled) gives the eager step's value and gradient for
    the same seed, after one step each (RELAX's control variate trained once in both)."""
    from pyro_elbo_ext.compiled import backend

    monkeypatch.setattr(backend, "BACKEND", None)
    results = []
    for jit in (False, True):
        pyro.clear_param_store()
        elbo = _loss(estimator, particles, vectorize, jit=jit)
        guide = bits_plate_guide()
        guide()
        pyro.set_rng_seed(1)
        elbo.differentiable_loss(bits_plate_model_with_factor, guide)
        leaf = pyro.param("a").unconstrained()
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(bits_plate_model_with_factor, guide)
        results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
    (eager, eager_grad), (jitted, jit_grad) = results
    torch.testing.assert_close(jitted, eager, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(jit_grad, eager_grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("estimator, particles, vectorize",
                         [("loo", 2, True), ("disarm", 2, True), ("relax", 2, True),
                          ("gumbel_st", 1, False)])
def test_compiled_svi_steps_as_svi_does(monkeypatch, estimator, particles, vectorize):
    """CompiledSVI compiles every estimator (none refused): from the same parameters and state,
    its step equals pyro.infer.SVI's with the eager loss (parameters, and RELAX's control
    variate after its update)."""
    from pyro.infer import SVI

    from pyro_elbo_ext import CompiledSVI
    from pyro_elbo_ext.compiled import backend

    monkeypatch.setattr(backend, "BACKEND", None)  # the traced graph, not Inductor, under test
    guide = bits_plate_guide()
    after = []
    for compiled in (True, False):
        pyro.clear_param_store()
        guide()
        loss = _loss(estimator, particles, vectorize)
        optim = pyro.optim.Adam({"lr": 0.05})
        svi = (CompiledSVI if compiled else SVI)(bits_plate_model_with_factor, guide, optim,
                                                   loss)
        pyro.set_rng_seed(3)
        svi.step()
        after.append((pyro.param("a").detach().clone(), loss.state_dict()))
    (compiled_a, compiled_state), (eager_a, eager_state) = after
    assert not torch.equal(eager_a, torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(compiled_a, eager_a, rtol=1e-9, atol=1e-10)
    assert compiled_state.keys() == eager_state.keys()
    if estimator == "relax":
        for key, value in eager_state["relax"]["slots"].items():
            torch.testing.assert_close(compiled_state["relax"]["slots"][key], value,
                                       rtol=1e-8, atol=1e-10)
