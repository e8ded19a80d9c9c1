"""CompiledSVI with Pyro's own ELBOs: compiled where the estimator is ours or Pyro's enumeration,
eager (as SVI) with one warning elsewhere.

The reference is always ``pyro.infer.SVI`` with the same ELBO, optimizer and seed.  Most tests
run the traced step uncompiled (``backend.BACKEND = None``: the ATen graph as Python, whose
random draws are torch's own, in the eager order), so the trajectories must agree to float64
rounding; two tests compile with Inductor and check convergence against closed forms.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pyro.infer.traceenum_elbo as traceenum_elbo
import pyro.optim
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import (
    SVI,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    TraceMeanField_ELBO,
    TraceTailAdaptive_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.util import Dice

from pyro_elbo_ext import CompiledSVI, JensenELBO
from pyro_elbo_ext.compiled import backend
from pyro_elbo_ext.compiled.adapter import EagerFallbackWarning, adapt
from pyro_elbo_ext.compiled.pyro_losses import PyroEnumLoss
from pyro_elbo_ext.compiled.trace import trace_loss_and_grad
from pyro_elbo_ext.problems.discrete import binary_chain

F64 = torch.float64


@pytest.fixture
def traced_only(monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", None)


# ---------------------------------------------------------------- models
DATA = torch.tensor([0.3, 1.9, 1.1, -0.4, 2.2, 0.8], dtype=F64)


def normal_model(data):
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def normal_guide(data):
    loc = pyro.param("loc", torch.tensor(0.2, dtype=F64))
    scale = pyro.param("scale", torch.tensor(0.8, dtype=F64),
                       constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


MIXTURE_DATA = torch.tensor([-2.1, -1.7, -2.4, 1.9, 2.3, 2.0, -1.9, 2.2], dtype=F64)


@config_enumerate
def mixture_model(data):
    """Two Gaussian components, assignments enumerated in the model (Pyro's GMM tutorial)."""
    weights = pyro.param("weights", torch.tensor([0.4, 0.6], dtype=F64),
                         constraint=dist.constraints.simplex)
    scale = pyro.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=F64), 1.0))
    locs = pyro.param("locs", torch.tensor([-0.5, 0.5], dtype=F64))
    with pyro.plate("data", data.shape[0]):
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("x", dist.Normal(locs[assignment], scale), obs=data)


def mixture_guide(data):
    loc = pyro.param("scale_loc", torch.tensor(0.1, dtype=F64))
    pyro.sample("scale", dist.LogNormal(loc, 0.3))


HMM_DATA = torch.tensor([0.1, 2.2, 1.8, -0.2], dtype=F64)


def hmm_model(data):
    """A two-state HMM, states enumerated in sequence (``pyro.markov``)."""
    transition = pyro.param("transition", torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=F64),
                            constraint=dist.constraints.simplex)
    means = pyro.param("means", torch.tensor([0.2, 1.5], dtype=F64))
    noise = pyro.sample("noise", dist.LogNormal(torch.tensor(-0.5, dtype=F64), 0.5))
    state = 0
    for t in pyro.markov(range(len(data))):
        state = pyro.sample(f"state_{t}", dist.Categorical(transition[state]),
                            infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(means[state], noise), obs=data[t])


def hmm_guide(data):
    loc = pyro.param("noise_loc", torch.tensor(-0.3, dtype=F64))
    pyro.sample("noise", dist.LogNormal(loc, 0.2))


def _params():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def _trajectory(svi_class, model, guide, loss, data, steps=6, **options):
    """Steps from seed 7, the parameters created first (a build keeps the draws of a run that
    creates parameters, which may draw their initial values: see the compiled-step page)."""
    pyro.clear_param_store()
    with poutine.block(), pyro.validation_enabled(False):
        guide(data)
        model(data)
    pyro.set_rng_seed(7)
    svi = svi_class(model, guide, pyro.optim.Adam({"lr": 0.05}), loss, **options)
    losses = [svi.step(data) for _ in range(steps)]
    return losses, _params()


def _assert_runs_eagerly_as_svi(model, guide, make_loss, data, match: str, rtol: float):
    """CompiledSVI takes SVI's steps (``make_loss()`` under both) with exactly one
    EagerFallbackWarning, matching ``match``."""
    expected = _trajectory(SVI, model, guide, make_loss(), data)
    with pytest.warns(EagerFallbackWarning, match=match) as record:
        actual = _trajectory(CompiledSVI, model, guide, make_loss(), data)
    assert sum(w.category is EagerFallbackWarning for w in record) == 1
    _assert_same(actual, expected, rtol=rtol)


def _assert_same(actual, expected, rtol=1e-10):
    (losses, params), (expected_losses, expected_params) = actual, expected
    assert losses == pytest.approx(expected_losses, rel=rtol)
    assert params.keys() == expected_params.keys()
    for name, value in expected_params.items():
        torch.testing.assert_close(params[name], value, rtol=rtol, atol=rtol)
    assert losses[0] != losses[-1] or not all(map(math.isfinite, losses))  # it moved


# ---------------------------------------------------------------- mapped to our estimators
SAME_ESTIMATOR = {
    # CompiledSVI's loss: (the loss SVI runs as the reference, what CompiledSVI traces)
    "Trace_ELBO": (lambda: Trace_ELBO(), lambda: Trace_ELBO(), "JensenELBO"),
    "JitTrace_ELBO": (lambda: JitTrace_ELBO(), lambda: Trace_ELBO(), "JensenELBO"),
    "Trace_ELBO-4-vectorized": (
        lambda: Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        lambda: Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1),
        "JensenELBO"),
    "Trace_ELBO-3-sequential": (lambda: Trace_ELBO(num_particles=3),
                                lambda: Trace_ELBO(num_particles=3), "JensenELBO"),
    "TraceMeanField_ELBO": (lambda: TraceMeanField_ELBO(), lambda: TraceMeanField_ELBO(),
                            "AnalyticKLELBO"),
    "JitTraceMeanField_ELBO": (lambda: JitTraceMeanField_ELBO(),
                               lambda: TraceMeanField_ELBO(), "AnalyticKLELBO"),
    "TraceGraph_ELBO": (lambda: TraceGraph_ELBO(), lambda: TraceGraph_ELBO(), "JensenELBO"),
    "JitTraceGraph_ELBO": (lambda: JitTraceGraph_ELBO(), lambda: TraceGraph_ELBO(),
                           "JensenELBO"),
    "RenyiELBO-alpha0": (
        lambda: RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True,
                          max_plate_nesting=1),
        lambda: RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True,
                          max_plate_nesting=1),
        "ImportanceWeightedELBO"),
}


@pytest.mark.parametrize("name", sorted(SAME_ESTIMATOR))
def test_pyro_elbos_take_svis_steps_draw_for_draw(traced_only, name):
    """Each ELBO is traced as the loss of ours with its estimator and settings: the same L_hat
    and gradient from the same draws, so SVI's trajectory to float64 rounding, silently."""
    ours, reference, traced_as = SAME_ESTIMATOR[name]
    assert type(adapt(ours()).traced).__name__ == traced_as
    expected = _trajectory(SVI, normal_model, normal_guide, reference(), DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = _trajectory(CompiledSVI, normal_model, normal_guide, ours(), DATA)
    _assert_same(actual, expected)


def test_settings_carry_over():
    elbo = Trace_ELBO(num_particles=5, vectorize_particles=True, max_plate_nesting=2,
                      retain_graph=True, strict_enumeration_warning=False)
    traced = adapt(elbo).traced
    assert isinstance(traced, JensenELBO) and traced.entropy == "sampled"
    assert (traced.num_particles, traced.vectorize_particles, traced.retain_graph,
            traced.strict_enumeration_warning) == (5, True, True, False)
    assert traced.max_plate_nesting == elbo.max_plate_nesting == 3  # 2 plates + particles


# ---------------------------------------------------------------- TraceEnum_ELBO
ENUMERATED = {
    "mixture": (mixture_model, mixture_guide, MIXTURE_DATA),
    "hmm": (hmm_model, hmm_guide, HMM_DATA),
}


@pytest.mark.parametrize("problem, elbo_class", [("mixture", TraceEnum_ELBO),
                                                  ("mixture", JitTraceEnum_ELBO),
                                                  ("hmm", TraceEnum_ELBO)])
def test_traceenum_takes_svis_steps(traced_only, problem, elbo_class):
    """Pyro's own enumeration and contraction, traced: SVI's trajectory, silently."""
    model, guide, data = ENUMERATED[problem]
    expected = _trajectory(SVI, model, guide, TraceEnum_ELBO(max_plate_nesting=1), data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = _trajectory(CompiledSVI, model, guide, elbo_class(max_plate_nesting=1), data)
    _assert_same(actual, expected)


def _zero_weight_model(data):
    """A component of probability exactly 0: Dice's restricted dot product (p > 0) applies."""
    weights = pyro.param("w", torch.tensor([0.7, 0.3, 0.0], dtype=F64))
    locs = pyro.param("locs", torch.tensor([-1.0, 1.0, 3.0], dtype=F64))
    with pyro.plate("data", data.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[z], 1.0), obs=data)


@pytest.mark.parametrize("model, guide, data", [
    (mixture_model, mixture_guide, MIXTURE_DATA),
    (_zero_weight_model, lambda data: None, MIXTURE_DATA),
])
def test_traced_traceenum_equals_eager_at_new_parameters(model, guide, data):
    """The trace (Dice's dot product as a where, no NaN read) gives Pyro's eager loss and
    gradient at other parameter values and other draws, with and without zero
    probabilities (where the restricted branch applies)."""
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = PyroEnumLoss(elbo)

    def loss_fn(args, kwargs):
        return loss.eager_differentiable_loss(model, guide, args, kwargs)

    traced = trace_loss_and_grad(loss_fn, (data,), {})
    assert not traced.reads  # no tensor value read into Python
    with torch.no_grad():
        for param in traced.params:
            param.add_(0.25)
    pyro.set_rng_seed(3)
    outputs = traced.graph(*traced.params, data)
    pyro.set_rng_seed(3)
    expected = elbo.differentiable_loss(model, guide, data)
    grads = torch.autograd.grad(expected, traced.params, allow_unused=True)
    torch.testing.assert_close(outputs[0], expected.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(outputs[1:], grads):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want,
                                   rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in outputs[1:])


def test_pyros_code_is_patched_only_while_tracing(traced_only):
    original = (Dice.compute_expectation, traceenum_elbo.warn_if_nan)
    svi = CompiledSVI(mixture_model, mixture_guide, pyro.optim.Adam({"lr": 0.05}),
                      TraceEnum_ELBO(max_plate_nesting=1))
    svi.step(MIXTURE_DATA)
    assert (Dice.compute_expectation, traceenum_elbo.warn_if_nan) == original
    # an eager call through the wrapper is Pyro's own code: it still warns on a NaN
    with pytest.warns(UserWarning, match="Encountered NaN"), pyro.validation_enabled(False):
        PyroEnumLoss(TraceEnum_ELBO(max_plate_nesting=1)).eager_differentiable_loss(
            mixture_model, mixture_guide,
            (torch.tensor([float("nan")] * 3, dtype=F64),), {})


# ---------------------------------------------------------------- eager, as SVI
class MyELBO(Trace_ELBO):
    """A user's own subclass: CompiledSVI cannot know what it changed."""


EAGER = {
    "RenyiELBO-alpha-0.5": (lambda: RenyiELBO(alpha=0.5, num_particles=2),
                            "RenyiELBO\\(alpha=0.5\\) has no counterpart"),
    "TraceTailAdaptive_ELBO": (lambda: TraceTailAdaptive_ELBO(num_particles=3,
                                                              vectorize_particles=True,
                                                              max_plate_nesting=1),
                               "TraceTailAdaptive_ELBO is not among"),
    "user subclass": (lambda: MyELBO(), "MyELBO is a user-defined ELBO"),
}


@pytest.mark.parametrize("name", sorted(EAGER))
def test_other_losses_run_eagerly_as_svi_with_one_warning(name):
    make, match = EAGER[name]
    _assert_runs_eagerly_as_svi(normal_model, normal_guide, make, DATA, match, rtol=1e-12)


def _discrete_guide(data):
    probs = pyro.param("probs", torch.tensor(0.4, dtype=F64),
                       constraint=dist.constraints.unit_interval)
    pyro.sample("b", dist.Bernoulli(probs))
    normal_guide(data)


def _discrete_model(data):
    pyro.sample("b", dist.Bernoulli(torch.tensor(0.5, dtype=F64)))
    normal_model(data)


def _baselined_chain():
    """Three binary sites sampled in sequence in a Markov chain, a decaying-average baseline on
    each and a learned baseline value on one (TraceGraph_ELBO's ``infer["baseline"]``)."""
    problem = binary_chain(num_sites=3, dtype=F64)

    def config(msg):
        if msg["name"] == "z_1":
            return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.8,
                                 "baseline_value": pyro.param(
                                     "b", lambda: torch.tensor(-0.5, dtype=F64))}}
        if msg["name"].startswith("z_"):
            return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.8}}
        return {}

    return problem.model, poutine.infer_config(problem.guide, config), problem.args[0]


def _without_averages(trajectory):
    """TraceGraph_ELBO keeps its decaying averages in the param store; ours on the loss."""
    losses, params = trajectory
    return losses, {n: p for n, p in params.items() if not n.startswith("__baseline")}


def test_tracegraph_on_a_discrete_guide_with_baselines_takes_svis_steps(traced_only):
    """Score-function sites Rao-Blackwellized by the data flow, with Pyro's per-site baselines
    (decaying averages, a learned baseline value): CompiledSVI traces
    JensenELBO(entropy="sampled") and takes pyro.infer.SVI's TraceGraph_ELBO steps draw for
    draw, silently."""
    model, guide, data = _baselined_chain()
    assert adapt(TraceGraph_ELBO()).structure_check(model, guide, (data,), {}) is None
    expected = _without_averages(_trajectory(SVI, model, guide, TraceGraph_ELBO(), data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = _without_averages(_trajectory(CompiledSVI, model, guide, TraceGraph_ELBO(),
                                               data))
    _assert_same(actual, expected, rtol=1e-9)
    assert actual[1]["b"] != -0.5  # the baseline value learned


def test_a_rejector_site_runs_eagerly():
    """A reparameterized site with a score-function part (a rejection sampler): TraceGraph_ELBO
    gives it no score term and Trace_ELBO meets it with the plate rule, ours with the data flow;
    under TraceEnum_ELBO its sampler's loop reads random values.  That structure runs eagerly
    (the check names the site; Pyro's test_exponential_gamma[rsvi-*])."""
    from pyro.distributions.testing.rejection_gamma import RejectionGamma

    def guide(data):
        rate = pyro.param("rate", torch.tensor(1.0, dtype=F64),
                          constraint=dist.constraints.positive)
        pyro.sample("g", RejectionGamma(torch.tensor(2.0, dtype=F64), rate))

    for loss in (TraceGraph_ELBO(), TraceEnum_ELBO(), Trace_ELBO()):
        reason = adapt(loss).structure_check(None, guide, (DATA,), {})
        assert reason is not None and "(g)" in reason, type(loss).__name__


def test_our_loss_on_a_rejection_sampler_runs_eagerly_without_a_build(traced_only):
    """A loss of ours on a guide with a rejection sampler: the sampler's accept loop reads its
    draws into Python, which no graph can hold, so the structure runs eagerly from its first
    step (one warning naming the site, nothing traced) and takes SVI's steps."""
    from pyro.distributions.testing.rejection_gamma import RejectionGamma

    positive = DATA.abs() + 0.1

    def model(data):
        rate = pyro.sample("g", dist.Gamma(torch.tensor(2.0, dtype=F64), 1.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Exponential(rate), obs=data)

    def guide(data):
        rate = pyro.param("rate", torch.tensor(1.0, dtype=F64),
                          constraint=dist.constraints.positive)
        pyro.sample("g", RejectionGamma(torch.tensor(2.0, dtype=F64), rate))

    _assert_runs_eagerly_as_svi(model, guide, JensenELBO, positive,
                                r"JensenELBO.*sites \(g\).*Rejector", rtol=1e-9)


def test_trace_elbo_with_a_discrete_guide_site_runs_eagerly(traced_only):
    """Trace_ELBO's score term meets every term of its plates, ours only those downstream of
    the site (TraceGraph_ELBO's): not the same draws, so SVI's steps, one warning."""
    _assert_runs_eagerly_as_svi(_discrete_model, _discrete_guide, Trace_ELBO, DATA,
                                r"Trace_ELBO.*sites .*\(b\)", rtol=1e-9)


def test_sequential_renyi_takes_svis_steps(traced_only):
    """RenyiELBO(alpha=0, vectorize_particles=False): ImportanceWeightedELBO's sequential
    particles, draw for draw."""
    make = lambda: RenyiELBO(alpha=0, num_particles=3, max_plate_nesting=1)  # noqa: E731
    assert not adapt(make()).traced.vectorize_particles
    expected = _trajectory(SVI, normal_model, normal_guide, make(), DATA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = _trajectory(CompiledSVI, normal_model, normal_guide, make(), DATA)
    _assert_same(actual, expected)


def test_subsampled_renyi_runs_eagerly(traced_only):
    def model(data):
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
        with pyro.plate("data", 100, subsample=torch.arange(data.shape[0])):
            pyro.sample("x", dist.Normal(z, 1.0), obs=data)

    make = lambda: RenyiELBO(alpha=0, num_particles=2, max_plate_nesting=1)  # noqa: E731
    expected = _trajectory(SVI, model, normal_guide, make(), DATA)
    with pytest.warns(EagerFallbackWarning, match="scaled \\(subsampling\\)"):
        actual = _trajectory(CompiledSVI, model, normal_guide, make(), DATA)
    _assert_same(actual, expected, rtol=1e-9)


def test_a_model_latent_missing_from_the_guide_runs_as_pyro_runs_it(traced_only):
    """Trace_ELBO draws it from the prior (with Pyro's warning); ours refuses it, so that
    structure runs eagerly with Pyro's loss."""
    def guide_without_z(data):
        pyro.param("unused", torch.tensor(0.0, dtype=F64))

    with pytest.warns(UserWarning) as record:
        CompiledSVI(normal_model, guide_without_z, pyro.optim.Adam({"lr": 0.1}),
                    Trace_ELBO()).step(DATA)
    messages = " ".join(str(w.message) for w in record)
    assert "'z' is not sampled by the guide" in messages
    assert "Found vars in model but not guide" in messages


@pytest.mark.parametrize("independent", [True, False])
@pytest.mark.parametrize("auto_class", [AutoDelta, AutoNormal])
def test_a_subsampled_autoguide_without_parameters_steps(traced_only, auto_class, independent):
    """Pyro's test_subsample_guide_2: no latent site, so a step has nothing to update."""
    def model(data):
        size = data.shape[0]
        with pyro.plate("origin", size, dim=-2), pyro.plate("destin", size, dim=-1):
            batch = pyro.subsample(data, event_dim=0)
            pyro.sample("obs", dist.Normal(0, 1), obs=batch)

    def create_plates(data):
        size = data.shape[0]
        origin = pyro.plate("origin", size, subsample_size=5, dim=-2)
        if independent:
            return origin, pyro.plate("destin", size, subsample_size=5, dim=-1)
        with origin as subsample:
            pass
        return origin, pyro.plate("destin", size, subsample=subsample, dim=-1)

    guide = auto_class(model, create_plates=create_plates)
    svi = CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    data = torch.randn(10, 10)
    for _ in range(2):
        assert torch.isfinite(torch.tensor(svi.step(data)))


# ---------------------------------------------------------------- with Inductor
def test_inductor_trace_elbo_and_traceenum_converge():
    """Compiled with Inductor: Trace_ELBO's fit of the conjugate model reaches the exact
    posterior, TraceEnum_ELBO's fit of the mixture finds the two components."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = torch.cat([DATA, DATA + 0.3])
    svi = CompiledSVI(normal_model, normal_guide, pyro.optim.ClippedAdam(
        {"lr": 0.05, "lrd": 0.999}), Trace_ELBO())
    for _ in range(3000):
        svi.step(data)
    precision = 1 / 4 + len(data)
    exact_loc, exact_scale = data.sum() / precision, precision ** -0.5
    assert pyro.param("loc").item() == pytest.approx(exact_loc.item(), abs=0.1 * exact_scale)
    assert pyro.param("scale").item() == pytest.approx(exact_scale, rel=0.1)
    assert svi.compile_seconds and not svi._eager_structures

    pyro.clear_param_store()
    svi = CompiledSVI(mixture_model, mixture_guide, pyro.optim.Adam({"lr": 0.05}),
                      TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(400):
        svi.step(MIXTURE_DATA)
    locs = sorted(pyro.param("locs").tolist())
    assert locs[0] == pytest.approx(-2.0, abs=0.3) and locs[1] == pytest.approx(2.1, abs=0.3)
    assert pyro.param("weights").tolist() == pytest.approx([0.5, 0.5], abs=0.1)
    assert not svi._eager_structures


@pytest.mark.slow
@pytest.mark.parametrize("name", ["TraceMeanField_ELBO", "TraceGraph_ELBO", "RenyiELBO-alpha0"])
def test_inductor_other_pyro_elbos_converge(name):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = CompiledSVI(normal_model, normal_guide, pyro.optim.ClippedAdam(
        {"lr": 0.05, "lrd": 0.999}), SAME_ESTIMATOR[name][0]())
    for _ in range(3000):
        svi.step(DATA)
    precision = 1 / 4 + len(DATA)
    exact_loc, exact_scale = DATA.sum() / precision, precision ** -0.5
    assert pyro.param("loc").item() == pytest.approx(exact_loc.item(), abs=0.1 * exact_scale)
    # L_K's optimum (RenyiELBO) is wider than the posterior: the scale only for the ELBOs
    if name != "RenyiELBO-alpha0":
        assert pyro.param("scale").item() == pytest.approx(exact_scale, rel=0.1)
