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
