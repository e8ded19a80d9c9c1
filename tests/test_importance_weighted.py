"""ImportanceWeightedELBO against independent references.

References: hand-written log-weights and gradient formulas in ``torch.distributions`` (no Pyro)
on the draws the loss made (recorded from its guide), brute-force Monte Carlo of L_K and dL_K,
the closed-form log p(X) of the Normal-Normal model, exact enumeration of every K-tuple of a
discrete guide site, and Pyro's ``RenyiELBO(alpha=0)`` where it computes the same quantity.
"""

from __future__ import annotations

import itertools
import math

import numpy
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import RenyiELBO
from pyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalMessenger,
)
from pyro.nn import PyroModule, PyroSample
from pyro.poutine.messenger import Messenger
from torch.distributions import Normal, constraints

from pyro_elbo_ext import ImportanceWeightedELBO
from pyro_elbo_ext.elbos.weights import leave_one_out_bounds
from pyro_elbo_ext.problems import get_problem
from tests.mc import K_SE, assert_mean_close
from tests.models import discrete_guide as mixed_guide
from tests.models import discrete_model as mixed_model

PRIOR_SD = 2.0  # normal_normal: z ~ N(0, 2), x_i ~ N(z, 1)


# ---------------------------------------------------------------------------- helpers
def recording(guide, store: dict):
    """``guide``, with the trace of its last run kept in ``store["trace"]``."""

    def wrapped(*args, **kwargs):
        with poutine.trace() as tracer:
            out = guide(*args, **kwargs)
        store["trace"] = tracer.trace
        return out

    return wrapped


def grads_of(loss: torch.Tensor, leaves: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """d(-loss) (the gradient estimate of L_K) per leaf name."""
    gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {n: torch.zeros_like(v) if g is None else -g for (n, v), g in zip(leaves.items(), gs)}


def assert_means_agree(a: torch.Tensor, b: torch.Tensor, what: str = ""):
    """Two independent Monte Carlo means agree within K_SE combined standard errors."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    err = (a.mean(0) - b.mean(0)).abs()
    assert bool((err <= K_SE * se + 1e-12).all()), f"{what}: {a.mean(0)} vs {b.mean(0)}, SE {se}"


@pytest.fixture
def nn64():
    """The Normal-Normal problem (20 points) in float64, at its deliberately misfit start."""
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    return problem


def nn_log_p_and_dz(x: torch.Tensor, z: torch.Tensor):
    """log p(x, z) and d/dz log p(x, z) for z of any shape, by hand."""
    log_p = Normal(0.0, PRIOR_SD).log_prob(z) + Normal(z.unsqueeze(-1), 1.0).log_prob(x).sum(-1)
    dz = -z / PRIOR_SD**2 + (x - z.unsqueeze(-1)).sum(-1)
    return log_p, dz


def nn_reference_draws(x, loc, scale, eps):
    """Per draw (rows of eps, shape (R, K)): L_K-hat, the IWAE and the DReG gradients wrt
    (loc, log scale), from the closed-form derivatives (z = loc + scale * eps)."""
    z = loc + scale * eps
    log_p, dlogp_dz = nn_log_p_and_dz(x, z)
    log_q = Normal(loc, scale).log_prob(z)
    log_w = log_p - log_q
    estimate = torch.logsumexp(log_w, -1) - math.log(eps.shape[-1])
    wt = torch.softmax(log_w, -1)
    # total derivative of log w_k: dlogp/dz dz/dtheta - d log q(z(theta); theta)/dtheta,
    # with log q(z(theta); theta) = -log scale - eps^2/2 - log sqrt(2 pi)
    iwae = torch.stack([(wt * dlogp_dz).sum(-1), (wt * (dlogp_dz * scale * eps + 1)).sum(-1)], -1)
    dlogw_dz = dlogp_dz + (z - loc) / scale**2  # partial in z with q's parameters fixed
    dreg = torch.stack([(wt**2 * dlogw_dz).sum(-1), (wt**2 * dlogw_dz * scale * eps).sum(-1)], -1)
    return estimate, iwae, dreg


def our_draws(elbo, problem, num_draws: int, record: bool = False):
    """``num_draws`` (L_K-hat, gradient wrt (loc, log scale)) draws, and the recorded z."""
    leaves = problem.unconstrained_params()
    store: dict = {}
    guide = recording(problem.guide, store) if record else problem.guide
    values, grads, zs = [], [], []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(problem.model, guide, *problem.args)
        g = grads_of(loss, leaves)
        values.append(-loss.detach())
        grads.append(torch.stack([g["loc"], g["scale"]]))
        if record:
            zs.append(store["trace"].nodes["z"]["value"].detach().reshape(-1))  # (K, 1) -> (K,)
    return torch.stack(values), torch.stack(grads), (torch.stack(zs) if record else None)


# ---------------------------------------------------------------------------- Normal-Normal
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_estimate_and_gradients_equal_the_hand_written_formulas_draw_for_draw(nn64, estimator):
    (x,) = nn64.args
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    elbo = ImportanceWeightedELBO(num_particles=5, estimator=estimator, max_plate_nesting=1)
    values, grads, z = our_draws(elbo, nn64, 10, record=True)
    assert z.shape == (10, 5)
    estimate, iwae, dreg = nn_reference_draws(x, loc, scale, (z - loc) / scale)
    torch.testing.assert_close(values, estimate, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads, iwae if estimator == "iwae" else dreg,
                               rtol=1e-9, atol=1e-9)


def test_bound_tightens_with_k_toward_the_closed_form_evidence(nn64):
    """L_K (K = 1, 5, 50) within K_SE of a brute-force reference; increasing; gap shrinking."""
    (x,) = nn64.args
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    gen = torch.Generator().manual_seed(1)
    means, ses = [], []
    for k in (1, 5, 50):
        elbo = ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1)
        ours = torch.tensor([-elbo.loss(nn64.model, nn64.guide, x) for _ in range(300)])
        eps = torch.randn(20000, k, generator=gen, dtype=torch.float64)
        reference = nn_reference_draws(x, loc, scale, eps)[0]
        assert_means_agree(ours, reference, f"L_{k}")
        means.append(ours.mean())
        ses.append(ours.std() / 300**0.5)
    gaps = [nn64.log_evidence - m for m in means]
    for i in range(2):
        assert means[i + 1] - means[i] > K_SE * math.hypot(ses[i], ses[i + 1])
    assert gaps[0] > gaps[1] > gaps[2] > -K_SE * ses[2]
    assert gaps[2] < 0.2 * gaps[0]


def test_gradient_means_match_the_reference_and_dreg_has_lower_guide_variance(nn64):
    (x,) = nn64.args
    loc, scale = pyro.param("loc").detach(), pyro.param("scale").detach()
    eps = torch.randn(100000, 20, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference = nn_reference_draws(x, loc, scale, eps)[1]  # IWAE: unbiased for dL_K
    draws = {}
    for estimator in ("iwae", "dreg"):
        elbo = ImportanceWeightedELBO(num_particles=20, estimator=estimator, max_plate_nesting=1)
        draws[estimator] = our_draws(elbo, nn64, 400)[1]
        assert_means_agree(draws[estimator], reference, estimator)
    assert bool((draws["dreg"].var(0) < 0.5 * draws["iwae"].var(0)).all())


def test_dreg_guide_gradient_is_zero_for_every_draw_at_the_exact_posterior(nn64):
    nn64.set_posterior()
    dreg = our_draws(ImportanceWeightedELBO(10, "dreg", max_plate_nesting=1), nn64, 20)[1]
    assert dreg.abs().max() < 1e-9
    iwae = our_draws(ImportanceWeightedELBO(10, "iwae", max_plate_nesting=1), nn64, 20)[1]
    assert iwae.abs().max() > 1e-3  # the IWAE estimator is zero only on average


def test_decompose_reads_the_same_draws(nn64):
    (x,) = nn64.args
    store: dict = {}
    guide = recording(nn64.guide, store)
    elbo = ImportanceWeightedELBO(num_particles=8, max_plate_nesting=1)
    pyro.set_rng_seed(4)
    d = elbo.decompose(nn64.model, guide, x, log_evidence=nn64.log_evidence)
    z = store["trace"].nodes["z"]["value"].detach().reshape(-1)
    log_w = nn_log_p_and_dz(x, z)[0] - Normal(pyro.param("loc"), pyro.param("scale")).log_prob(z)
    log_w = log_w.detach()
    assert d.elbo == pytest.approx(float(torch.logsumexp(log_w, 0) - math.log(8)), abs=1e-8)
    assert d.elbo_1 == pytest.approx(float(log_w.mean()), abs=1e-8)
    w = log_w.exp()
    assert d.ess == pytest.approx(float(w.sum() ** 2 / (w**2).sum()), rel=1e-9)
    assert d.gap == pytest.approx(nn64.log_evidence - d.elbo)
    assert d.local_plates == () and d.num_particles == 8
    pyro.set_rng_seed(4)
    assert -elbo.loss(nn64.model, nn64.guide, x) == pytest.approx(d.elbo)
    assert "L_K" in str(d) and "gap" in str(d)


# ---------------------------------------------------------------------------- local latents
LOCAL_X = torch.tensor([0.3, -1.2, 2.0, 0.7, 1.5, -0.4], dtype=torch.float64)


def local_model(x, subsample_size=None):
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("obs", dist.Normal(z, 0.5), obs=x[idx])


def local_guide(x, subsample_size=None):
    m = pyro.param("m", lambda: torch.linspace(-1, 1, x.shape[0], dtype=x.dtype))
    s = pyro.param("s", lambda: torch.full_like(x, 0.8), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as idx:
        pyro.sample("z", dist.Normal(m[idx], s[idx]))


def local_log_w(z, idx):
    """log w per particle and element, by hand; z (K, B), idx (B,)."""
    m, s = pyro.param("m").detach()[idx], pyro.param("s").detach()[idx]
    return (Normal(0.0, 1.0).log_prob(z) + Normal(z, 0.5).log_prob(LOCAL_X[idx])
            - Normal(m, s).log_prob(z))


def test_local_latents_bound_is_per_element_and_tighter_than_the_joint_one():
    elbo = ImportanceWeightedELBO(num_particles=4, max_plate_nesting=1)
    store: dict = {}
    guide = recording(local_guide, store)
    idx = torch.arange(6)
    per_element, joint = [], []
    for _ in range(200):
        value = -elbo.loss(local_model, guide, LOCAL_X)
        log_w = local_log_w(store["trace"].nodes["z"]["value"], idx)  # (K, N)
        reference = (torch.logsumexp(log_w, 0) - math.log(4)).sum()
        assert value == pytest.approx(float(reference), abs=1e-10)
        per_element.append(value)
        joint.append(float(torch.logsumexp(log_w.sum(1), 0) - math.log(4)))
    diff = torch.tensor(per_element) - torch.tensor(joint)
    assert diff.mean() > K_SE * diff.std() / 200**0.5
    assert elbo.decompose(local_model, local_guide, LOCAL_X).local_plates == ("data",)


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_local_latents_gradients_equal_the_per_element_formulas_draw_for_draw(estimator):
    """Per element i: IWAE sum_k w~_ik dlog w_ik, DReG sum_k w~_ik^2 dlog w_ik/dz dz/dtheta."""
    elbo = ImportanceWeightedELBO(num_particles=4, estimator=estimator, max_plate_nesting=1)
    store: dict = {}
    guide = recording(local_guide, store)
    for _ in range(3):
        with poutine.trace(param_only=True) as params:
            loss = elbo.differentiable_loss(local_model, guide, LOCAL_X)
        leaves = {n: params.trace.nodes[n]["value"].unconstrained() for n in ("m", "s")}
        ours = grads_of(loss, leaves)
        m, s = pyro.param("m").detach(), pyro.param("s").detach()
        z = store["trace"].nodes["z"]["value"].detach()  # (K, N)
        wt = torch.softmax(local_log_w(z, torch.arange(6)), 0)
        eps = (z - m) / s
        dlogp_dz = -z + (LOCAL_X - z) / 0.25
        if estimator == "iwae":  # d log q(z(theta); theta) / d(m, log s) = (0, -1)
            expected_m = (wt * dlogp_dz).sum(0)
            expected_s = (wt * (dlogp_dz * s * eps + 1)).sum(0)
        else:
            dlogw_dz = dlogp_dz + (z - m) / s**2
            expected_m = (wt**2 * dlogw_dz).sum(0)
            expected_s = (wt**2 * dlogw_dz * s * eps).sum(0)
        torch.testing.assert_close(ours["m"], expected_m, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ours["s"], expected_s, rtol=1e-9, atol=1e-9)


def test_subsampled_local_plate_is_unbiased_for_the_full_data_bound():
    """N/B times the minibatch's per-element bounds, outside the log-mean-exp."""
    elbo = ImportanceWeightedELBO(num_particles=3, max_plate_nesting=1)
    store: dict = {}
    guide = recording(local_guide, store)
    draws = []
    for _ in range(600):
        value = -elbo.loss(local_model, guide, LOCAL_X, 2)
        trace = store["trace"]
        idx = trace.nodes["data"]["value"]
        log_w = local_log_w(trace.nodes["z"]["value"], idx)
        reference = 3.0 * (torch.logsumexp(log_w, 0) - math.log(3)).sum()
        assert value == pytest.approx(float(reference), abs=1e-10)
        draws.append(value)
    gen = torch.Generator().manual_seed(5)
    m, s = pyro.param("m").detach(), pyro.param("s").detach()
    z = m + s * torch.randn(50000, 3, 6, generator=gen, dtype=torch.float64)
    full = (torch.logsumexp(local_log_w(z, torch.arange(6)), 1) - math.log(3)).sum(-1)
    assert_means_agree(torch.tensor(draws), full, "subsampled L_K")


def test_a_subsampled_plate_outside_a_global_latent_is_refused_for_k_above_1():
    problem = get_problem("normal_normal", subsample_size=5)
    problem.set_params()
    with pytest.raises(ValueError, match="plate 'data' is subsampled"):
        ImportanceWeightedELBO(4, max_plate_nesting=1).loss(problem.model, problem.guide,
                                                            *problem.args)
    loss = ImportanceWeightedELBO(1, max_plate_nesting=1).loss(problem.model, problem.guide,
                                                               *problem.args)
    assert math.isfinite(loss)


# ---------------------------------------------------------------------------- discrete site
DISCRETE_PRIOR = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
DISCRETE_X = torch.tensor(0.7, dtype=torch.float64)


def discrete_model(x):
    mu = pyro.param("mu", lambda: torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    z = pyro.sample("z", dist.Categorical(DISCRETE_PRIOR))
    pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def discrete_guide(x):
    logits = pyro.param("logits", lambda: torch.tensor([0.4, -0.3, 0.1], dtype=torch.float64))
    pyro.sample("z", dist.Categorical(logits=logits))


class Forced(Messenger):
    """Sets site z's value (one per particle) before the particle plate broadcasts its
    distribution, so the site is an ordinary guide sample at a chosen value."""

    def __init__(self, values):
        super().__init__()
        self.values = torch.tensor(values)

    def _pyro_sample(self, msg):
        if msg["name"] == "z":
            msg["value"] = self.values


def forced(guide, values):
    """``guide`` with its site z drawn at ``values``."""

    def wrapped(*args, **kwargs):
        with Forced(values):
            return guide(*args, **kwargs)

    return wrapped


def _expectation_over_tuples_is_exact(elbo, k: int, guide_for) -> torch.Tensor:
    """The expectation of ``elbo``'s estimates over all 3^K tuples of the discrete site's
    draws (``guide_for(values)``: the guide drawing them) equals L_K and dL_K computed exactly
    by enumeration; returns the exact dL_K/dlogits."""
    with poutine.block():  # create the parameters
        discrete_model(DISCRETE_X), discrete_guide(DISCRETE_X)
    leaves = {n: pyro.param(n).unconstrained() for n in ("logits", "mu")}
    mu, logits = (leaves[n].detach().clone().requires_grad_() for n in ("mu", "logits"))
    log_q_all = torch.log_softmax(logits, -1)
    log_w_all = (DISCRETE_PRIOR.log() + Normal(mu, 1.0).log_prob(DISCRETE_X)) - log_q_all
    exact_bound = 0.0
    expected_value = 0.0
    expected_grads = {n: torch.zeros(3, dtype=torch.float64) for n in leaves}
    for values in itertools.product(range(3), repeat=k):
        t = torch.tensor(values)
        prob = log_q_all[t].sum().exp()
        exact_bound = exact_bound + prob * (torch.logsumexp(log_w_all[t], 0) - math.log(k))
        loss = elbo.differentiable_loss(discrete_model, guide_for(values), DISCRETE_X)
        expected_value += float(prob.detach()) * -float(loss.detach())
        for n, g in grads_of(loss, leaves).items():
            expected_grads[n] += prob.detach() * g
    exact_mu, exact_logits = torch.autograd.grad(exact_bound, [mu, logits])
    assert expected_value == pytest.approx(float(exact_bound.detach()), abs=1e-12)
    torch.testing.assert_close(expected_grads["logits"], exact_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grads["mu"], exact_mu, rtol=1e-10, atol=1e-12)
    return exact_logits


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_discrete_site_bound_and_gradient_equal_enumeration_of_every_k_tuple(estimator, k):
    """The expectation of our estimates over all 3^K tuples (each computed by the loss with
    the tuple forced) equals L_K and dL_K computed exactly by enumeration."""
    elbo = ImportanceWeightedELBO(num_particles=k, estimator=estimator, max_plate_nesting=0)
    exact_logits = _expectation_over_tuples_is_exact(
        elbo, k, lambda values: forced(discrete_guide, values))
    assert exact_logits.abs().max() > 1e-2  # the reference is not trivially zero


PLATED_X = torch.tensor([0.7, -0.4], dtype=torch.float64)


def plated_discrete_model(x):
    mu = pyro.param("mu", lambda: torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64))
    with pyro.plate("data", 2):
        z = pyro.sample("z", dist.Categorical(DISCRETE_PRIOR))
        pyro.sample("x", dist.Normal(mu[z], 1.0), obs=x)


def plated_discrete_guide(x):
    logits = pyro.param("plogits", lambda: torch.tensor([[0.4, -0.3, 0.1], [-0.2, 0.6, 0.0]],
                                                        dtype=torch.float64))
    with pyro.plate("data", 2):
        pyro.sample("z", dist.Categorical(logits=logits))


def test_discrete_sites_local_to_a_plate_get_per_element_vimco_signals():
    """K = 2 particles, 2 plate elements: the expectation over all 3^4 draws equals the exact
    per-element bound sum_i L_K,i and its gradient."""
    k = 2
    elbo = ImportanceWeightedELBO(num_particles=k, max_plate_nesting=1)
    with poutine.block():
        plated_discrete_model(PLATED_X), plated_discrete_guide(PLATED_X)
    leaves = {n: pyro.param(n).unconstrained() for n in ("plogits", "mu")}
    mu, logits = (leaves[n].detach().clone().requires_grad_() for n in ("mu", "plogits"))
    log_q = torch.log_softmax(logits, -1)  # (2, 3)
    log_w = DISCRETE_PRIOR.log() + Normal(mu, 1.0).log_prob(PLATED_X.unsqueeze(-1)) - log_q
    exact = 0.0
    for i in range(2):
        for values in itertools.product(range(3), repeat=k):
            t = torch.tensor(values)
            exact = exact + log_q[i, t].sum().exp() * (torch.logsumexp(log_w[i, t], 0)
                                                      - math.log(k))
    expected_value = 0.0
    expected = {n: torch.zeros_like(v) for n, v in leaves.items()}
    for flat in itertools.product(range(3), repeat=2 * k):
        values = torch.tensor(flat).reshape(k, 2)  # (particles, elements)
        prob = float(log_q.detach().gather(1, values.T).sum().exp())
        loss = elbo.differentiable_loss(plated_discrete_model,
                                        forced(plated_discrete_guide, values.tolist()), PLATED_X)
        expected_value += prob * -float(loss.detach())
        for n, g in grads_of(loss, leaves).items():
            expected[n] += prob * g
    exact_mu, exact_logits = torch.autograd.grad(exact, [mu, logits])
    assert expected_value == pytest.approx(float(exact.detach()), abs=1e-12)
    torch.testing.assert_close(expected["plogits"], exact_logits, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected["mu"], exact_mu, rtol=1e-10, atol=1e-12)


def test_pyro_renyi_gives_the_discrete_logits_no_gradient():
    """The peer's gap that the score term closes (alpha / (1 - alpha) = 0 at alpha = 0)."""
    pyro.set_rng_seed(0)
    RenyiELBO(alpha=0, num_particles=3).loss_and_grads(discrete_model, discrete_guide,
                                                       DISCRETE_X)
    assert pyro.param("logits").unconstrained().grad.abs().max() == 0


def test_vimco_leave_one_out_bounds_by_hand():
    log_w = torch.tensor([[0.3, -1.2, 2.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    out = leave_one_out_bounds(log_w, -1)
    for row in range(2):
        for k in range(3):
            others = [log_w[row, j] for j in range(3) if j != k]
            geo = sum(others) / 2
            expected = math.log((sum(math.exp(v) for v in others) + math.exp(geo)) / 3)
            assert float(out[row, k]) == pytest.approx(expected, abs=1e-12)


def test_mixed_discrete_and_reparameterized_sites_iwae_and_dreg_agree():
    """Both estimators are unbiased for dL_K: their means agree within K_SE."""
    data = torch.tensor([0.4, 1.3, -0.2, 2.1, 0.9], dtype=torch.float64)
    model, guide = mixed_model, mixed_guide
    guide(data)
    leaves = {n: pyro.param(n).unconstrained() for n in ("k_probs", "z_loc")}
    draws = {}
    for estimator in ("iwae", "dreg"):
        elbo = ImportanceWeightedELBO(4, estimator, max_plate_nesting=1)
        rows = []
        for _ in range(500):
            g = grads_of(elbo.differentiable_loss(model, guide, data), leaves)
            rows.append(torch.cat([g["k_probs"], g["z_loc"]]))
        draws[estimator] = torch.stack(rows)
    assert_means_agree(draws["iwae"], draws["dreg"], "mixed guide")


# ---------------------------------------------------------------------------- Pyro's peer
def _param_grads(elbo, model, guide, *args, seed: int = 7):
    """-loss and the gradients ``loss_and_grads`` leaves in the param store's leaves."""
    store = pyro.get_param_store()
    for _, leaf in store.named_parameters():
        leaf.grad = None
    pyro.set_rng_seed(seed)
    loss = elbo.loss_and_grads(model, guide, *args)
    return loss, {n: leaf.grad.clone() for n, leaf in store.named_parameters()
                  if leaf.grad is not None}


def _assert_same(ours, theirs, rtol=1e-9):
    assert ours[0] == pytest.approx(theirs[0], rel=rtol, abs=rtol)
    assert ours[1].keys() == theirs[1].keys() and ours[1]
    for name, grad in ours[1].items():
        torch.testing.assert_close(grad, theirs[1][name], rtol=rtol, atol=rtol, msg=name)


def _renyi(k, nesting=1):
    return RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True,
                     max_plate_nesting=nesting)


@pytest.mark.parametrize("name", ["normal_normal", "logistic_regression"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_iwae_equals_pyro_renyi_alpha_0_draw_for_draw(name, dtype):
    problem = get_problem(name, dtype=dtype)
    problem.set_params()
    ours = _param_grads(ImportanceWeightedELBO(6, max_plate_nesting=1), problem.model,
                        problem.guide, *problem.args)
    theirs = _param_grads(_renyi(6), problem.model, problem.guide, *problem.args)
    _assert_same(ours, theirs, rtol=1e-9 if dtype == torch.float64 else 1e-4)


def positive_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    sd = pyro.sample("sd", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, sd), obs=data)


@pytest.mark.parametrize("autoguide", [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal,
                                       AutoNormalMessenger])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_autoguides_auxiliary_sites_enter_the_weight(autoguide, estimator):
    """Guide-only (auxiliary) sites and the Delta sites' log-densities are in log w: the
    value and the IWAE gradient are Pyro RenyiELBO(alpha=0)'s draw for draw; DReG's value is
    the same and its gradient differs."""
    data = torch.tensor([0.4, 1.3, -0.2, 2.1, 0.9])
    guide = autoguide(positive_model)
    pyro.set_rng_seed(0)
    guide(data)  # initialize the parameters
    ours = _param_grads(ImportanceWeightedELBO(5, estimator, max_plate_nesting=1),
                        positive_model, guide, data)
    theirs = _param_grads(_renyi(5), positive_model, guide, data)
    if estimator == "iwae":
        _assert_same(ours, theirs, rtol=1e-4)
    else:
        assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
        assert any(not torch.allclose(g, theirs[1][n]) for n, g in ours[1].items())


def test_scales_and_masks_enter_the_weight_as_in_renyi():
    data = torch.tensor([0.4, 1.3, -0.2, 2.1, 0.9])
    mask = torch.tensor([True, False, True, True, False])

    def model(data):
        z = pyro.sample("z", dist.Normal(0.0, 2.0))
        with poutine.scale(scale=0.5), pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Normal(z, 1.0).mask(mask), obs=data)

    def guide(data):
        loc = pyro.param("loc", torch.tensor(0.3))
        pyro.sample("z", dist.Normal(loc, 0.7))

    ours = _param_grads(ImportanceWeightedELBO(4, max_plate_nesting=1), model, guide, data)
    theirs = _param_grads(_renyi(4), model, guide, data)
    _assert_same(ours, theirs, rtol=1e-5)


def test_hierarchical_guide_makes_dreg_fall_back_to_iwae_with_a_warning():
    data = torch.tensor([0.4, 1.3])
    model, guide = _chain_model, _conditional_guide  # q(b | a) for p(a) p(b | a)
    dreg = ImportanceWeightedELBO(3, "dreg", max_plate_nesting=1)
    with pytest.warns(UserWarning, match="site 'b' depend on another reparameterized"):
        ours = _param_grads(dreg, model, guide, data)
    _assert_same(ours, _param_grads(ImportanceWeightedELBO(3, max_plate_nesting=1), model,
                                    guide, data))


# ---------------------------------------------------------------------------- interface
def test_svi_module_call_and_guessed_plate_nesting(nn64):
    elbo = ImportanceWeightedELBO(num_particles=4)  # max_plate_nesting guessed: 1 (+ particles)
    svi = pyro.infer.SVI(nn64.model, nn64.guide, pyro.optim.Adam({"lr": 0.05}), loss=elbo)
    losses = [svi.step(*nn64.args) for _ in range(60)]
    # the model's one plate, plus the vectorized particle plate: Pyro's ELBO counts it too
    assert elbo.max_plate_nesting == 2
    assert sum(losses[-10:]) < sum(losses[:10])
    module = elbo(nn64.model, nn64.guide)
    pyro.set_rng_seed(2)
    called = module(*nn64.args)
    pyro.set_rng_seed(2)
    assert float(called.detach()) == pytest.approx(elbo.loss(nn64.model, nn64.guide, *nn64.args))


@pytest.mark.parametrize("name", ["normal_normal", "vae_digits", "tiny_discrete"])
def test_compiled_iwae_equals_eager_for_the_same_draws(name, monkeypatch):
    """The traced graph (run uncompiled: the trace is under test, not Inductor, whose random
    numbers differ) gives the eager value and gradient for the same seed."""
    from pyro_elbo_ext.compiled import backend

    monkeypatch.setattr(backend, "BACKEND", None)
    problem = get_problem(name, dtype=torch.float64)
    problem.set_params()
    leaves = list(problem.unconstrained_params().values())
    results = []
    for jit in (False, True):
        elbo = ImportanceWeightedELBO(6, jit=jit, ignore_jit_warnings=True,
                                      max_plate_nesting=problem.max_plate_nesting)
        if jit:  # compile first: tracing draws random numbers of its own
            elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        for seed in (1, 2):
            pyro.set_rng_seed(seed)
            loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
            results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    for (eager, eager_grads), (compiled, compiled_grads) in zip(results[:2], results[2:]):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
        for a, b in zip(compiled_grads, eager_grads):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert not torch.equal(results[0][0], results[1][0])


def test_bad_input_is_refused_with_a_message():
    with pytest.raises(ValueError, match="num_particles must be an integer >= 1"):
        ImportanceWeightedELBO(num_particles=0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        ImportanceWeightedELBO(estimator="vimco")
    with pytest.raises(ValueError, match="cannot be compiled"):
        ImportanceWeightedELBO(estimator="dreg", jit=True)
    from pyro_elbo_ext import CompiledSVI

    with pytest.raises(ValueError, match=r"CompiledSVI cannot compile .*estimator='dreg'"):
        CompiledSVI(lambda: None, lambda: None, pyro.optim.Adam({"lr": 0.1}),
                    ImportanceWeightedELBO(estimator="dreg"))

    def model():
        pyro.sample("a", dist.Normal(0.0, 1.0))
        pyro.sample("b", dist.Normal(0.0, 1.0))

    def guide():
        pyro.sample("a", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="model latent site 'b' is not sampled by the guide"):
        ImportanceWeightedELBO(2, max_plate_nesting=0).loss(model, guide)


def test_registry_entries_build_and_run():
    from pyro_elbo_ext.compare.estimators import get_estimator

    problem = get_problem("normal_normal")
    problem.set_params()
    for name, estimator in [("importance_weighted_iwae", "iwae"),
                            ("importance_weighted_dreg", "dreg")]:
        loss, model, guide = get_estimator(name).build(problem, 4)
        assert isinstance(loss, ImportanceWeightedELBO) and loss.estimator == estimator
        assert loss.num_particles == 4
        assert math.isfinite(loss.loss(model, guide, *problem.args))


def test_speed_benchmark_quick_writes_its_table(tmp_path):
    """Smoke run of ``python -m benchmarks.importance_weighted_speed --quick`` (no timing
    assertions: the machine is shared)."""
    from benchmarks import importance_weighted_speed

    result = importance_weighted_speed.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "importance_weighted_speed.md").read_text()
    assert "| normal_normal | 8 |" in text and "iwae / Renyi" in text
    ratios = result["groups"][0]["ratios"]
    assert all(math.isfinite(ratios[k]["median"]) for k in ("iwae", "dreg"))


def test_validation_refuses_unknown_guide_sites_and_misplaced_batch_dims():
    def model(data):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Normal(z, 1.0), obs=data)

    def extra_guide(data):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("stray", dist.Normal(0.0, 1.0))

    def batched_guide(data):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0))  # batch dim not declared by a plate

    data = torch.tensor([0.4, 1.3, -0.2])
    elbo = ImportanceWeightedELBO(2, max_plate_nesting=1)
    with pytest.raises(ValueError, match="guide site 'stray' does not appear in the model"):
        elbo.loss(model, extra_guide, data)
    with pytest.raises(ValueError, match="'z'"):
        elbo.loss(model, batched_guide, data)



# ---------------------------------------------------------------------------- sequential particles
class Sequenced(Messenger):
    """Sets site z's value to the next of ``values`` at each run (one per sequential
    particle)."""

    def __init__(self, values):
        super().__init__()
        self.values = iter(values)

    def _pyro_sample(self, msg):
        if msg["name"] == "z":
            msg["value"] = torch.tensor(next(self.values))


def _sequenced(values):
    """The discrete guide drawing ``values``, one per run (one per sequential particle)."""
    sequenced = Sequenced(values)

    def guide(x):
        with sequenced:
            discrete_guide(x)

    return guide


@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
@pytest.mark.parametrize("k", [2, 3])
def test_sequential_particles_bound_and_gradient_equal_enumeration(estimator, k):
    """vectorize_particles=False (issue 27 row 17): over all 3^K tuples of the K sequential
    runs' draws, the expected estimate and gradient (VIMCO's included) are L_K and dL_K
    computed exactly by enumeration."""
    elbo = ImportanceWeightedELBO(num_particles=k, estimator=estimator,
                                  vectorize_particles=False)
    _expectation_over_tuples_is_exact(elbo, k, _sequenced)


class BNN(PyroModule):
    """Pyro's Bayesian-neural-network tutorial model (Bayesian regression with PyroSample
    weights, ``tutorial/source/bayesian_regression.ipynb``, one hidden layer)."""

    def __init__(self, hidden=5, prior_scale=10.0):
        super().__init__()
        self.activation = torch.nn.Tanh()
        self.layer1 = PyroModule[torch.nn.Linear](1, hidden)
        self.layer2 = PyroModule[torch.nn.Linear](hidden, 1)
        self.layer1.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([hidden, 1]).to_event(2))
        self.layer1.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([hidden]).to_event(1))
        self.layer2.weight = PyroSample(
            dist.Normal(0.0, prior_scale).expand([1, hidden]).to_event(2))
        self.layer2.bias = PyroSample(dist.Normal(0.0, prior_scale).expand([1]).to_event(1))

    def forward(self, x, y=None):
        mu = self.layer2(self.activation(self.layer1(x.reshape(-1, 1)))).squeeze(-1)
        sigma = pyro.sample("sigma", dist.Gamma(0.5, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("obs", dist.Normal(mu, sigma * sigma), obs=y)
        return mu


def _bnn_problem():
    x = torch.linspace(-1.0, 1.0, 12)
    y = torch.sin(3.0 * x) + 0.1 * torch.randn(12, generator=torch.Generator().manual_seed(0))
    model = BNN()
    guide = AutoDiagonalNormal(model)
    pyro.set_rng_seed(0)
    guide(x, y)
    return model, guide, (x, y)


def _mixture_model(data):
    """A mixture whose component means are indexed by a sampled assignment."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    locs = pyro.sample("locs", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
    with pyro.plate("data", len(data)):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], 1.0), obs=data)


def _mixture_guide(data):
    concentration = pyro.param("concentration", torch.ones(2),
                               constraint=constraints.positive)
    pyro.sample("weights", dist.Dirichlet(concentration))
    pyro.sample("locs", dist.Normal(pyro.param("locs_loc", torch.tensor([-1.0, 1.0])),
                                    1.0).to_event(1))
    logits = pyro.param("assignment_logits", torch.zeros(len(data), 2))
    with pyro.plate("data", len(data)):
        pyro.sample("assignment", dist.Categorical(logits=logits))


MIXTURE_DATA = torch.tensor([-2.1, -1.7, -2.4, 1.9, 2.2, 2.6])


def _sequential_renyi(k):
    return RenyiELBO(alpha=0, num_particles=k, vectorize_particles=False)


@pytest.fixture
def float64():
    """float64 by default (the BNN's log-weights are of order 1e5 at its start: float32 would
    round away the differences between particles)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_sequential_particles_on_the_bnn_tutorial_equal_pyro_renyi_draw_for_draw(float64):
    """Issue 27 row 17: Pyro's BNN tutorial model cannot run vectorized (nn.Linear with
    sampled weights); with vectorize_particles=False the value and the gradient are those of
    Pyro's RenyiELBO(alpha=0, vectorize_particles=False) for the same draws."""
    model, guide, args = _bnn_problem()
    ours = _param_grads(ImportanceWeightedELBO(4, vectorize_particles=False), model, guide,
                        *args)
    theirs = _param_grads(_sequential_renyi(4), model, guide, *args)
    _assert_same(ours, theirs, rtol=1e-8)


def test_sequential_particles_on_a_mixture_indexed_by_an_assignment():
    """The same for a mixture indexed by a sampled assignment: the value and the continuous
    parameters' gradients are Renyi's draw for draw; the discrete assignment gets VIMCO's
    score gradient, where Renyi gives none."""
    ours = _param_grads(ImportanceWeightedELBO(5, vectorize_particles=False), _mixture_model,
                        _mixture_guide, MIXTURE_DATA)
    theirs = _param_grads(_sequential_renyi(5), _mixture_model, _mixture_guide, MIXTURE_DATA)
    assert ours[0] == pytest.approx(theirs[0], rel=1e-5)
    for name in ("concentration", "locs_loc"):
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-5)
    assert theirs[1].get("assignment_logits", torch.zeros(1)).abs().max() == 0
    assert ours[1]["assignment_logits"].abs().max() > 0


@pytest.mark.parametrize("case", ["bnn", "mixture"])
def test_a_model_that_cannot_run_vectorized_gets_an_error_naming_vectorization(case):
    if case == "bnn":
        model, guide, args = _bnn_problem()
    else:
        model, guide, args = _mixture_model, _mixture_guide, (MIXTURE_DATA,)
    with pytest.raises((RuntimeError, ValueError),
                       match=r"(?s)particles vectorized.*vectorize_particles=False"):
        ImportanceWeightedELBO(4).loss(model, guide, *args)


def test_sequential_particles_refuse_a_subsampled_plate():
    """Each sequential run draws its own minibatch: no element's weights can be averaged."""
    with pytest.raises(ValueError, match=r"'data' is subsampled.*vectorize_particles=False"):
        ImportanceWeightedELBO(3, vectorize_particles=False).loss(local_model, local_guide,
                                                                  LOCAL_X, 2)


# ---------------------------------------------------------------------------- decisions per plan
def _one_latent_model(x):
    with pyro.plate("draws", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def _one_latent_guide(rsample: bool):
    def guide(x):
        loc = pyro.param("loc", lambda: x.new_full(x.shape, 0.3))
        with pyro.plate("draws", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, 0.8).has_rsample_(rsample))

    return guide


def _exact_l2_gradient(x: float, loc: float, scale: float) -> float:
    """dL_2/dloc for p(z) = N(0, 1), p(x | z) = N(z, 1), q = N(loc, scale), by Gauss-Hermite
    quadrature over the two draws (z = loc + scale * sqrt(2) t: reparameterized nodes)."""
    nodes, weights = numpy.polynomial.hermite.hermgauss(60)
    t = torch.tensor(nodes, dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64) / math.sqrt(math.pi)
    loc_t = torch.tensor(loc, dtype=torch.float64, requires_grad=True)
    z = loc_t + scale * math.sqrt(2.0) * t
    log_w = (Normal(0.0, 1.0).log_prob(z) + Normal(z, 1.0).log_prob(torch.tensor(x))
             - Normal(loc_t, scale).log_prob(z))
    pairs = torch.logsumexp(torch.stack(torch.broadcast_tensors(log_w[:, None], log_w[None, :])),
                            0) - math.log(2.0)
    bound = (w[:, None] * w[None, :] * pairs).sum()
    (grad,) = torch.autograd.grad(bound, [loc_t])
    return float(grad)


def test_dreg_decision_is_not_reused_for_a_site_that_is_no_longer_reparameterized():
    """Issue 27 row 3: DReG's stopped q, decided for a reparameterized guide, must not be
    applied to the same-named site of a guide whose sample is not reparameterized (a
    score-function site): the gradient is then VIMCO's, unbiased for the exact dL_2/dloc."""
    x = torch.full((4000,), 0.7, dtype=torch.float64)
    elbo = ImportanceWeightedELBO(2, "dreg", max_plate_nesting=1)
    elbo.differentiable_loss(_one_latent_model, _one_latent_guide(True), x)
    loss = elbo.differentiable_loss(_one_latent_model, _one_latent_guide(False), x)
    (grad,) = torch.autograd.grad(-loss, [pyro.param("loc").unconstrained()])
    assert_mean_close(grad, _exact_l2_gradient(0.7, 0.3, 0.8), what="dL_2/dloc")


def _chain_model(data):
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a, 1.0))
    with pyro.plate("data", 2):
        pyro.sample("obs", dist.Normal(b, 1.0), obs=data)


def _mean_field_guide(data):
    pyro.sample("a", dist.Normal(pyro.param("qa", torch.tensor(0.2)), 1.0))
    pyro.sample("b", dist.Normal(pyro.param("qb", torch.tensor(0.1)), 0.5))


def _conditional_guide(data):
    a = pyro.sample("a", dist.Normal(pyro.param("qa", torch.tensor(0.2)), 1.0))
    pyro.sample("b", dist.Normal(a + pyro.param("qb", torch.tensor(0.1)), 0.5))


def test_dreg_decision_is_not_reused_for_a_guide_with_other_dependencies():
    """Issue 27 row 4: a DReG loss used on a mean-field guide, then on q(b | a) with the same
    site names, falls back to IWAE there (with its warning): Pyro's RenyiELBO(alpha=0)'s
    gradient, draw for draw."""
    data = torch.tensor([0.4, 1.3])
    elbo = ImportanceWeightedELBO(3, "dreg", max_plate_nesting=1)
    _param_grads(elbo, _chain_model, _mean_field_guide, data)
    with pytest.warns(UserWarning, match="site 'b' depend on another reparameterized"):
        ours = _param_grads(elbo, _chain_model, _conditional_guide, data)
    _assert_same(ours, _param_grads(_renyi(3), _chain_model, _conditional_guide, data),
                 rtol=1e-5)
