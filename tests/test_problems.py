"""The registry's exact answers are right: checked by quadrature and by Pyro's enumeration.

These tests validate the yardsticks the loss tests use, independently of our losses.
"""

import itertools
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from pyro_elbo_ext.problems import CONJUGATE_PROBLEMS, PROBLEMS, get_problem

# 1-d quadrature over the unconstrained line u, with z = T(u): the integrands are smooth there
TRANSFORMS = {
    "normal_normal": dist.transforms.identity_transform,
    "beta_bernoulli": dist.transforms.SigmoidTransform(),
    "gamma_poisson": dist.transforms.ExpTransform(),
}


def _quadrature_grid(name):
    """Latent grid points z and log of their quadrature weights, log(du |dz/du|)."""
    u = torch.linspace(-40.0, 40.0, 400001, dtype=torch.float64)
    transform = TRANSFORMS[name]
    z = transform(u)
    return z, transform.log_abs_det_jacobian(u, z) + math.log(u[1] - u[0])


def _log_joint_on_grid(problem, grid):
    """log p(X, z) at every grid point, from the distributions' own log_prob (not our code)."""
    (x,) = problem.args
    if problem.name == "normal_normal":
        prior, lik = dist.Normal(0.0, 2.0), lambda z: dist.Normal(z, 1.0)
    elif problem.name == "beta_bernoulli":
        prior, lik = dist.Beta(2.0, 3.0), lambda z: dist.Bernoulli(z)
    else:
        prior, lik = dist.Gamma(2.0, 1.0), lambda z: dist.Poisson(z)
    return prior.log_prob(grid) + lik(grid.unsqueeze(-1)).log_prob(x).sum(-1)


def _guide_dist(problem, params):
    if problem.name == "normal_normal":
        return dist.Normal(params["loc"], params["scale"])
    if problem.name == "beta_bernoulli":
        return dist.Beta(params["alpha"], params["beta"])
    return dist.Gamma(params["alpha"], params["beta"])


@pytest.mark.parametrize("name", CONJUGATE_PROBLEMS)
def test_closed_form_evidence_matches_quadrature(name):
    problem = get_problem(name, dtype=torch.float64)
    grid, log_weights = _quadrature_grid(name)
    log_evidence = torch.logsumexp(_log_joint_on_grid(problem, grid) + log_weights, 0)
    assert problem.log_evidence == pytest.approx(float(log_evidence), abs=1e-6)


@pytest.mark.parametrize("name", CONJUGATE_PROBLEMS)
@pytest.mark.parametrize("where", ["init", "posterior"])
def test_closed_form_elbo_matches_quadrature(name, where):
    problem = get_problem(name, dtype=torch.float64)
    params = problem.init_params if where == "init" else problem.posterior_params
    grid, log_weights = _quadrature_grid(name)
    log_q = _guide_dist(problem, params).log_prob(grid)
    weights = (log_q + log_weights).exp()
    integrand = torch.where(weights > 0, _log_joint_on_grid(problem, grid) - log_q, 0.0)
    quadrature = (weights * integrand).sum()
    assert float(problem.exact_elbo(params)) == pytest.approx(float(quadrature), abs=1e-5)


@pytest.mark.parametrize("name", CONJUGATE_PROBLEMS)
def test_elbo_at_posterior_is_log_evidence(name):
    problem = get_problem(name, dtype=torch.float64)
    assert float(problem.exact_elbo(problem.posterior_params)) == pytest.approx(
        problem.log_evidence, abs=1e-9
    )


def test_tiny_discrete_evidence_matches_pyro_enumeration():
    """log p(X) by our brute force equals -TraceEnum_ELBO with every latent enumerated."""
    problem = get_problem("tiny_discrete", dtype=torch.float64)
    problem.set_params()
    model = config_enumerate(problem.model, "parallel")
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    log_evidence = -elbo.loss(model, lambda data: None, *problem.args)
    assert problem.log_evidence == pytest.approx(log_evidence, abs=1e-9)


def test_tiny_discrete_elbo_matches_sum_over_conditioned_traces():
    """exact_elbo equals sum_{c,z} q(c,z) [log p - log q] with each term from Pyro's own traces."""
    problem = get_problem("tiny_discrete", dtype=torch.float64)
    problem.set_params()
    (x,) = problem.args
    total = 0.0
    with torch.no_grad():
        for c in (0.0, 1.0):
            for z in itertools.product(range(3), repeat=x.shape[0]):
                values = {"c": torch.tensor(c, dtype=x.dtype), "z": torch.tensor(z)}
                guide = pyro.poutine.condition(problem.guide, data=values)
                guide_trace = pyro.poutine.trace(guide).get_trace(x)
                model = pyro.poutine.condition(problem.model, data=values)
                model_trace = pyro.poutine.trace(model).get_trace(x)
                log_q = guide_trace.log_prob_sum()
                total += float(log_q.exp() * (model_trace.log_prob_sum() - log_q))
    assert float(problem.exact_elbo(problem.init_params)) == pytest.approx(total, abs=1e-9)


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_factories_honour_dtype_and_seed(name):
    a = get_problem(name, dtype=torch.float32, seed=3)
    b = get_problem(name, dtype=torch.float32, seed=3)
    assert a.args[0].dtype == torch.float32
    assert torch.equal(a.args[0], b.args[0])


def test_unknown_problem_names_the_known_ones():
    with pytest.raises(KeyError, match="normal_normal"):
        get_problem("no_such_problem")


# ---------------------------------------------------------------------------- the registry
def test_the_registry_checks_option_names_and_reads_dtype_names():
    from pyro_elbo_ext.problems import UnknownProblemError, describe_problem, problem_options

    with pytest.raises(UnknownProblemError, match="known problems: normal_normal, "):
        get_problem("no_such_problem")
    with pytest.raises(ValueError, match=r"no option\(s\) \['bogus'\]; its options are"):
        get_problem("normal_normal", bogus=1)
    assert get_problem("normal_normal", dtype="float64").args[0].dtype == torch.float64
    assert get_problem("normal_normal", dtype="torch.float32").args[0].dtype == torch.float32
    with pytest.raises(ValueError, match="dtype must be a torch floating-point dtype"):
        get_problem("normal_normal", dtype="int64")
    assert problem_options("normal_normal")["num_data"] == 20
    assert "dtype" in problem_options("vae_digits")
    assert describe_problem("normal_normal").startswith("z ~ N(mu0, tau0)")
    for name in PROBLEMS:  # every factory documents itself in one line
        assert describe_problem(name)


# ---------------------------------------------------------------------------- sbn_digits
@pytest.mark.parametrize("layers, latent_dim", [(1, 3), (2, 2)])
def test_sbn_exact_elbo_and_evidence_match_pyro_traces(layers, latent_dim):
    """exact_elbo and log_evidence against a brute-force sum of Pyro's own trace log-densities
    over every latent configuration of every image (conditioned model and guide)."""
    problem = get_problem("sbn_digits", num_data=3, num_test=2, latent_dim=latent_dim,
                          layers=layers, dtype=torch.float64)
    problem.set_params()
    (x,) = problem.args
    sites = problem.notes["latent_sites"]
    configs = list(itertools.product((0.0, 1.0), repeat=latent_dim * len(sites)))
    elbo, evidence = 0.0, 0.0
    for i in range(x.shape[0]):  # under no_grad: the log-densities are plain numbers
        image = x[i:i + 1]
        log_ps, log_qs = [], []
        for config in configs:
            values = {site: torch.tensor([config[j * latent_dim:(j + 1) * latent_dim]],
                                         dtype=x.dtype) for j, site in enumerate(sites)}
            guide = pyro.poutine.trace(pyro.poutine.condition(problem.guide, data=values))
            model = pyro.poutine.trace(pyro.poutine.condition(problem.model, data=values))
            with torch.no_grad():
                log_qs.append(guide.get_trace(image).log_prob_sum())
                log_ps.append(model.get_trace(image).log_prob_sum())
        log_p, log_q = torch.stack(log_ps), torch.stack(log_qs)
        elbo += float((log_q.exp() * (log_p - log_q)).sum())
        evidence += float(torch.logsumexp(log_p, 0))
    assert float(problem.exact_elbo(problem.init_params)) == pytest.approx(elbo, abs=1e-9)
    assert problem.log_evidence == pytest.approx(evidence, abs=1e-9)


def test_sbn_bounds_bracket_between_exact_l_and_log_evidence():
    """sbn_bounds' L is unbiased for the exact L, and its L_K lies between L and log p(x)
    (means over 40 seeds, 4 SE)."""
    from pyro_elbo_ext.problems.sbn import sbn_bounds

    problem = get_problem("sbn_digits", num_data=4, num_test=0, latent_dim=3,
                          dtype=torch.float64)
    problem.set_params()
    (x,) = problem.args
    draws = [sbn_bounds(problem, x, num_particles=50, seed=s) for s in range(40)]
    l_draws = torch.tensor([d["L"] for d in draws])
    lk_draws = torch.tensor([d["L_K"] for d in draws])
    exact_l = float(problem.exact_elbo(problem.init_params)) / 4
    log_p = problem.log_evidence / 4
    se_l, se_lk = l_draws.std() / 40**0.5, lk_draws.std() / 40**0.5
    assert abs(float(l_draws.mean()) - exact_l) < 4 * float(se_l)
    assert float(lk_draws.mean()) > exact_l
    assert float(lk_draws.mean()) < log_p + 4 * float(se_lk)
    with pytest.raises(ValueError, match="at least one image"):
        sbn_bounds(problem)  # num_test=0: no held-out images


def test_sbn_data_sets_and_the_mnist_extra(monkeypatch):
    from pyro_elbo_ext._extras import MissingExtraError
    from pyro_elbo_ext.problems import sbn

    train, test = sbn.load_digit_splits("digits8x8", 100, 50, seed=1)
    assert train.shape == (100, 64) and test.shape == (50, 64)
    assert set(train.unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="at most 1797 images"):
        sbn.load_digit_splits("digits8x8", 1700, 200)
    with pytest.raises(ValueError, match="layers must be 1 or 2"):
        get_problem("sbn_digits", layers=3)
    monkeypatch.setattr(sbn.importlib.util, "find_spec", lambda name: None)
    sbn._images.cache_clear()
    with pytest.raises(MissingExtraError, match=r"pip install 'pyro-elbo-ext\[mnist\]'"):
        sbn.load_digit_splits("mnist5k", 10, 10)
    monkeypatch.undo()
    train, test = sbn.load_digit_splits("mnist5k", 20, 10)
    assert train.shape == (20, 784) and test.shape == (10, 784)
