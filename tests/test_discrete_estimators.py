"""The discrete estimators' mathematics (elbos/discrete_estimators.py), without Pyro.

Every estimator is drawn on toy objectives E_q[f(b)] whose exact gradient comes from
enumerating b (compare/discrete_exact.py) and checked to be unbiased within 4 standard errors;
where the variance is known exactly by enumeration (REINFORCE, leave-one-out, DisARM) the
draws' variance is checked against it too. The enumeration module itself is checked against
closed forms on one variable. The straight-through estimator is shown to be biased (its bias
is beyond 4 SE), as its docstring says.
"""

from __future__ import annotations

import math

import pytest
import torch

from pyro_elbo_ext.compare.discrete_exact import (
    exact_expectation,
    exact_gradient,
    exact_variance,
)
from pyro_elbo_ext.compare.discrete_toys import (
    estimate,
    get_toy,
    gradient_draws,
    rebar_toy,
    samples_per_estimate,
)
from pyro_elbo_ext.elbos.discrete_estimators import (
    ControlVariate,
    antithetic_bernoulli,
    check_estimator,
    conditional_gumbel,
    conditional_logistic,
    disarm_weight,
    gumbel_relaxation,
    leave_one_out_signal,
    logistic_relaxation,
    variance_objective,
)
from tests.mc import K_SE, assert_mean_close

DRAWS = 40_000
EULER_GAMMA = 0.5772156649015329


def _logits(toy, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return toy.logits + 0.6 * torch.randn(toy.logits.shape, generator=gen, dtype=torch.float64)


def _control(toy, estimator):
    torch.manual_seed(3)
    categorical = toy.family == "categorical"
    if estimator == "rebar":
        return ControlVariate(toy.logits.shape, f=toy.f, use_relaxed_f=True, hidden=0,
                              categorical=categorical, dtype=torch.float64)
    if estimator == "relax":
        return ControlVariate(toy.logits.shape, hidden=8, categorical=categorical,
                              dtype=torch.float64)
    return None


# ---------------------------------------------------------------------------- the references
def test_exact_references_match_closed_forms_on_one_bernoulli():
    toy = rebar_toy(0.45)
    alpha = torch.tensor([0.7], dtype=torch.float64)
    p = torch.sigmoid(alpha)
    f0, f1 = 0.45**2, 0.55**2
    assert float(exact_expectation(toy.f, alpha, "bernoulli")) == pytest.approx(
        float(p * f1 + (1 - p) * f0))
    grad = p * (1 - p) * (f1 - f0)
    torch.testing.assert_close(exact_gradient(toy.f, alpha, "bernoulli"), grad)
    second = p * (f1 * (1 - p)) ** 2 + (1 - p) * (f0 * p) ** 2
    torch.testing.assert_close(exact_variance("reinforce", toy.f, alpha, "bernoulli", 1),
                               second - grad**2)
    # leave-one-out with two samples: g = (f1 - f2)(s1 - s2) / 2, nonzero only when they differ
    loo = 2 * p * (1 - p) * (0.5 * (f1 - f0)) ** 2 - grad**2
    torch.testing.assert_close(exact_variance("loo", toy.f, alpha, "bernoulli", 2), loo)
    # DisARM, one pair: g = sigma(|a|) (f1 - f0) / 2 on b != b~ (probability 2 min(p, 1-p))
    pair = 2 * torch.minimum(p, 1 - p) * (torch.sigmoid(alpha.abs()) * (f1 - f0) / 2) ** 2
    torch.testing.assert_close(exact_variance("disarm", toy.f, alpha, "bernoulli", 2),
                               pair - grad**2)


def test_exact_gradient_matches_closed_form_on_one_categorical():
    logits = torch.tensor([[0.3, -0.2, 0.5]], dtype=torch.float64)
    values = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)

    def f(b):
        return (b * values).sum((-1, -2))

    pi = torch.softmax(logits[0], -1)
    expected = pi * (values - (pi * values).sum())
    torch.testing.assert_close(exact_gradient(f, logits, "categorical")[0], expected)


# ---------------------------------------------------------------------------- unbiasedness
CASES = [
    ("rebar_t0.45", "reinforce", 1), ("rebar_t0.45", "reinforce", 2),
    ("rebar_t0.45", "loo", 2), ("rebar_t0.45", "loo", 4),
    ("rebar_t0.45", "disarm", 2), ("rebar_t0.45", "disarm", 4),
    ("rebar_t0.45", "relax", 1), ("rebar_t0.45", "rebar", 3),
    ("three_site", "reinforce", 2), ("three_site", "loo", 2), ("three_site", "loo", 3),
    ("three_site", "disarm", 2), ("three_site", "disarm", 6),
    ("three_site", "relax", 2), ("three_site", "rebar", 3),
    ("categorical", "reinforce", 2), ("categorical", "loo", 2), ("categorical", "loo", 4),
    ("categorical", "relax", 1), ("categorical", "rebar", 3),
]


@pytest.mark.parametrize("toy_name, estimator, evaluations", CASES)
def test_estimator_is_unbiased_and_has_its_exact_variance(toy_name, estimator, evaluations):
    toy = get_toy(toy_name)
    logits = _logits(toy)
    draws = gradient_draws(estimator, toy, evaluations, DRAWS, logits=logits,
                           control=_control(toy, estimator), seed=7)
    exact = exact_gradient(toy.f, logits, toy.family)
    assert_mean_close(draws, exact, what=f"{estimator} on {toy_name} at E={evaluations}")
    if estimator in ("reinforce", "loo", "disarm"):
        # squared deviations from the exact mean: iid draws whose mean is the variance, so
        # their own standard error is the right tolerance
        variance = exact_variance(estimator, toy.f, logits, toy.family, evaluations)
        assert_mean_close((draws - exact) ** 2, variance,
                          what=f"variance of {estimator} on {toy_name}")


def test_straight_through_is_biased_and_says_so():
    """Its mean misses the exact gradient by far more than 4 SE on every toy (the bias the
    docstring and the benchmark report), even on the one-variable toy."""
    for name in ("rebar_t0.45", "three_site", "categorical"):
        toy = get_toy(name)
        logits = _logits(toy)
        draws = gradient_draws("gumbel_st", toy, 1, DRAWS, logits=logits, seed=11)
        exact = exact_gradient(toy.f, logits, toy.family)
        z = (draws.mean(0) - exact) / (draws.std(0) / math.sqrt(DRAWS))
        assert float(z.abs().max()) > K_SE, name


def test_disarm_at_most_loo_at_two_evaluations_on_the_rebar_toy():
    """The ordering of the papers, exactly: REINFORCE >> leave-one-out >= DisARM (t = 0.499)."""
    toy = get_toy("rebar_t0.499")
    var = {name: float(exact_variance(name, toy.f, toy.logits, "bernoulli", 2).sum())
           for name in ("reinforce", "loo", "disarm")}
    assert var["loo"] < var["reinforce"] / 100
    assert var["disarm"] <= var["loo"]


# ---------------------------------------------------------------------------- relaxations
def test_conditional_logistic_has_the_law_of_z_given_b():
    gen = torch.Generator().manual_seed(0)
    alpha = torch.full((DRAWS,), 0.8, dtype=torch.float64)
    z = logistic_relaxation(alpha, torch.rand(DRAWS, generator=gen, dtype=torch.float64))
    b = (torch.rand(DRAWS, generator=gen, dtype=torch.float64) < torch.sigmoid(alpha)).double()
    z_tilde = conditional_logistic(alpha, b, torch.rand(DRAWS, generator=gen,
                                                         dtype=torch.float64))
    assert bool(((z_tilde > 0).double() == b).all())
    assert_mean_close(z, 0.8, what="logistic mean")
    for value in (0.0, 1.0):
        mine, ref = z_tilde[b == value], z[(z > 0).double() == value]
        se = math.sqrt(mine.var() / len(mine) + ref.var() / len(ref))
        assert abs(float(mine.mean() - ref.mean())) < K_SE * se, value


def test_conditional_gumbel_has_the_law_of_z_given_argmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.tensor([0.2, -0.7, 1.1], dtype=torch.float64).expand(DRAWS, 3)
    z = gumbel_relaxation(logits, torch.rand(DRAWS, 3, generator=gen, dtype=torch.float64))
    assert_mean_close(z, torch.log_softmax(logits[0], -1) + EULER_GAMMA, what="Gumbel mean")
    b = torch.distributions.Categorical(logits=logits).sample()
    z_tilde = conditional_gumbel(logits, b, torch.rand(DRAWS, 3, generator=gen,
                                                       dtype=torch.float64))
    assert bool((z_tilde.argmax(-1) == b).all())
    for k in range(3):
        mine, ref = z_tilde[b == k], z[z.argmax(-1) == k]
        se = (mine.var(0) / len(mine) + ref.var(0) / len(ref)).sqrt()
        assert bool(((mine.mean(0) - ref.mean(0)).abs() < K_SE * se).all()), k


def test_antithetic_pair_marginals_and_disarm_weight():
    gen = torch.Generator().manual_seed(2)
    alpha = torch.full((DRAWS,), -0.4, dtype=torch.float64)
    b, b_tilde = antithetic_bernoulli(alpha, torch.rand(DRAWS, generator=gen,
                                                        dtype=torch.float64))
    p = float(torch.sigmoid(alpha[0]))
    assert_mean_close(b, p, what="b")
    assert_mean_close(b_tilde, p, what="b~")
    assert not bool((b * b_tilde).any())  # p < 1/2: never both 1
    w = disarm_weight(alpha, b, b_tilde)
    assert bool((w[b == b_tilde] == 0).all())


# ---------------------------------------------------------------------------- RELAX's phi
def test_variance_objective_gradient_matches_finite_differences():
    """The phi-gradient of sum g^2 needs d/dphi of d/dalpha c_phi (a second derivative); on
    fixed noise it is a smooth function of phi, so central differences check it."""
    toy = get_toy("three_site")
    control = _control(toy, "rebar")
    torch.manual_seed(5)
    control.net = None
    logits = _logits(toy).expand(64, 3)

    def objective():
        gen = torch.Generator().manual_seed(9)
        g = estimate("rebar", toy, logits, 3, control, create_graph=True, generator=gen)
        return variance_objective(g)

    value = objective()
    grads = torch.autograd.grad(value, [control.eta, control.log_temperature])
    assert all(float(g.abs()) > 0 for g in grads)
    for param, grad in zip([control.eta, control.log_temperature], grads):
        h = 1e-5
        with torch.no_grad():
            param += h
        up = float(objective().detach())
        with torch.no_grad():
            param -= 2 * h
        down = float(objective().detach())
        with torch.no_grad():
            param += h
        assert (up - down) / (2 * h) == pytest.approx(float(grad), rel=1e-4)


def test_relax_control_variate_learns_to_lower_the_variance():
    """Adam on the variance objective at fixed logits: the trained control variate's variance is
    below the untrained one's by more than 4 SE (the RELAX paper's claim on its toy)."""
    toy = get_toy("rebar_t0.45")
    logits = toy.logits + 0.5
    control = _control(toy, "relax")
    before = gradient_draws("relax", toy, 1, 20_000, logits=logits, control=control, seed=1)
    opt = torch.optim.Adam(control.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(4)
    rows = logits.expand(256, 1)
    for _ in range(300):
        opt.zero_grad()
        g = estimate("relax", toy, rows, 1, control, create_graph=True, generator=gen)
        (variance_objective(g) / rows.shape[0]).backward()
        opt.step()
    after = gradient_draws("relax", toy, 1, 20_000, logits=logits, control=control, seed=2)
    sq_before, sq_after = (before - before.mean()) ** 2, (after - after.mean()) ** 2
    se = math.sqrt(sq_before.var() / len(before) + sq_after.var() / len(after))
    assert float(sq_before.mean() - sq_after.mean()) > K_SE * se
    assert_mean_close(after, exact_gradient(toy.f, logits, "bernoulli"), what="trained RELAX")


# ---------------------------------------------------------------------------- names, counts
def test_check_estimator_names_the_site_and_what_applies():
    bern = torch.distributions.Bernoulli(logits=torch.zeros(3))
    cat = torch.distributions.Categorical(logits=torch.zeros(3))
    assert check_estimator("disarm", "z", torch.distributions.Independent(bern, 1), 2) == "disarm"
    with pytest.raises(ValueError, match=r"unknown discrete_estimator 'arm' for site 'z'.*"
                       r"reinforce, loo, disarm, relax, gumbel_st"):
        check_estimator("arm", "z", bern, 2)
    with pytest.raises(ValueError, match=r"site 'c' \(Categorical\).*use one of reinforce, loo, "
                       r"relax$"):
        check_estimator("disarm", "c", cat, 2)
    with pytest.raises(ValueError, match=r"'c' \(Categorical\).*index"):
        check_estimator("gumbel_st", "c", cat, 1)
    with pytest.raises(ValueError, match=r"'z' needs num_particles >= 2.*use one of "
                       r"reinforce, relax, gumbel_st"):
        check_estimator("loo", "z", bern, 1)
    with pytest.raises(ValueError, match=r"'z' needs an even num_particles"):
        check_estimator("disarm", "z", bern, 3)
    poisson = torch.distributions.Poisson(torch.ones(2))
    with pytest.raises(ValueError, match=r"use one of reinforce, loo$"):
        check_estimator("relax", "n", poisson, 4)


def test_counts_and_small_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        leave_one_out_signal(torch.zeros(1, 3))
    assert samples_per_estimate("disarm", 6) == 3
    assert samples_per_estimate("rebar", 6) == 2
    with pytest.raises(ValueError, match="exactly 3 evaluations"):
        samples_per_estimate("disarm", 3)
    with pytest.raises(ValueError, match="more than"):
        toy = get_toy("three_site")
        exact_variance("loo", toy.f, toy.logits, "bernoulli", 8)
