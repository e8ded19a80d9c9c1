"""JensenELBO against closed forms, enumeration and Pyro's Trace_ELBO.

Monte Carlo assertions use ``K_SE`` (tests/mc.py) standard errors of the estimate itself.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

from pyro_elbo_ext import JensenELBO
from pyro_elbo_ext.problems import CONJUGATE_PROBLEMS, get_problem

from .mc import K_SE, assert_mean_close, draw_loss_and_grads, standard_error
from .models import local_global_guide, local_global_model

ENTROPIES = ["analytic", "sampled", "path"]


def _problem(name, **options):
    return get_problem(name, dtype=torch.float64, **options)


@pytest.mark.parametrize("entropy", ENTROPIES)
@pytest.mark.parametrize("where", ["misfit", "posterior"])
@pytest.mark.parametrize("name", CONJUGATE_PROBLEMS)
def test_conjugate_L_and_dL_match_closed_form(name, where, entropy):
    """Mean of L = log p(X) - KL[q || p(Z|X)] and mean of dL = the closed-form gradient."""
    problem = _problem(name)
    problem.set_posterior() if where == "posterior" else problem.set_params()
    exact_elbo, exact_grads = problem.exact_elbo_and_grad()
    if where == "posterior":
        assert exact_elbo == pytest.approx(problem.log_evidence, abs=1e-9)
    values, grads = draw_loss_and_grads(JensenELBO(entropy=entropy), problem, num_draws=300)
    assert_mean_close(values, exact_elbo, what=f"L ({name}, {where}, {entropy})")
    for param, draws in grads.items():
        assert_mean_close(draws, exact_grads[param], what=f"dL/d{param}")


@pytest.mark.parametrize("entropy", ENTROPIES)
@pytest.mark.parametrize("vectorize", [False, True])
def test_discrete_guide_sites_match_enumeration(entropy, vectorize):
    """Global and per-datum discrete latents: L and dL (guide and model params) vs enumeration."""
    problem = _problem("tiny_discrete")
    problem.set_params()
    exact_elbo, exact_grads = problem.exact_elbo_and_grad()
    particles = 4 if vectorize else 1
    elbo = JensenELBO(
        entropy=entropy, num_particles=particles, vectorize_particles=vectorize,
        max_plate_nesting=1,
    )
    values, grads = draw_loss_and_grads(elbo, problem, num_draws=500 if vectorize else 1000)
    assert_mean_close(values, exact_elbo, what="L")
    for param, draws in grads.items():
        assert_mean_close(draws, exact_grads[param], what=f"dL/d{param}")


def test_path_gradient_is_zero_for_every_draw_at_exact_posterior():
    problem = _problem("normal_normal")
    problem.set_posterior()
    _, grads = draw_loss_and_grads(JensenELBO(entropy="path"), problem, num_draws=50)
    for param, draws in grads.items():
        assert draws.abs().max() < 1e-10, param
    # the other estimators are not zero-variance there: the test can tell them apart
    _, grads = draw_loss_and_grads(JensenELBO(entropy="analytic"), problem, num_draws=50)
    assert grads["loc"].abs().max() > 1e-3


def _stop_gradient_cases():
    loc = torch.tensor([0.3, -1.0, 0.5], requires_grad=True)
    scale = torch.tensor([0.7, 1.2, 0.9], requires_grad=True)
    tril = (torch.tril(torch.full((3, 3), 0.2)) + torch.eye(3)).requires_grad_(True)
    return (loc, scale, tril), {
        "normal": dist.Normal(loc, scale),
        "independent": dist.Normal(loc, scale).to_event(1),
        "masked": dist.Normal(loc, scale).mask(torch.tensor([True, False, True])),
        "mvn": dist.MultivariateNormal(loc, scale_tril=tril),
        "expanded": dist.Normal(loc[0], scale[0]).expand([4]),
        "gamma": dist.Gamma(scale, scale + 1.0),
        "lognormal (transformed: deep-copy fallback)": dist.LogNormal(loc, scale),
    }


@pytest.mark.parametrize("case", list(_stop_gradient_cases()[1]))
def test_stop_gradient_copy_has_the_value_and_only_the_sample_path(case):
    """The path estimator's frozen q: same log q(z), gradient through z only (as Pyro's deep
    copy), and the original distribution untouched."""
    from pyro.distributions.util import detach

    from pyro_elbo_ext.elbos.graphs import stop_gradient

    params, cases = _stop_gradient_cases()
    fn = cases[case]
    z = fn.rsample().detach().requires_grad_(True)
    frozen = stop_gradient(fn).log_prob(z)
    assert torch.equal(frozen, detach(fn).log_prob(z))
    assert torch.equal(frozen, fn.log_prob(z))
    assert all(g is None for g in torch.autograd.grad(frozen.sum(), params, allow_unused=True))
    (dz,) = torch.autograd.grad(frozen.sum(), [z])
    (dz_reference,) = torch.autograd.grad(detach(fn).log_prob(z).sum(), [z])
    assert torch.equal(dz, dz_reference)
    live = torch.autograd.grad(fn.log_prob(z).sum(), params, allow_unused=True)
    assert any(g is not None for g in live)  # the original still depends on its parameters


def test_path_falls_back_to_sampled_when_parameters_depend_on_a_latent():
    """q(z2 | z1) with loc = z1: detaching q's parameters would drop a pathwise term."""

    def model():
        z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
        pyro.sample("z2", dist.Normal(z1, 1.0))
        pyro.sample("x", dist.Normal(pyro.sample("z3", dist.Normal(0.0, 1.0)), 1.0),
                    obs=torch.tensor(0.3))

    def guide():
        a = pyro.param("a", torch.tensor(0.2))
        z1 = pyro.sample("z1", dist.Normal(a, 1.0))
        pyro.sample("z2", dist.Normal(z1 * 0.5, 1.0))
        pyro.sample("z3", dist.Normal(a, 1.0))

    elbo = JensenELBO(entropy="path")
    elbo.differentiable_loss(model, guide)
    (plan,) = elbo._plans._plans.values()
    used = {site.name: site.treatment.entropy for site in plan.sites if site.role == "guided"}
    assert used == {"z1": "path", "z2": "sampled", "z3": "path"}
    # and the estimator stays unbiased: compare with the sampled estimator's mean gradient
    a = pyro.param("a")
    draws = {}
    for entropy in ("path", "sampled"):
        loss = JensenELBO(entropy=entropy, num_particles=4000, vectorize_particles=True,
                          max_plate_nesting=0)
        draws[entropy] = torch.stack(
            [torch.autograd.grad(loss.differentiable_loss(model, guide), a)[0]
             for _ in range(20)])
    diff = draws["path"].mean() - draws["sampled"].mean()
    se = math.hypot(float(standard_error(draws["path"])), float(standard_error(draws["sampled"])))
    assert abs(float(diff)) < K_SE * se


@pytest.mark.parametrize("name", CONJUGATE_PROBLEMS + ("tiny_discrete",))
def test_agrees_with_trace_elbo_in_expectation(name):
    problem = _problem(name)
    problem.set_params()
    means, ses = [], []
    for elbo in (JensenELBO(), Trace_ELBO()):
        values, _ = draw_loss_and_grads(elbo, problem, num_draws=400)
        means.append(values.mean())
        ses.append(standard_error(values))
    assert abs(float(means[0] - means[1])) < K_SE * math.hypot(ses[0], ses[1])


def test_loss_differentiable_loss_and_loss_and_grads_agree_for_the_same_seed():
    problem = _problem("tiny_discrete")
    problem.set_params()
    elbo = JensenELBO(num_particles=3)
    results = []
    for method in ("loss", "differentiable_loss", "loss_and_grads"):
        pyro.set_rng_seed(123)
        value = getattr(elbo, method)(problem.model, problem.guide, *problem.args)
        results.append(float(value.detach()) if torch.is_tensor(value) else value)
    assert results[0] == pytest.approx(results[1], abs=1e-12)
    assert results[0] == pytest.approx(results[2], abs=1e-12)


def test_loss_and_grads_gradient_equals_differentiable_loss_gradient():
    problem = _problem("tiny_discrete")
    problem.set_params()
    leaves = list(problem.unconstrained_params().values())
    elbo = JensenELBO(num_particles=2)
    pyro.set_rng_seed(7)
    expected = torch.autograd.grad(
        elbo.differentiable_loss(problem.model, problem.guide, *problem.args), leaves
    )
    pyro.set_rng_seed(7)
    elbo.loss_and_grads(problem.model, problem.guide, *problem.args)
    for leaf, grad in zip(leaves, expected):
        torch.testing.assert_close(leaf.grad, grad, rtol=1e-12, atol=1e-12)


def test_vectorized_and_sequential_particles_agree_in_expectation():
    problem = _problem("beta_bernoulli")
    problem.set_params()
    exact_elbo, _ = problem.exact_elbo_and_grad()
    for vectorize in (False, True):
        elbo = JensenELBO(num_particles=8, vectorize_particles=vectorize, max_plate_nesting=1)
        values, _ = draw_loss_and_grads(elbo, problem, num_draws=150)
        assert_mean_close(values, exact_elbo, what=f"vectorize={vectorize}")


def test_subsampled_plate_is_unbiased_for_the_full_data_L():
    problem = _problem("normal_normal", num_data=20, subsample_size=5)
    problem.set_params()
    exact_elbo, exact_grads = problem.exact_elbo_and_grad()
    values, grads = draw_loss_and_grads(JensenELBO(), problem, num_draws=600)
    assert_mean_close(values, exact_elbo, what="subsampled L")
    assert_mean_close(grads["loc"], exact_grads["loc"], what="subsampled dL/dloc")


def test_poutine_scale_multiplies_L():
    problem = _problem("gamma_poisson")
    problem.set_params()
    exact_elbo, _ = problem.exact_elbo_and_grad()
    model = pyro.poutine.scale(problem.model, scale=2.5)
    guide = pyro.poutine.scale(problem.guide, scale=2.5)
    values = torch.stack([
        -JensenELBO().differentiable_loss(model, guide, *problem.args).detach()
        for _ in range(300)
    ])
    assert_mean_close(values, 2.5 * exact_elbo, what="scaled L")


def _local_latent_model(data, mask):
    loc = pyro.sample("loc", dist.Normal(0.0, 3.0))
    with pyro.plate("data", data.shape[0]), pyro.poutine.mask(mask=mask):
        z = pyro.sample("z", dist.Normal(loc, 1.0))
        pyro.sample("x", dist.Normal(z, 0.5), obs=data)


def _local_latent_guide(data, mask):
    pyro.sample("loc", dist.Normal(pyro.param("m", torch.tensor(0.1)), 0.7))
    with pyro.plate("data", data.shape[0]), pyro.poutine.mask(mask=mask):
        pyro.sample("z", dist.Normal(pyro.param("zloc", torch.zeros(data.shape[0])), 0.4))


def test_masked_latent_sites_contribute_nothing():
    """Masked local latents drop their log p, entropy and likelihood: equal to the subset's L."""
    torch.manual_seed(1)
    data = torch.randn(6, dtype=torch.float64)
    mask = torch.tensor([True, False, True, True, False, True])
    pyro.param("zloc", torch.linspace(-1, 1, 6, dtype=torch.float64))
    pyro.param("m", torch.tensor(0.1, dtype=torch.float64))
    # the entropy of the masked sites is deterministic: a missing mask would shift the mean
    full = JensenELBO().decompose(_local_latent_model, _local_latent_guide, data, mask)
    h = 0.5 * math.log(2 * math.pi * math.e * 0.4**2)
    assert full.by_site()["z"]["entropy"] == pytest.approx(4 * h, abs=1e-12)
    # and L matches Trace_ELBO (which honours masks) in expectation
    draws = {}
    for elbo in (JensenELBO(), Trace_ELBO()):
        draws[type(elbo).__name__] = torch.tensor([
            -elbo.loss(_local_latent_model, _local_latent_guide, data, mask) for _ in range(400)
        ])
    a, b = draws.values()
    assert abs(float(a.mean() - b.mean())) < K_SE * math.hypot(standard_error(a),
                                                                 standard_error(b))


def test_masked_distribution_entropy_is_masked():
    def model():
        with pyro.plate("p", 3):
            pyro.sample("z", dist.Normal(0.0, 1.0).mask(torch.tensor([True, False, True])))

    def guide():
        with pyro.plate("p", 3):
            pyro.sample("z", dist.Normal(0.0, 2.0).mask(torch.tensor([True, False, True])))

    decomposition = JensenELBO().decompose(model, guide)
    assert decomposition.by_site()["z"]["entropy"] == pytest.approx(
        2 * 0.5 * math.log(2 * math.pi * math.e * 4.0), abs=1e-6
    )
    assert "z" in decomposition.analytic_sites


@pytest.mark.parametrize(
    "guide_class", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal, AutoDelta]
)
def test_autoguides_agree_with_trace_elbo(guide_class):
    problem = _problem("beta_bernoulli")
    guide = guide_class(problem.model)
    guide(*problem.args)  # initialize
    draws = []
    for elbo in (JensenELBO(), Trace_ELBO()):
        draws.append(torch.tensor([-elbo.loss(problem.model, guide, *problem.args)
                                   for _ in range(300)]))
    se = math.hypot(standard_error(draws[0]), standard_error(draws[1]))
    assert abs(float(draws[0].mean() - draws[1].mean())) < K_SE * se + 1e-9


def test_svi_recovers_the_conjugate_posterior():
    problem = _problem("normal_normal")
    problem.set_params()
    svi = SVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 0.05}),
              loss=JensenELBO(entropy="path"))
    for _ in range(1500):
        svi.step(*problem.args)
    post = problem.posterior_params
    # path gradients vanish at the posterior, so Adam settles there up to its step noise
    assert float(pyro.param("loc")) == pytest.approx(float(post["loc"]), abs=0.02)
    assert float(pyro.param("scale")) == pytest.approx(float(post["scale"]), rel=0.05)


def test_elbo_module_with_a_plain_torch_optimizer():
    problem = _problem("gamma_poisson")
    guide = AutoNormal(problem.model)
    loss_fn = JensenELBO(num_particles=4, vectorize_particles=True)(problem.model, guide)
    loss_fn(*problem.args)  # creates the guide's parameters
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(800):
        optimizer.zero_grad()
        loss_fn(*problem.args).backward()
        optimizer.step()
    # the guide's median of lam against the exact Gamma posterior's mean (sd ~ 0.37)
    alpha, beta = problem.posterior_params["alpha"], problem.posterior_params["beta"]
    median = float(guide.median(*problem.args)["lam"])
    assert median == pytest.approx(float(alpha / beta), abs=0.15)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtype_is_preserved(dtype, device):
    problem = get_problem("normal_normal", dtype=dtype, device=device)
    problem.set_params()
    loss = JensenELBO().differentiable_loss(problem.model, problem.guide, *problem.args)
    assert loss.dtype == dtype and loss.device.type == device.type
    loss.backward()


def test_decompose_reports_the_terms_of_L():
    problem = _problem("normal_normal")
    problem.set_params()
    result = JensenELBO(num_particles=10).decompose(problem.model, problem.guide, *problem.args)
    assert result.elbo == pytest.approx(sum(t.contribution for t in result.terms), abs=1e-9)
    assert set(result.by_kind()) == {"log_likelihood", "log_prior", "entropy"}
    assert result.analytic_sites == ("z",)
    # the analytic entropy of N(0, 0.5) is exact, not an estimate
    assert result.by_site()["z"]["entropy"] == pytest.approx(
        0.5 * math.log(2 * math.pi * math.e * 0.25), abs=1e-12
    )
    assert "analytic" in str(result)
    sampled = JensenELBO(entropy="sampled").decompose(problem.model, problem.guide, *problem.args)
    assert sampled.analytic_sites == ()


class TestBadInput:
    def test_latent_missing_from_guide_points_to_hard_attention(self):
        problem = _problem("normal_normal")
        with pytest.raises(ValueError, match=r"'z' is not sampled by the guide.*HardAttentionELBO"):
            JensenELBO().loss(problem.model, lambda data: None, *problem.args)

    def test_guide_site_missing_from_model(self):
        problem = _problem("normal_normal")

        def guide(data):
            problem.guide(data)
            pyro.sample("extra", dist.Normal(0.0, 1.0))

        with pytest.raises(ValueError, match=r"guide site 'extra'.*is_auxiliary"):
            JensenELBO().loss(problem.model, guide, *problem.args)

    def test_auxiliary_guide_site_is_allowed(self):
        problem = _problem("normal_normal")

        def guide(data):
            problem.guide(data)
            pyro.sample("extra", dist.Normal(0.0, 1.0), infer={"is_auxiliary": True})

        problem.set_params()
        result = JensenELBO().decompose(problem.model, guide, *problem.args)
        assert result.by_site()["extra"]["entropy"] == pytest.approx(
            0.5 * math.log(2 * math.pi * math.e), rel=1e-6  # a float32 site
        )

    @pytest.mark.parametrize("num_particles", [0, -1, 1.5, True])
    def test_num_particles(self, num_particles):
        with pytest.raises(ValueError, match="num_particles"):
            JensenELBO(num_particles=num_particles)

    def test_unknown_entropy_estimator(self):
        with pytest.raises(ValueError, match="entropy must be one of"):
            JensenELBO(entropy="exact")

    def test_plate_shape_mismatch_names_site_and_plate(self):
        def model():
            with pyro.plate("data", 3):
                pyro.sample("x", dist.Normal(torch.zeros(4), 1.0), obs=torch.zeros(4))

        # the plate itself refuses the broadcast, naming both
        with pytest.raises(ValueError, match=r"plate\('data'\) at site x"):
            JensenELBO().loss(model, lambda: None)

    def test_undeclared_batch_dimension_names_site(self):
        def model():
            with pyro.plate("data", 3):
                pyro.sample("x", dist.Normal(torch.zeros(2, 3), 1.0), obs=torch.zeros(2, 3))

        with pytest.raises(ValueError, match=r"site 'x' has batch shape \(2, 3\).*to_event"):
            JensenELBO(max_plate_nesting=1).loss(model, lambda: None)

    def test_nan_log_density_is_attributed_to_its_site(self):
        def model():
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0, validate_args=False),
                        obs=torch.tensor(float("nan")))

        def guide():
            pyro.sample("z", dist.Normal(0.0, 1.0))

        with pytest.warns(UserWarning, match="log_likelihood of site 'x'"):
            JensenELBO().loss(model, guide)

    @pytest.mark.parametrize("method", ["differentiable_loss", "loss_and_grads", "decompose"])
    def test_nan_log_density_is_attributed_through_every_method(self, method):
        def model():
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0, validate_args=False),
                        obs=torch.tensor(float("nan")))

        def guide():
            pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

        with pytest.warns(UserWarning, match="log_likelihood of site 'x'"):
            getattr(JensenELBO(), method)(model, guide)

    def test_compiled_loss_warns_on_a_nonfinite_estimate(self):
        def model(data):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0, validate_args=False), obs=data)

        def guide(data):
            pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

        elbo = JensenELBO(jit=True, ignore_jit_warnings=True)
        elbo.loss_and_grads(model, guide, torch.tensor(0.5))  # compiles on finite data
        with pytest.warns(UserWarning, match=r"jit=True.*not finite.*jit=False"):
            elbo.loss_and_grads(model, guide, torch.tensor(float("nan")))


def test_masked_discrete_site_feeding_an_unmasked_likelihood_keeps_its_score():
    """A mask drops a site's own log-density, not its sample: dL still needs its score.

    Exact dL by enumerating both binary latents; masking the score (instead of leaving it
    unmasked, as Pyro does) would give 0 for the masked entry instead of about -0.24.
    """
    data = torch.tensor([1.0, -0.5], dtype=torch.float64)
    mask = torch.tensor([True, False])

    def model():
        with pyro.plate("d", 2):
            with pyro.poutine.mask(mask=mask):
                z = pyro.sample("z", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
            pyro.sample("x", dist.Normal(2 * z - 1, 1.0), obs=data)

    def guide():
        q = pyro.param("q", torch.tensor([0.3, 0.6], dtype=torch.float64),
                       constraint=dist.constraints.unit_interval)
        with pyro.plate("d", 2), pyro.poutine.mask(mask=mask):
            pyro.sample("z", dist.Bernoulli(q))

    guide()
    leaf = pyro.param("q").unconstrained()
    q = pyro.param("q")
    exact = 0.0
    for z in itertools.product([0.0, 1.0], repeat=2):
        z = torch.tensor(z, dtype=torch.float64)
        log_q = dist.Bernoulli(q).log_prob(z)
        log_lik = dist.Normal(2 * z - 1, 1.0).log_prob(data).sum()
        prior_minus_q = ((dist.Bernoulli(0.5).log_prob(z) - log_q) * mask).sum()
        exact = exact + log_q.sum().exp() * (log_lik + prior_minus_q)
    (exact_grad,) = torch.autograd.grad(exact, leaf)
    assert abs(float(exact_grad[1])) > 0.1  # the masked entry's gradient is not zero
    elbo = JensenELBO(num_particles=2000, vectorize_particles=True, max_plate_nesting=1)
    draws = torch.stack([torch.autograd.grad(-elbo.differentiable_loss(model, guide), leaf)[0]
                         for _ in range(20)])
    assert_mean_close(draws, exact_grad, what="dL/dq with a masked guide site")


def test_nonfinite_gradient_is_attributed_to_its_site():
    """L is finite (sqrt(0) = 0) but d sqrt(a)/da is infinite at a = 0: the warning names 'x'."""

    def model():
        a = pyro.param("a", torch.tensor(0.0))
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z + torch.sqrt(a), 1.0), obs=torch.tensor(1.0))

    def guide():
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), loss=JensenELBO())
    pattern = r"L is finite but its gradient is not.*log_likelihood of site 'x'"
    with pytest.warns(UserWarning, match=pattern):
        loss = svi.step()
    assert math.isfinite(loss)


def test_sampled_entropy_equals_trace_elbo_draw_for_draw_with_subsampled_local_latents():
    """Same seed, same draws: the model must replay the guide's minibatch, as Pyro's replay does.

    With entropy="sampled" JensenELBO is Trace_ELBO's estimator, so L and dL agree exactly.
    """
    data = torch.linspace(-2, 3, 10, dtype=torch.float64)

    for seed in range(3):
        results = []
        for elbo in (JensenELBO(entropy="sampled"), Trace_ELBO()):
            pyro.set_rng_seed(seed)
            loss = elbo.differentiable_loss(local_global_model, local_global_guide, data)
            leaves = [pyro.param(n).unconstrained()
                      for n in ("z_loc", "z_scale", "u_loc", "u_scale")]
            results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
        (ours, our_grads), (theirs, their_grads) = results
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
        for a, b in zip(our_grads, their_grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
