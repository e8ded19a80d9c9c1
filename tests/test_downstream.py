"""Score-function rewards Rao-Blackwellized by the data flow (``elbos/downstream.py``).

Three kinds of evidence, none of it the code under test against itself:

* **exact gradients** by enumeration (``exact_elbo`` below sums q(z) [log p(x, z) - log q(z)]
  over every configuration of the guide's discrete sites, from Pyro's trace log-densities;
  or a problem's own closed form): chains, trees, independent sequences, plates mixed with
  non-plate sites, subsampled plates, vectorized particles; the mean gradient of every loss
  within ``K_SE`` standard errors;
* **Pyro's TraceGraph_ELBO** on the same draws (same seed): where its rule and ours coincide
  the gradients agree draw for draw;
* **variance** against TraceGraph_ELBO and against its old sample-order rule (Pyro's own
  ``_compute_downstream_costs``, ``benchmarks/_sample_order.py``).
"""

from __future__ import annotations

import functools
import itertools
import warnings

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import TraceGraph_ELBO
from pyro.infer.autoguide import AutoNormalMessenger

from benchmarks._sample_order import sample_order_loss
from benchmarks.gradient_variance_kl import variance_ratio
from pyro_elbo_ext import AnalyticKLELBO, HardAttentionELBO, JensenELBO, empty_guide
from pyro_elbo_ext.elbos.downstream import score_downstream
from pyro_elbo_ext.problems.discrete import binary_chain, tiny_discrete, two_cluster_mixture
from tests.mc import K_SE, assert_mean_close
from tests.test_compiled import traced_only  # noqa: F401 - a fixture

LOSSES = {
    "jensen_sampled": lambda **kw: JensenELBO(entropy="sampled", **kw),
    "jensen_analytic": lambda **kw: JensenELBO(**kw),
    "analytic_kl": lambda **kw: AnalyticKLELBO(**kw),
}
D = torch.float64


# ---------------------------------------------------------------------------- small models
def _bern(p):
    return dist.Bernoulli(torch.as_tensor(p, dtype=D))


HALF, HIGH, LOW = (torch.tensor(p, dtype=D) for p in (0.5, 0.8, 0.3))


def tree_model(data):
    """b0 -> (b1, b2), b1 -> b3, b2 -> b4; each node observed through a Normal."""
    parents = {1: 0, 2: 0, 3: 1, 4: 2}
    values = {}
    for i in range(5):
        p = HALF if i == 0 else torch.where(values[parents[i]].bool(), HIGH, LOW)
        values[i] = pyro.sample(f"b{i}", dist.Bernoulli(p))
        pyro.sample(f"x{i}", dist.Normal(2.0 * values[i] - 1.0, 1.0), obs=data[i])


def mean_field_guide(names):
    def guide(data):
        logits = pyro.param("logits", lambda: torch.linspace(-1.0, 1.0, len(names),
                                                             dtype=D))
        for i, name in enumerate(names):
            pyro.sample(name, dist.Bernoulli(logits=logits[i]))
    return guide


def mixed_model(data, subsample=None, with_d=None):
    """A global c outside the plate, local z_i | c in a plate (optionally subsampled), and a
    global d after the plate that reads the local sites (when not subsampled)."""
    c = pyro.sample("c", _bern(0.4))
    with pyro.plate("data", 4, subsample_size=subsample) as idx:
        z = pyro.sample("z", dist.Bernoulli(torch.where(c.bool(), HIGH, LOW)))
        pyro.sample("x", dist.Normal(2.0 * z - 1.0, 1.0), obs=data[idx])
    if subsample is None if with_d is None else with_d:
        d = pyro.sample("d", dist.Bernoulli(torch.sigmoid(z.sum(-1, keepdim=True) - 2.0)))
        pyro.sample("y", dist.Normal(d, 1.0), obs=data[4])


def mixed_guide(data, subsample=None, with_d=None):
    qc = pyro.param("qc", lambda: torch.tensor(0.3, dtype=D))
    qz = pyro.param("qz", lambda: torch.linspace(-0.5, 0.5, 4, dtype=D))
    pyro.sample("c", dist.Bernoulli(logits=qc))
    with pyro.plate("data", 4, subsample_size=subsample) as idx:
        pyro.sample("z", dist.Bernoulli(logits=qz[idx]))
    if subsample is None if with_d is None else with_d:
        pyro.sample("d", dist.Bernoulli(logits=pyro.param("qd", lambda: torch.tensor(
            -0.2, dtype=D))))


def python_read_model(data):
    """The observation's mean is chosen with a Python int of the sample: provenance does not
    see it (TraceGraph_ELBO then leaves the observation out of the site's cost)."""
    means = [-1.5, 2.0]
    for i in range(2):
        z = pyro.sample(f"z{i}", _bern(0.5))
        pyro.sample(f"x{i}", dist.Normal(means[int(z)], 1.0), obs=data[i])


def exact_elbo(model, guide, supports: dict, args=()) -> torch.Tensor:
    """L = sum_z q(z) [log p(x, z) - log q(z)] over every configuration of the named guide
    sites (``supports``: site -> the values each element takes, and the site's shape),
    from the traces' log-densities: differentiable in the parameters."""
    names = list(supports)
    choices = []
    for name in names:
        values, shape = supports[name]
        size = int(torch.Size(shape).numel())
        choices.append([torch.tensor(combo, dtype=D).reshape(shape)
                        for combo in itertools.product(values, repeat=size)])
    total = 0.0
    for combo in itertools.product(*choices):
        data = dict(zip(names, combo))
        guide_trace = poutine.trace(poutine.condition(guide, data)).get_trace(*args)
        model_trace = poutine.trace(poutine.condition(model, data)).get_trace(*args)
        log_q, log_p = guide_trace.log_prob_sum(), model_trace.log_prob_sum()
        total = total + log_q.exp() * (log_p - log_q)
    return total


def exact_grads(elbo_fn) -> dict[str, torch.Tensor]:
    """dL wrt every unconstrained leaf of the param store (by name)."""
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    grads = torch.autograd.grad(elbo_fn(), leaves, allow_unused=True)
    return {n: torch.zeros_like(leaf) if g is None else g
            for n, leaf, g in zip(names, leaves, grads)}


def gradient_draws(elbo, model, guide, args, num_draws) -> dict[str, torch.Tensor]:
    """``num_draws`` draws of dL per parameter name."""
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    rows = {name: [] for name in names}
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(model, guide, *args)
        for name, leaf, g in zip(names, leaves, torch.autograd.grad(loss, leaves,
                                                                     allow_unused=True)):
            rows[name].append(torch.zeros_like(leaf) if g is None else -g)
    return {name: torch.stack(r) for name, r in rows.items()}


def _tracegraph_grads(model, guide, args, leaves, seed, **options):
    pyro.set_rng_seed(seed)
    _, surrogate_loss = TraceGraph_ELBO(**options)._loss_and_surrogate_loss(model, guide,
                                                                           args, {})
    return torch.autograd.grad(surrogate_loss, leaves, allow_unused=True)


def _our_grads(elbo, model, guide, args, leaves, seed):
    pyro.set_rng_seed(seed)
    return torch.autograd.grad(elbo.differentiable_loss(model, guide, *args), leaves,
                               allow_unused=True)


# ---------------------------------------------------------------------------- the rule
def test_each_site_meets_only_what_its_value_reaches():
    """Independent sites meet their own terms; a Markov chain also its child's prior; a
    guide chain carries a site's value to every later guide site."""
    indep, chain = binary_chain(markov=False, dtype=D), binary_chain(dtype=D)
    for problem in (indep, chain):
        problem.set_params()
    met = score_downstream(JensenELBO(), indep.model, indep.guide, *indep.args)
    assert met["z_2"] == {"z_2", "x_2"}
    met = score_downstream(JensenELBO(), chain.model, chain.guide, *chain.args)
    assert met["z_2"] == {"z_2", "x_2", "z_3"} and met["z_5"] == {"z_5", "x_5"}

    def chain_guide(data):
        logits = pyro.param("q_logits", lambda: torch.zeros(6, dtype=D))
        z = torch.zeros((), dtype=D)
        for t in range(6):
            z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=logits[t] + z))

    met = score_downstream(JensenELBO(), indep.model, chain_guide, *indep.args)
    assert met["z_4"] == {"z_4", "x_4", "z_5", "x_5"}


def test_tree_and_plates():
    data = torch.arange(5, dtype=D)
    guide = mean_field_guide([f"b{i}" for i in range(5)])
    met = score_downstream(JensenELBO(), tree_model, guide, data)
    assert met["b1"] == {"b1", "x1", "b3"} and met["b0"] == {"b0", "x0", "b1", "b2"}
    met = score_downstream(JensenELBO(max_plate_nesting=1), mixed_model, mixed_guide,
                           torch.arange(5, dtype=D))
    assert met["c"] == {"c", "z"} and met["z"] == {"z", "x", "d"} and met["d"] == {"d", "y"}


@pytest.mark.parametrize("model, why", [
    (python_read_model, "read into Python (__int__)"),
])
def test_a_value_read_into_python_keeps_the_plate_rule(model, why):
    guide = mean_field_guide(["z0", "z1"])
    with pytest.warns(UserWarning, match=r"'z0'.*" + why.replace("(", r"\(").replace(
            ")", r"\)") + r".*test_downstream\.py"):
        met = score_downstream(JensenELBO(), model, guide, torch.zeros(2, dtype=D))
    assert met == {"z0": None, "z1": None}


def test_a_value_written_into_another_tensor_keeps_the_plate_rule():
    def model(data):
        zs = torch.zeros(3, dtype=D)
        for i in range(3):
            zs[i] = pyro.sample(f"z{i}", _bern(0.5))
        pyro.sample("x", dist.Normal(zs, 1.0).to_event(1), obs=data)

    with pytest.warns(UserWarning, match=r"written in place into a tensor \(__setitem__\)"):
        met = score_downstream(JensenELBO(), model, mean_field_guide(["z0", "z1", "z2"]),
                               torch.zeros(3, dtype=D))
    assert set(met.values()) == {None}

    def stacked(data):  # the same model without the write: the data flow is known
        zs = [pyro.sample(f"z{i}", _bern(0.5)) for i in range(3)]
        pyro.sample("x", dist.Normal(torch.stack(zs), 1.0).to_event(1), obs=data)

    met = score_downstream(JensenELBO(), stacked, mean_field_guide(["z0", "z1", "z2"]),
                           torch.zeros(3, dtype=D))
    assert met["z1"] == {"z1", "x"}


def test_a_failing_replay_falls_back_with_a_warning():
    calls = []

    def model(data):
        calls.append(1)
        if len(calls) == 2:  # the analysis's replay
            raise RuntimeError("not replayable")
        python_read_model(data)

    with pytest.warns(UserWarning, match="could not trace the data flow.*not replayable"):
        met = score_downstream(JensenELBO(), model, mean_field_guide(["z0", "z1"]),
                               torch.zeros(2, dtype=D))
    assert met == {"z0": None, "z1": None}


def test_an_effect_based_guide_is_taken_in_its_sample_order():
    """A GuideMessenger runs the model inside itself: its data flow is not replayed, so each
    guide site may read every earlier one (never less than the truth)."""
    def model(data):
        b = pyro.sample("b", _bern(0.5))
        u = pyro.sample("u", dist.Normal(torch.zeros((), dtype=D), 1.0))
        pyro.sample("x", dist.Normal(u, 1.0), obs=data[0])
        pyro.sample("y", dist.Normal(b, 1.0), obs=data[1])

    class Guide(AutoNormalMessenger):
        def get_posterior(self, name, prior):
            if name == "b":
                return dist.Bernoulli(logits=pyro.param("qb", torch.tensor(0.1, dtype=D)))
            return super().get_posterior(name, prior)

    guide = Guide(model)
    met = score_downstream(JensenELBO(), model, guide, torch.zeros(2, dtype=D))
    assert met["b"] == {"b", "u", "x", "y"}


# ---------------------------------------------------------------------------- unbiasedness
def _check_unbiased(elbo, model, guide, args, exact_fn, num_draws):
    exact = exact_grads(exact_fn)
    draws = gradient_draws(elbo, model, guide, args, num_draws)
    for name, rows in draws.items():
        assert_mean_close(rows, exact[name], what=f"{type(elbo).__name__} dL/d{name}")


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("markov", [True, False], ids=["chain", "independent"])
def test_chain_and_independent_sequence_match_enumeration(loss, markov):
    problem = binary_chain(markov=markov, dtype=D)
    problem.set_params()
    elbo = LOSSES[loss](num_particles=50, vectorize_particles=True, max_plate_nesting=0)
    leaves = problem.unconstrained_params()
    _check_unbiased(elbo, problem.model, problem.guide, problem.args,
                    lambda: problem.exact_elbo({n: pyro.param(n) for n in leaves}), 100)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_tree_matches_enumeration(loss):
    data = torch.tensor([0.5, -1.0, 1.2, 0.3, -0.4], dtype=D)
    names = [f"b{i}" for i in range(5)]
    guide = mean_field_guide(names)
    elbo = LOSSES[loss](num_particles=50, vectorize_particles=True, max_plate_nesting=0)
    elbo.loss(tree_model, guide, data)  # create the parameters
    supports = {name: ((0.0, 1.0), ()) for name in names}
    _check_unbiased(elbo, tree_model, guide, (data,),
                    lambda: exact_elbo(tree_model, guide, supports, (data,)), 100)


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("subsample", [None, 2], ids=["full", "subsampled"])
def test_plates_mixed_with_global_sites_match_enumeration(loss, subsample):
    """Subsampled, the estimate is unbiased for the full plate's L (the plate without d)."""
    data = torch.tensor([0.9, -1.1, 1.3, -0.2, 0.7], dtype=D)
    elbo = LOSSES[loss](num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    elbo.loss(mixed_model, mixed_guide, data, subsample)
    supports = {"c": ((0.0, 1.0), ()), "z": ((0.0, 1.0), (4,))}
    if subsample is None:
        supports["d"] = ((0.0, 1.0), ())
    full = [functools.partial(fn, subsample=None, with_d=subsample is None)
            for fn in (mixed_model, mixed_guide)]
    _check_unbiased(elbo, mixed_model, mixed_guide, (data, subsample),
                    lambda: exact_elbo(*full, supports, (data,)), 120)


def test_sequential_particles_and_a_guide_chain_match_enumeration():
    """Unvectorized particles, and a guide whose sites read each other (tiny_discrete)."""
    problem = tiny_discrete(dtype=D)
    problem.set_params()
    leaves = problem.unconstrained_params()
    for make in (LOSSES["jensen_analytic"], LOSSES["analytic_kl"]):
        elbo = make(num_particles=1, max_plate_nesting=1)
        _check_unbiased(elbo, problem.model, problem.guide, problem.args,
                        lambda: problem.exact_elbo({n: pyro.param(n) for n in leaves}), 800)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_mixture_with_continuous_globals_matches_its_closed_form(loss):
    problem = two_cluster_mixture(num_data=6, dtype=D)
    problem.set_params({"assign_logits": torch.linspace(-1.0, 1.0, 6, dtype=D)})
    leaves = problem.unconstrained_params()
    constrained = lambda: {n: pyro.param(n) for n in leaves}  # noqa: E731
    elbo = LOSSES[loss](num_particles=50, vectorize_particles=True, max_plate_nesting=1)
    _check_unbiased(elbo, problem.model, problem.guide, problem.args,
                    lambda: problem.exact_elbo(constrained()), 100)


def test_a_python_read_stays_unbiased_where_tracegraph_is_not():
    """Pyro loses the dependency through ``int(z)`` and leaves the observation out of the
    site's cost (a biased gradient); the plate rule here keeps it."""
    data = torch.tensor([1.0, -0.5], dtype=D)
    guide = mean_field_guide(["z0", "z1"])
    supports = {"z0": ((0.0, 1.0), ()), "z1": ((0.0, 1.0), ())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        elbo = JensenELBO(max_plate_nesting=0)  # int(z) needs one particle at a time
        elbo.loss(python_read_model, guide, data)
        _check_unbiased(elbo, python_read_model, guide, (data,),
                        lambda: exact_elbo(python_read_model, guide, supports, (data,)), 1000)
    exact = exact_grads(lambda: exact_elbo(python_read_model, guide, supports, (data,)))
    leaf = pyro.param("logits").unconstrained()
    rows = torch.stack([-_tracegraph_grads(python_read_model, guide, (data,), [leaf], s)[0]
                        for s in range(200)])
    error = (rows.mean(0) - exact["logits"]).abs()
    assert bool((error > 2 * K_SE * rows.std(0) / 200**0.5).any())  # far outside its noise


def glimpses(data):
    """Three model-drawn glimpses in a chain (the attention policy's parameters live)."""
    att = pyro.param("att", lambda: torch.tensor([0.3, -0.6, 0.9], dtype=D))
    trans = pyro.param("trans", lambda: torch.tensor(0.8, dtype=D))
    g, out = torch.zeros((), dtype=D), []
    for t in range(3):
        g = pyro.sample(f"g{t}", dist.Bernoulli(logits=att[t] + trans * g))
        out.append(g)
    return out


def glimpse_model(data):
    for t, g in enumerate(glimpses(data)):
        pyro.sample(f"x{t}", dist.Normal(2.0 * g - 1.0, 1.0), obs=data[t])


def test_hard_attention_sites_meet_their_downstream_terms_only():
    """Model-drawn glimpses in a chain, each with its own observation: each glimpse's reward
    holds its downstream terms only (its observation and the later glimpses'), and the
    gradient is unbiased against enumeration (F = sum_l p(l) log p(x | l): the enumerator
    with q = p, the glimpses' own distribution)."""
    data = torch.tensor([0.4, -0.8, 1.1], dtype=D)
    elbo = HardAttentionELBO(estimator="reinforce", num_particles=50,
                             vectorize_particles=True, max_plate_nesting=0)
    met = score_downstream(elbo, glimpse_model, empty_guide, data)
    assert met["g1"] == {"g1", "x1", "g2", "x2"} and met["g2"] == {"g2", "x2"}
    supports = {f"g{t}": ((0.0, 1.0), ()) for t in range(3)}
    _check_unbiased(elbo, glimpse_model, empty_guide, (data,),
                    lambda: exact_elbo(glimpse_model, glimpses, supports, (data,)), 100)


# ---------------------------------------------------------------------------- TraceGraph_ELBO
@pytest.mark.parametrize("case", ["chain", "independent", "tree", "mixed", "vectorized"])
def test_equals_tracegraph_elbo_draw_for_draw(case):
    """Where TraceGraph_ELBO's provenance rule and ours coincide, the surrogate gradients
    agree on every draw: JensenELBO(entropy="sampled") everywhere, and with mean-field
    guides also the analytic entropy and (on independent sites) the analytic KL, whose own
    score term meets log p - log q as TraceGraph_ELBO's does."""
    options, losses = {"max_plate_nesting": 0}, ["jensen_sampled", "jensen_analytic"]
    if case in ("chain", "independent", "vectorized"):
        problem = binary_chain(markov=case == "chain", dtype=D)
        problem.set_params()
        model, guide, args = problem.model, problem.guide, problem.args
        if case != "chain":
            losses.append("analytic_kl")
        if case == "vectorized":
            options.update(num_particles=4, vectorize_particles=True)
    elif case == "tree":
        args = (torch.tensor([0.5, -1.0, 1.2, 0.3, -0.4], dtype=D),)
        model, guide = tree_model, mean_field_guide([f"b{i}" for i in range(5)])
        JensenELBO().loss(model, guide, *args)
    else:
        args = (torch.tensor([0.9, -1.1, 1.3, -0.2, 0.7], dtype=D),)
        model, guide = mixed_model, mixed_guide
        options = {"max_plate_nesting": 1}
        JensenELBO(**options).loss(model, guide, *args)
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    for loss in losses:
        elbo = LOSSES[loss](**options)
        for seed in range(4):
            ours = _our_grads(elbo, model, guide, args, leaves, seed)
            theirs = _tracegraph_grads(model, guide, args, leaves, seed, **options)
            for name, a, b in zip(names, ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10,
                                           msg=f"{loss}, {case}, seed {seed}, d/d{name}")


def test_hard_attention_score_term_equals_tracegraphs():
    """TraceGraph_ELBO cannot draw a latent from the model; given a guide that samples it
    from the model's own distribution (a separate copy of the attention parameters, so that
    its gradient is the score term alone), its cost for each glimpse is the glimpse's
    downstream terms, and HardAttentionELBO's score term equals it draw for draw."""
    data = torch.tensor([0.4, -0.8, 1.1], dtype=D)

    def policy(prefix, t, g):
        att = pyro.param(f"{prefix}att", lambda: torch.tensor([0.3, -0.6, 0.9], dtype=D))
        return dist.Bernoulli(logits=att[t] + 0.8 * g)

    def model(data):
        g = torch.zeros((), dtype=D)
        for t in range(3):
            g = pyro.sample(f"g{t}", policy("", t, g))
            pyro.sample(f"x{t}", dist.Normal(2.0 * g - 1.0, 1.0), obs=data[t])

    def q_equals_p(data):
        g = torch.zeros((), dtype=D)
        for t in range(3):
            g = pyro.sample(f"g{t}", policy("q_", t, g))

    elbo = HardAttentionELBO(estimator="reinforce", max_plate_nesting=0)
    TraceGraph_ELBO().loss(model, q_equals_p, data)
    ours_leaf, their_leaf = pyro.param("att").unconstrained(), pyro.param("q_att").unconstrained()
    for seed in range(4):
        (ours,) = _our_grads(elbo, model, empty_guide, (data,), [ours_leaf], seed)
        (theirs,) = _tracegraph_grads(model, q_equals_p, (data,), [their_leaf], seed)
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-10)


# ---------------------------------------------------------------------------- variance
VARIANCE_DRAWS = 200


def _draws(loss_fn, leaf, num_draws=VARIANCE_DRAWS, seed=0):
    pyro.set_rng_seed(seed)
    return torch.stack([-torch.autograd.grad(loss_fn(), [leaf])[0] for _ in range(num_draws)])


def _tracegraph_loss(elbo, model, guide, args):
    return elbo._loss_and_surrogate_loss(model, guide, args, {})[1]


def _sample_order_loss(model, guide, args):
    return sample_order_loss(model, guide, args, max_plate_nesting=0)[1]


@pytest.fixture(scope="module")
def references():
    """TraceGraph_ELBO's draws on the chain, the sample-order rule's on independent sites."""
    out = {}
    with pyro.validation_enabled(False):
        for markov in (True, False):
            problem = binary_chain(markov=markov, dtype=D)
            problem.set_params()
            leaf = problem.unconstrained_params()["q_logits"]
            call = (problem.model, problem.guide, problem.args)
            if markov:
                loss_fn = functools.partial(_tracegraph_loss,
                                            TraceGraph_ELBO(max_plate_nesting=0), *call)
            else:
                loss_fn = functools.partial(_sample_order_loss, *call)
            out[markov] = _draws(loss_fn, leaf)
    return out


@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("markov", [True, False], ids=["chain", "independent"])
def test_variance_at_most_tracegraphs_and_half_the_sample_order_rules(references, loss,
                                                                     markov):
    """On the chain, no more gradient variance than TraceGraph_ELBO (paired draws; 4 SE);
    on independent sites sampled in sequence, at most half of the sample-order rule's
    (Pyro's ``_compute_downstream_costs``: every later site counts)."""
    problem = binary_chain(markov=markov, dtype=D)
    problem.set_params()
    leaf = problem.unconstrained_params()["q_logits"]
    elbo = LOSSES[loss](max_plate_nesting=0)
    ours = _draws(lambda: elbo.differentiable_loss(problem.model, problem.guide,
                                                   *problem.args), leaf)
    ratio, se, _ = variance_ratio(ours, references[markov])
    if markov:
        assert ratio <= 1.0 + K_SE * se, (loss, ratio, se)
    else:
        assert ratio + K_SE * se <= 0.5, (loss, ratio, se)


# ---------------------------------------------------------------------------- compiled
@pytest.mark.usefixtures("traced_only")
def test_compiled_loss_uses_the_plans_rule():
    """``jit=True`` traces the eager loss, whose per-plan rule is Python: on independent
    sites the traced graph's gradients equal TraceGraph_ELBO's draw for draw (as the eager
    ones do), not the plate rule's."""
    problem = binary_chain(markov=False, dtype=D)
    problem.set_params()
    names, leaves = zip(*sorted(pyro.get_param_store().named_parameters()))
    elbo = AnalyticKLELBO(jit=True, max_plate_nesting=0)
    elbo.differentiable_loss(problem.model, problem.guide, *problem.args)  # trace first
    assert elbo._compiled
    for seed in (1, 2):
        ours = _our_grads(elbo, problem.model, problem.guide, problem.args, leaves, seed)
        theirs = _tracegraph_grads(problem.model, problem.guide, problem.args, leaves, seed,
                                   max_plate_nesting=0)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
