"""AnalyticKLELBO against closed forms, enumeration and Pyro's TraceMeanField_ELBO.

Every Monte Carlo assertion uses ``K_SE`` (tests/mc.py) standard errors of the estimate itself;
every reference value is a closed form written out by hand here or in the problem registry
(or brute-force enumeration), never a value computed by the loss under test.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value
from torch.distributions import constraints

from pyro_elbo_ext.compiled import backend as compiled_backend
from pyro_elbo_ext.elbos.analytic_kl import AUXILIARY_WEIGHTED, AnalyticKLELBO
from pyro_elbo_ext.elbos.dependencies import model_parents
from pyro_elbo_ext.elbos.jensen import JensenELBO
from pyro_elbo_ext.elbos.kl import analytic_kl
from pyro_elbo_ext.problems import CONJUGATE_PROBLEMS, Problem, get_problem

from .mc import K_SE, assert_mean_close, draw_loss_and_grads
from .models import local_global_guide, local_global_model

LOG_2PI = math.log(2 * math.pi)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: a second intra-op thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _problem(name, **options):
    return get_problem(name, dtype=torch.float64, **options)


def _vectorized(particles=20, **options):
    return AnalyticKLELBO(
        num_particles=particles, vectorize_particles=True, max_plate_nesting=1, **options
    )


def _assert_matches_closed_form(elbo, problem, num_draws, what):
    exact_elbo, exact_grads = problem.exact_elbo_and_grad()
    values, grads = draw_loss_and_grads(elbo, problem, num_draws=num_draws)
    assert_mean_close(values, exact_elbo, what=f"L ({what})")
    for param, draws in grads.items():
        assert_mean_close(draws, exact_grads[param], what=f"dL/d{param} ({what})")


def _normal_kl(m, s, mu0, tau0):
    """KL[N(m, s^2) || N(mu0, tau0^2)], written out."""
    return torch.log(tau0 / s) + (s**2 + (m - mu0) ** 2) / (2 * tau0**2) - 0.5


def _normal_expected_log_density(mean, var, sd):
    """E[log N(x; y, sd)] where x - y has the given mean and variance."""
    return -0.5 * LOG_2PI - math.log(sd) - (var + mean**2) / (2 * sd**2)


# ---------------------------------------------------------------------------- conjugate problems
@pytest.mark.parametrize("where", ["misfit", "posterior"])
@pytest.mark.parametrize("name", CONJUGATE_PROBLEMS)
def test_conjugate_L_and_dL_match_closed_form(name, where):
    problem = _problem(name)
    problem.set_posterior() if where == "posterior" else problem.set_params()
    if where == "posterior":
        assert problem.exact_elbo_and_grad()[0] == pytest.approx(problem.log_evidence, abs=1e-9)
    elbo = _vectorized()
    _assert_matches_closed_form(elbo, problem, num_draws=150, what=f"{name}, {where}")
    decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    kl_terms = [t for t in decomposition.terms if t.kind == "kl"]
    assert len(kl_terms) == 1 and kl_terms[0].analytic


def test_analytic_kl_term_is_the_closed_form_kl():
    """The reported KL of normal_normal's z equals the textbook KL, with no sampling noise."""
    problem = _problem("normal_normal")
    problem.set_params()
    decomposition = AnalyticKLELBO().decompose(problem.model, problem.guide, *problem.args)
    m, s = problem.init_params["loc"], problem.init_params["scale"]
    expected = _normal_kl(m, s, m.new_tensor(0.0), m.new_tensor(2.0))
    assert decomposition.by_site()["z"]["kl"] == pytest.approx(float(expected), rel=1e-12)


# ------------------------------------------------------------------------- Pyro's mean-field ELBO
def test_equals_trace_mean_field_elbo_draw_for_draw():
    """Same seed, same samples: ours and TraceMeanField_ELBO give the same L and dL, so they
    are equal in expectation (global + subsampled local latents, plate scale applied)."""
    data = torch.linspace(-2, 3, 10, dtype=torch.float64)
    params = None
    for trial in range(5):
        results = []
        for loss in (AnalyticKLELBO(), TraceMeanField_ELBO()):
            pyro.set_rng_seed(trial)
            value = loss.differentiable_loss(local_global_model, local_global_guide, data)
            params = params or [
                pyro.param(n).unconstrained() for n in ("z_loc", "z_scale", "u_loc", "u_scale")
            ]
            results.append((value, torch.autograd.grad(value, params)))
        (ours, our_grads), (pyros, pyro_grads) = results
        assert float(ours.detach()) == pytest.approx(float(pyros.detach()), rel=1e-10)
        for g1, g2 in zip(our_grads, pyro_grads):
            torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_discrete_guide_matches_enumeration_where_pyro_refuses():
    problem = _problem("tiny_discrete")
    problem.set_params()
    with pytest.raises(NotImplementedError):
        TraceMeanField_ELBO().differentiable_loss(problem.model, problem.guide, *problem.args)
    elbo = _vectorized(particles=8)
    _assert_matches_closed_form(elbo, problem, num_draws=400, what="tiny_discrete")
    decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    assert set(decomposition.analytic_sites) == {"c", "z"}


# ---------------------------------------------------------------------------- no registered KL
def _lognormal_guide_for_gamma_poisson() -> Problem:
    """gamma_poisson's model with q(lam) = LogNormal(m, s): torch has no KL(LogNormal, Gamma).

    With E[log lam] = m, E[lam] = exp(m + s^2/2), H[q] = m + 1/2 + log s + log(2 pi)/2:
    L = S m - N E[lam] - sum log x! + a0 log b0 - lgamma(a0) + (a0 - 1) m - b0 E[lam] + H[q].
    """
    base = _problem("gamma_poisson")
    (x,) = base.args
    a0, b0 = 2.0, 1.0
    total, n, log_fact = float(x.sum()), x.shape[0], float(torch.lgamma(x + 1).sum())

    def guide(data):
        m = pyro.param("m", lambda: data.new_tensor(0.5))
        s = pyro.param("s", lambda: data.new_tensor(0.4), constraint=constraints.positive)
        pyro.sample("lam", dist.LogNormal(m, s))

    def exact_elbo(params):
        m, s = params["m"], params["s"]
        e_lam = torch.exp(m + s**2 / 2)
        e_loglik = total * m - n * e_lam - log_fact
        e_logprior = a0 * math.log(b0) - math.lgamma(a0) + (a0 - 1) * m - b0 * e_lam
        entropy = m + 0.5 + torch.log(s) + 0.5 * LOG_2PI
        return e_loglik + e_logprior + entropy

    return Problem(
        name="gamma_poisson_lognormal", description="", model=base.model, guide=guide,
        args=base.args, init_params={"m": x.new_tensor(0.5), "s": x.new_tensor(0.4)},
        param_constraints={"s": constraints.positive}, exact_elbo=exact_elbo,
    )


def test_unregistered_pair_falls_back_to_monte_carlo_and_matches_closed_form():
    problem = _lognormal_guide_for_gamma_poisson()
    problem.set_params()
    elbo = _vectorized()
    decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    assert decomposition.analytic_sites == ()
    assert "kl" in decomposition.by_site()["lam"]
    _assert_matches_closed_form(elbo, problem, num_draws=150, what="LogNormal vs Gamma")


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal])
def test_autoguide_delta_sites_keep_their_jacobian(guide_class):
    """An autoguide's q(lam) is LogNormal(loc, scale): L must match that closed form.

    Its site is a Delta carrying log|dz/du| in ``log_density``; Pyro's registered
    KL(Delta, p) = -log p(v) would drop it (a bias of E[log lam] = loc).
    """
    problem = _lognormal_guide_for_gamma_poisson()
    start = init_to_value(values={"lam": torch.tensor(3.5, dtype=torch.float64)})
    guide = guide_class(problem.model, init_loc_fn=start, init_scale=0.3)
    guide(*problem.args)  # initialize: loc = log 3.5, so the dropped term would be ~1.25
    if guide_class is AutoNormal:
        loc, scale = guide.locs.lam, guide.scales.lam
    else:
        loc, scale = guide.loc[0], guide.scale[0]
    with torch.no_grad():
        exact = float(problem.exact_elbo({"m": loc, "s": scale}))
    elbo = _vectorized()
    values = torch.tensor([-elbo.loss(problem.model, guide, *problem.args) for _ in range(60)])
    assert_mean_close(values, exact, what=guide_class.__name__)


# ---------------------------------------------------------------------------- dependencies
ALPHA, BETA, SIGMA2, SIGMA_X = 0.8, 0.3, 0.9, 0.7
CHAIN_DATA = torch.tensor([1.1, 0.4, 1.9], dtype=torch.float64)


def _chain_model(data):
    """p(z1) p(z2 | z1) prod_j p(x_j | z2): z1 ~ N(0, 1), z2 | z1 ~ N(ALPHA z1 + BETA, SIGMA2)."""
    z1 = pyro.sample("z1", dist.Normal(data.new_tensor(0.0), 1.0))
    z2 = pyro.sample("z2", dist.Normal(ALPHA * z1 + BETA, SIGMA2))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(z2, SIGMA_X), obs=data)


def _chain_problem(first: str) -> Problem:
    """A Gaussian guide q(first) q(second | first), linear in its parent, with L by hand.

    q(first) = N(a, s_first), q(second | first) = N(b + c * first, s_second), so (z1, z2) is
    jointly Gaussian under q and every term of L is a Gaussian expectation of a quadratic.
    """
    second = "z2" if first == "z1" else "z1"

    def guide(data):
        a = pyro.param("a", lambda: data.new_tensor(0.3))
        b = pyro.param("b", lambda: data.new_tensor(-0.2))
        c = pyro.param("c", lambda: data.new_tensor(0.5))
        s_first = pyro.param("s_first", lambda: data.new_tensor(0.7),
                             constraint=constraints.positive)
        s_second = pyro.param("s_second", lambda: data.new_tensor(0.6),
                              constraint=constraints.positive)
        z_first = pyro.sample(first, dist.Normal(a, s_first))
        pyro.sample(second, dist.Normal(b + c * z_first, s_second))

    def exact_elbo(params):
        a, b, c = params["a"], params["b"], params["c"]
        s_first, s_second = params["s_first"], params["s_second"]
        mean = {first: a, second: b + c * a}
        var = {first: s_first**2, second: c**2 * s_first**2 + s_second**2}
        cov = c * s_first**2
        e_log_p1 = _normal_expected_log_density(mean["z1"], var["z1"], 1.0)
        # z2 - ALPHA z1 - BETA has mean m2 - ALPHA m1 - BETA, var v2 + ALPHA^2 v1 - 2 ALPHA cov
        e_log_p2 = _normal_expected_log_density(
            mean["z2"] - ALPHA * mean["z1"] - BETA,
            var["z2"] + ALPHA**2 * var["z1"] - 2 * ALPHA * cov, SIGMA2,
        )
        e_loglik = sum(
            _normal_expected_log_density(x - mean["z2"], var["z2"], SIGMA_X)
            for x in CHAIN_DATA
        )
        entropy = 0.5 * (LOG_2PI + 1) * 2 + torch.log(s_first) + torch.log(s_second)
        return e_log_p1 + e_log_p2 + e_loglik + entropy

    t = CHAIN_DATA.new_tensor
    return Problem(
        name=f"chain_{first}_first", description="", model=_chain_model, guide=guide,
        args=(CHAIN_DATA,),
        init_params={"a": t(0.3), "b": t(-0.2), "c": t(0.5), "s_first": t(0.7),
                     "s_second": t(0.6)},
        param_constraints={"s_first": constraints.positive, "s_second": constraints.positive},
        exact_elbo=exact_elbo,
    )


def test_valid_non_mean_field_guide_keeps_the_analytic_path():
    """q(z1) q(z2 | z1) for p(z1) p(z2 | z1): both KLs analytic, no warning, L and dL exact."""
    problem = _chain_problem(first="z1")
    problem.set_params()
    elbo = _vectorized()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    assert set(decomposition.analytic_sites) == {"z1", "z2"}
    _assert_matches_closed_form(elbo, problem, num_draws=150, what="valid chain guide")


def test_dependency_violation_falls_back_to_monte_carlo_with_a_named_warning():
    """q(z2) q(z1 | z2): p(z2 | z1) depends on z1, sampled after z2 -> z2 uses the MC term.

    The fallback keeps the estimator unbiased: L and dL still match the closed form.
    """
    problem = _chain_problem(first="z2")
    problem.set_params()
    elbo = _vectorized()
    with pytest.warns(UserWarning, match=r"'z2' \(its model distribution depends on 'z1'\)"):
        decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    assert decomposition.analytic_sites == ("z1",)
    _assert_matches_closed_form(elbo, problem, num_draws=150, what="violating guide, fallback")


def test_dependency_violation_can_raise_instead():
    problem = _chain_problem(first="z2")
    problem.set_params()
    elbo = AnalyticKLELBO(on_dependency_violation="raise")
    with pytest.raises(ValueError, match="'z2'.*depends on 'z1'"):
        elbo.loss(problem.model, problem.guide, *problem.args)


def test_dependencies_not_site_order_decide():
    """Independent z1, z2 sampled in the opposite order by the guide: still analytic.

    Pyro's TraceMeanField_ELBO warns here because it only compares site order.
    """

    def model():
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        z2 = pyro.sample("z2", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z1 + z2, 1.0), obs=torch.tensor(0.5))

    def guide():
        pyro.sample("z2", dist.Normal(0.1, 0.9))
        pyro.sample("z1", dist.Normal(-0.1, 0.8))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decomposition = AnalyticKLELBO().decompose(model, guide)
    assert set(decomposition.analytic_sites) == {"z1", "z2"}
    with pytest.warns(UserWarning, match="mean field restriction"):
        TraceMeanField_ELBO().loss(model, guide)


def test_model_parents_follow_data_dependencies():
    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("k", dist.Categorical(torch.ones(3)))

    def model():
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))  # no parents, though a comes first
        k = pyro.sample("k", dist.Categorical(logits=torch.stack([a, b, a * b])))
        pyro.sample("x", dist.Normal(torch.tensor([0.0, 1.0, 2.0])[k], 1.0),
                    obs=torch.tensor(0.3))

    guide_trace = pyro.poutine.trace(guide).get_trace()
    state = torch.get_rng_state()
    parents = model_parents(model, guide_trace, (), {})
    assert torch.equal(state, torch.get_rng_state())  # consumes no randomness
    assert parents == {"a": frozenset(), "b": frozenset(), "k": frozenset({"a", "b"})}


# ---------------------------------------------------------------------------- closed-form KL helper
def test_analytic_kl_through_wrappers():
    q_loc, q_scale = torch.tensor([0.1, -0.4, 0.7]), torch.tensor([0.5, 1.2, 0.9])
    p_loc, p_scale = torch.tensor(0.2), torch.tensor(1.5)
    by_hand = _normal_kl(q_loc, q_scale, p_loc, p_scale)
    q = dist.Normal(q_loc, q_scale)
    p_expanded = ExpandedDistribution(dist.Normal(p_loc, p_scale), torch.Size([3]))
    torch.testing.assert_close(analytic_kl(q, p_expanded), by_hand)
    torch.testing.assert_close(
        analytic_kl(q.to_event(1), dist.Normal(p_loc, p_scale).expand([3]).to_event(1)),
        by_hand.sum(),
    )
    mask = torch.tensor([True, False, True])
    torch.testing.assert_close(
        analytic_kl(q.mask(mask), p_expanded.mask(mask)), torch.where(mask, by_hand, 0.0)
    )
    with pytest.raises(NotImplementedError):
        analytic_kl(q.mask(mask), p_expanded.mask(~mask))
    with pytest.raises(NotImplementedError):
        analytic_kl(q.mask(mask), p_expanded)
    # batch broadcasting: a global q against a plate-expanded p
    torch.testing.assert_close(
        analytic_kl(dist.Normal(p_loc, p_scale), dist.Normal(q_loc, q_scale)),
        torch.log(q_scale / p_scale) + (p_scale**2 + (p_loc - q_loc) ** 2) / (2 * q_scale**2)
        - 0.5,
    )


@pytest.mark.parametrize("mask_guide", [True, False])
def test_masked_sites_keep_the_analytic_kl_only_when_both_sides_are_masked(mask_guide):
    """poutine.mask on a plate of latents: with the same mask on model and guide the KL is
    analytic and zero where masked; with the mask on the model only, the site uses the MC term
    (where masked: -log q, not a KL)."""
    mask = torch.tensor([True, False, True, True])
    q_loc, q_scale = torch.tensor([0.1, -0.4, 0.7, 0.2]), torch.tensor([0.5, 1.2, 0.9, 0.3])

    def model():
        with pyro.plate("p", 4), pyro.poutine.mask(mask=mask):
            pyro.sample("u", dist.Normal(0.0, 2.0))

    def guide():
        with pyro.plate("p", 4), pyro.poutine.mask(mask=mask if mask_guide else True):
            pyro.sample("u", dist.Normal(q_loc, q_scale))

    decomposition = AnalyticKLELBO().decompose(model, guide)
    if mask_guide:
        kl = _normal_kl(q_loc, q_scale, torch.tensor(0.0), torch.tensor(2.0))
        assert decomposition.analytic_sites == ("u",)
        assert decomposition.by_site()["u"]["kl"] == pytest.approx(float(kl[mask].sum()))
    else:
        assert decomposition.analytic_sites == ()


# ---------------------------------------------------------------------------- KL weight
def _kl_and_grad_by_hand(problem):
    """KL[q(z) || p(z)] of normal_normal and its gradient wrt the unconstrained leaves."""
    leaves = problem.unconstrained_params()
    loc = leaves["loc"].detach().clone().requires_grad_(True)
    raw = leaves["scale"].detach().clone().requires_grad_(True)
    kl = _normal_kl(loc, raw.exp(), loc.new_tensor(0.0), loc.new_tensor(2.0))
    return float(kl.detach()), torch.autograd.grad(kl, [loc, raw])


def test_kl_weight_schedule_applies_to_value_and_gradient_at_each_step():
    """Same seed: L_w - L_1 = (1 - w_t) KL and dL_w - dL_1 = (1 - w_t) dKL, KL by hand."""
    problem = _problem("normal_normal")
    problem.set_params()
    schedule = [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    weighted = AnalyticKLELBO(kl_weight=lambda step: min(1.0, step / 4))
    plain = AnalyticKLELBO()
    kl, kl_grad = _kl_and_grad_by_hand(problem)
    leaves = list(problem.unconstrained_params().values())
    for step, w in enumerate(schedule):
        assert weighted.step_count == step
        pyro.set_rng_seed(step)
        loss_w = weighted.differentiable_loss(problem.model, problem.guide, *problem.args)
        grads_w = torch.autograd.grad(loss_w, leaves)
        pyro.set_rng_seed(step)
        loss_1 = plain.differentiable_loss(problem.model, problem.guide, *problem.args)
        grads_1 = torch.autograd.grad(loss_1, leaves)
        assert float((loss_1 - loss_w).detach()) == pytest.approx((1 - w) * kl, rel=1e-9, abs=1e-12)
        for g_w, g_1, g_kl in zip(grads_w, grads_1, kl_grad):
            torch.testing.assert_close(g_w - g_1, -(1 - w) * g_kl, rtol=1e-9, atol=1e-12)
    assert weighted.step_count == len(schedule)


def test_kl_weight_one_equals_the_plain_loss():
    problem = _problem("tiny_discrete")  # discrete sites: the score-function part too
    problem.set_params()
    leaves = list(problem.unconstrained_params().values())
    out = []
    for elbo in (AnalyticKLELBO(), AnalyticKLELBO(kl_weight=1.0),
                 AnalyticKLELBO(kl_weight=lambda step: 1.0)):
        pyro.set_rng_seed(3)
        loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        out.append((float(loss.detach()), torch.autograd.grad(loss, leaves)))
    for value, grads in out[1:]:
        assert value == out[0][0]
        for g, g0 in zip(grads, out[0][1]):
            assert torch.equal(g, g0)
    assert AnalyticKLELBO(kl_weight=1.0).decompose(
        problem.model, problem.guide, *problem.args).notes == ()


def test_kl_sites_limit_the_weight():
    """Weight 0 on z1 only (valid chain guide): L_w - L_1 = KL[q(z1) || p(z1)], by hand."""
    problem = _chain_problem(first="z1")
    problem.set_params()
    weighted = AnalyticKLELBO(kl_weight=0.0, kl_sites=["z1"])
    pyro.set_rng_seed(1)
    d_w = weighted.decompose(problem.model, problem.guide, *problem.args)
    pyro.set_rng_seed(1)
    d_1 = AnalyticKLELBO().decompose(problem.model, problem.guide, *problem.args)
    kl_z1 = _normal_kl(torch.tensor(0.3), torch.tensor(0.7), torch.tensor(0.0), torch.tensor(1.0))
    assert d_w.elbo - d_1.elbo == pytest.approx(float(kl_z1), rel=1e-6)
    assert d_w.by_site()["z2"]["kl"] == d_1.by_site()["z2"]["kl"]
    assert "NOT a lower bound" in d_w.notes[0] and "'z1'" in d_w.notes[0]


def test_svi_steps_advance_the_schedule_and_evaluation_does_not():
    problem = _problem("normal_normal")
    problem.set_params()
    elbo = AnalyticKLELBO(kl_weight=lambda step: 2.0 if step >= 2 else 0.5)
    svi = SVI(problem.model, problem.guide, pyro.optim.SGD({"lr": 1e-4}), loss=elbo)
    for _ in range(3):
        svi.step(*problem.args)
    assert elbo.step_count == 3
    elbo.loss(problem.model, problem.guide, *problem.args)
    decomposition = elbo.decompose(problem.model, problem.guide, *problem.args)
    assert elbo.step_count == 3
    assert "kl_weight = 2" in decomposition.notes[0] and "looser" in decomposition.notes[0]
    state = elbo.state_dict()
    resumed = AnalyticKLELBO(kl_weight=elbo.kl_weight)
    resumed.load_state_dict(state)
    assert resumed.step_count == 3 and resumed.state_dict() == {"step_count": 3}


def test_compiled_loss_equals_eager_and_advances_the_step_count(monkeypatch):
    """jit=True with a constant weight: the traced graph (run uncompiled, so that it draws
    torch's random numbers: see tests/test_compiled.py) gives the eager values and gradients
    for the same draws; the count advances once per step on both paths (loss_and_grads calls
    the compiled differentiable_loss inside it)."""
    monkeypatch.setattr(compiled_backend, "BACKEND", None)
    problem = _problem("tiny_discrete")
    problem.set_params()
    leaves = list(problem.unconstrained_params().values())
    results = []
    for jit in (False, True):
        elbo = AnalyticKLELBO(jit=jit, ignore_jit_warnings=True, kl_weight=0.5)
        if jit:  # compile first: tracing draws random numbers of its own
            elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        pyro.set_rng_seed(5)
        loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
        elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
        assert elbo.step_count == (3 if jit else 2)
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _kl_only_model(data):
    """x does not depend on z: L = log p(x | theta) - w KL[q(z) || p(z)], deterministic with
    the closed-form KL, so trajectories can be compared exactly."""
    theta = pyro.param("theta", torch.tensor(0.3, dtype=torch.float64))
    pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(theta, 1.0), obs=data)


def _kl_only_guide(data):
    loc = pyro.param("q_loc", torch.tensor(0.5, dtype=torch.float64))
    scale = pyro.param("q_scale", torch.tensor(0.7, dtype=torch.float64),
                       constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def test_a_kl_weight_schedule_is_a_graph_input_of_the_compiled_paths(monkeypatch):
    """SVI with the eager loss, SVI with jit=True and CompiledSVI take the same steps under a
    warm-up schedule (the traced graphs run uncompiled: the schedule's handling is under test),
    and a constant weight takes other steps (the schedule is not frozen at its first value)."""
    from pyro_elbo_ext import CompiledSVI
    from pyro_elbo_ext.compiled import backend

    monkeypatch.setattr(backend, "BACKEND", None)
    data = torch.tensor([1.0, 0.4, 1.6], dtype=torch.float64)

    def run(svi_class, kl_weight, jit=False):
        pyro.clear_param_store()
        elbo = AnalyticKLELBO(kl_weight=kl_weight, jit=jit)
        svi = svi_class(_kl_only_model, _kl_only_guide, pyro.optim.Adam({"lr": 0.1}), elbo)
        losses = [svi.step(data) for _ in range(6)]
        assert elbo.step_count == 6
        return losses, {k: v.detach().clone() for k, v in pyro.get_param_store().items()}

    schedule = lambda step: min(1.0, 0.1 + step / 4)  # noqa: E731
    expected = run(pyro.infer.SVI, schedule)
    for got in (run(pyro.infer.SVI, schedule, jit=True), run(CompiledSVI, schedule)):
        assert got[0] == pytest.approx(expected[0], rel=1e-12)
        for name, value in expected[1].items():
            torch.testing.assert_close(got[1][name], value, rtol=1e-12, atol=1e-12)
    frozen = run(CompiledSVI, 0.1)
    assert frozen[0][-1] != pytest.approx(expected[0][-1], rel=1e-6)
    # a constant weight too: jit=True under SVI steps every parameter at every step (SVI finds
    # them by the pyro.param reads the compiled call replays; it once stepped them only on the
    # first, traced, call)
    constant = run(pyro.infer.SVI, 0.5)
    for got in (run(pyro.infer.SVI, 0.5, jit=True), run(CompiledSVI, 0.5)):
        assert got[0] == pytest.approx(constant[0], rel=1e-12)
        for name, value in constant[1].items():
            torch.testing.assert_close(got[1][name], value, rtol=1e-12, atol=1e-12)


class TestValidation:
    @pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "x", None])
    def test_bad_kl_weight_names_it(self, bad):
        with pytest.raises(ValueError, match="kl_weight"):
            AnalyticKLELBO(kl_weight=bad)

    def test_schedule_returning_a_negative_weight_names_the_step(self):
        problem = _problem("normal_normal")
        problem.set_params()
        elbo = AnalyticKLELBO(kl_weight=lambda step: 1.0 - step)
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        with pytest.raises(ValueError, match=r"kl_weight\(2\)"):
            elbo.differentiable_loss(problem.model, problem.guide, *problem.args)

    def test_unknown_kl_site_is_named(self):
        problem = _problem("normal_normal")
        problem.set_params()
        with pytest.raises(ValueError, match="'zz'"):
            AnalyticKLELBO(kl_sites=["zz"]).loss(problem.model, problem.guide, *problem.args)

    def test_bad_violation_action_and_state(self):
        with pytest.raises(ValueError, match="on_dependency_violation"):
            AnalyticKLELBO(on_dependency_violation="ignore")
        with pytest.raises(ValueError, match="step_count"):
            AnalyticKLELBO().load_state_dict({"step": 3})


# ---------------------------------------------------------------------------- decomposition
def test_decompose_shows_the_same_L_as_the_jensen_form_on_the_same_samples():
    """Same seed, same samples: identical expected log-likelihood; L differs only by
    mean_k log p(z_k) - E_q[log p(z)], whose SE is sqrt(Var_q[log p(z)] / n) in closed form."""
    problem = _problem("normal_normal")
    problem.set_params()
    n = 4000
    options = dict(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    pyro.set_rng_seed(7)
    jensen = JensenELBO(**options).decompose(problem.model, problem.guide, *problem.args)
    pyro.set_rng_seed(7)
    kl_form = AnalyticKLELBO(**options).decompose(problem.model, problem.guide, *problem.args)
    assert kl_form.by_kind()["log_likelihood"] == pytest.approx(
        jensen.by_kind()["log_likelihood"], rel=1e-12
    )
    assert set(jensen.by_kind()) == {"log_likelihood", "log_prior", "entropy"}
    assert set(kl_form.by_kind()) == {"log_likelihood", "kl"}
    m, s, mu0, tau0 = 0.0, 0.5, 0.0, 2.0  # init guide, prior
    var_log_prior = (2 * s**4 + 4 * s**2 * (m - mu0) ** 2) / (4 * tau0**4)
    se = math.sqrt(var_log_prior / n)
    assert abs(jensen.elbo - kl_form.elbo) <= K_SE * se
    kl_by_hand = _normal_kl(*(torch.tensor(v, dtype=torch.float64) for v in (m, s, mu0, tau0)))
    assert kl_form.by_site()["z"]["kl"] == pytest.approx(float(kl_by_hand), rel=1e-12)


# ---------------------------------------------------------------------------- AutoGuides
AUTO_DATA = torch.tensor([0.5, 1.2, -0.3], dtype=torch.float64)
AUTO_PRIOR_SD = (2.0, 1.5)


def _auto_model(data, two_latents=False):
    """z1 ~ N(0, 2) [, z2 ~ N(0, 1.5)], x_j ~ N(z1 [+ z2], 1), j = 1..3."""
    mean = pyro.sample("z1", dist.Normal(data.new_tensor(0.0), AUTO_PRIOR_SD[0]))
    if two_latents:
        mean = mean + pyro.sample("z2", dist.Normal(data.new_tensor(0.0), AUTO_PRIOR_SD[1]))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(mean, 1.0), obs=data)


def _auto_guide_and_q(guide_class, two_latents):
    """The autoguide, initialized, and its q = N(loc_i, scale_i) per latent, read from it."""
    guide = guide_class(_auto_model, init_scale=0.4)
    guide(AUTO_DATA, two_latents)
    names = ("z1", "z2") if two_latents else ("z1",)
    with torch.no_grad():
        if guide_class is AutoNormal:
            q = {
                n: (getattr(guide.locs, n).clone(), getattr(guide.scales, n).clone())
                for n in names
            }
        else:
            q = {n: (guide.loc[i].clone(), guide.scale[i].clone()) for i, n in enumerate(names)}
    return guide, q


def _auto_expected_loglik_and_kls(q):
    """E_q[log p(x | z)] (x_j - sum z has mean x_j - sum loc, var sum scale^2) and the KLs."""
    mean = sum(loc for loc, _ in q.values())
    var = sum(scale**2 for _, scale in q.values())
    e_loglik = sum(_normal_expected_log_density(x - mean, var, 1.0) for x in AUTO_DATA)
    kls = {
        name: float(_normal_kl(loc, scale, loc.new_tensor(0.0), loc.new_tensor(sd)))
        for (name, (loc, scale)), sd in zip(q.items(), AUTO_PRIOR_SD)
    }
    return float(e_loglik), kls


def _draws_of_L(elbo, guide, two_latents, num_draws=60):
    return torch.tensor(
        [-elbo.loss(_auto_model, guide, AUTO_DATA, two_latents) for _ in range(num_draws)]
    )


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal])
def test_autoguide_kl_weight_weights_the_whole_kl(guide_class, kl_weight):
    """L_w = E log p(x|z) - w KL[q || p] for an AutoGuide: its auxiliary entropy is part of
    the KL and takes the weight too (at w = 0, the expected log-likelihood alone)."""
    guide, q = _auto_guide_and_q(guide_class, two_latents=False)
    e_loglik, kls = _auto_expected_loglik_and_kls(q)
    elbo = _vectorized(kl_weight=kl_weight)
    values = _draws_of_L(elbo, guide, False)
    assert_mean_close(values, e_loglik - kl_weight * kls["z1"],
                      what=f"{guide_class.__name__}, w={kl_weight}")


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal])
def test_autoguide_decomposition_labels_the_auxiliary_entropy(guide_class):
    """The Delta site's 'kl' is not a KL by itself: 'kl' - auxiliary 'entropy' is, and a note
    says so.  The auxiliary entropy is the analytic H[N(loc, scale)]."""
    guide, q = _auto_guide_and_q(guide_class, two_latents=False)
    _, kls = _auto_expected_loglik_and_kls(q)
    elbo = _vectorized(particles=200)
    decompositions = [elbo.decompose(_auto_model, guide, AUTO_DATA) for _ in range(40)]
    (aux,) = [t for t in decompositions[0].terms if t.site not in ("z1", "obs")]
    assert aux.kind == "entropy" and aux.analytic
    scale = q["z1"][1]
    assert aux.value == pytest.approx(float(0.5 * (LOG_2PI + 1) + torch.log(scale)), rel=1e-12)
    kl_draws = torch.tensor([d.by_site()["z1"]["kl"] - aux.value for d in decompositions])
    assert_mean_close(kl_draws, kls["z1"], what=f"{guide_class.__name__} KL")
    assert any("auxiliary" in note and repr(aux.site) in note
               for note in decompositions[0].notes)


def test_autonormal_kl_sites_weight_only_the_named_latents_auxiliary_entropy():
    """AutoNormal has one auxiliary site per latent: kl_sites=['z1'] with w = 0 gives
    E log p(x|z) - KL[q(z2) || p(z2)] (z1's whole KL weighted 0, z2's kept)."""
    guide, q = _auto_guide_and_q(AutoNormal, two_latents=True)
    e_loglik, kls = _auto_expected_loglik_and_kls(q)
    elbo = _vectorized(kl_weight=0.0, kl_sites=["z1"])
    values = _draws_of_L(elbo, guide, True)
    assert_mean_close(values, e_loglik - kls["z2"], what="AutoNormal, kl_sites=['z1']")
    (plan,) = elbo._plans._plans.values()
    weights = plan.fact(AUXILIARY_WEIGHTED)
    assert weights == {"z1_unconstrained": True, "z2_unconstrained": False}


def test_joint_auxiliary_site_with_partial_kl_sites_raises_naming_it():
    """AutoDiagonalNormal's one auxiliary latent feeds z1 and z2: weighting z1 only cannot be
    split, so it raises (naming the site, advising kl_sites=None); naming both is fine."""
    guide, q = _auto_guide_and_q(AutoDiagonalNormal, two_latents=True)
    with pytest.raises(ValueError, match=r"'_AutoDiagonalNormal_latent'.*kl_sites=None"):
        AnalyticKLELBO(kl_weight=0.5, kl_sites=["z1"]).loss(
            _auto_model, guide, AUTO_DATA, True
        )
    e_loglik, kls = _auto_expected_loglik_and_kls(q)
    elbo = _vectorized(kl_weight=0.5, kl_sites=["z1", "z2"])
    values = _draws_of_L(elbo, guide, True)
    assert_mean_close(values, e_loglik - 0.5 * (kls["z1"] + kls["z2"]),
                      what="AutoDiagonalNormal, kl_sites=both")


def test_unknown_kl_site_raises_with_validation_off():
    problem = _problem("normal_normal")
    problem.set_params()
    with pyro.validation_enabled(False):
        with pytest.raises(ValueError, match=r"'zz'.*\['z'\]"):
            AnalyticKLELBO(kl_sites=["zz"]).loss(problem.model, problem.guide, *problem.args)
