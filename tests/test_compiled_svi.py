"""CompiledSVI: the loss, its gradient and the optimizer's update in one compiled graph.

Most tests run the traced step uncompiled (``backend.BACKEND = None``: the ATen graph as
Python), which checks the trace, the functional optimizers and the bookkeeping without
Inductor's seconds; three tests compile with Inductor: a deterministic trajectory against
``pyro.infer.SVI``, unbiased L and dL from Inductor's own random numbers against closed forms,
and convergence to the exact posterior with a reproducible trajectory.
"""

import copy
import functools
import warnings

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Predictive, RenyiELBO
from pyro.infer.autoguide import AutoNormal
from torch.distributions import biject_to

from pyro_elbo_ext import (
    AnalyticKLELBO,
    CompiledSVI,
    GroupedOptim,
    HardAttentionELBO,
    ImportanceWeightedELBO,
    JensenELBO,
    empty_guide,
)
from pyro_elbo_ext.compiled import backend
from pyro_elbo_ext.compiled import cache as jit_module
from pyro_elbo_ext.compiled import svi as svi_module
from pyro_elbo_ext.compiled.adapter import EagerFallbackWarning
from pyro_elbo_ext.problems import get_problem
from pyro_elbo_ext.problems.hard_attention import random_attention
from tests.mc import assert_mean_close


@pytest.fixture
def traced_only(monkeypatch):
    """Run the traced step uncompiled: the trace and the bookkeeping are under test."""
    monkeypatch.setattr(backend, "BACKEND", None)


def _map_model(data):
    """No latent sites: the loss is deterministic, so trajectories can be compared exactly."""
    loc = pyro.param("loc", torch.tensor([0.5, -0.3], dtype=data.dtype))
    scale = pyro.param("scale", torch.tensor(2.0, dtype=data.dtype),
                       constraint=dist.constraints.positive)
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=data)


def _data(dtype=torch.float64):
    return torch.tensor([[1.0, 2.0], [0.5, 1.5], [2.0, 0.0], [1.2, 1.1]], dtype=dtype)


def _params():
    return {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}


def _run(svi_class, make_optim, steps, data, optim=None):
    pyro.clear_param_store()
    optim = optim or make_optim()
    svi = svi_class(_map_model, empty_guide, optim, JensenELBO())
    losses = [svi.step(data) for _ in range(steps)]
    return losses, _params(), svi


OPTIMIZERS = {
    "adam": lambda: pyro.optim.Adam({"lr": 0.1, "betas": (0.8, 0.95), "weight_decay": 0.01}),
    "adam-per-param": lambda: pyro.optim.Adam(
        lambda module, name: {"lr": 0.2 if name == "loc" else 0.05}),
    "clipped-adam-lrd": lambda: pyro.optim.ClippedAdam({"lr": 0.1, "lrd": 0.95,
                                                        "clip_norm": 2.0}),
    "sgd-nesterov": lambda: pyro.optim.SGD({"lr": 0.01, "momentum": 0.9, "nesterov": True}),
    "rmsprop-centered": lambda: pyro.optim.RMSprop({"lr": 0.01, "momentum": 0.5,
                                                    "centered": True}),
    "grouped-adam-clip": lambda: GroupedOptim(torch.optim.Adam, {"lr": 0.1},
                                              {"clip_norm": 0.5}),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_trajectory_equals_svi(traced_only, optimizer, dtype):
    data = _data(dtype)
    expected_losses, expected, _ = _run(SVI, OPTIMIZERS[optimizer], 15, data)
    losses, params, _ = _run(CompiledSVI, OPTIMIZERS[optimizer], 15, data)
    tol = {"rtol": 1e-11, "atol": 1e-12} if dtype == torch.float64 else \
        {"rtol": 2e-5, "atol": 1e-6}
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, **tol)
    assert losses == pytest.approx(expected_losses, rel=tol["rtol"] * 10)
    assert losses[0] != losses[-1]  # the parameters moved


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_eager_steps_then_compiled_steps_equal_svi(traced_only, optimizer):
    """compile_after=5: five eager steps (plain Adam stepped by torch's multi-tensor Adam, per
    hyper-parameter group; the rest by their functional updates), then the built step
    continues from their optimizer state: SVI's trajectory in float64."""
    data = _data()
    expected_losses, expected, _ = _run(SVI, OPTIMIZERS[optimizer], 12, data)
    compiled_after_five = functools.partial(CompiledSVI, compile_after=5)
    losses, params, svi = _run(compiled_after_five, OPTIMIZERS[optimizer], 12, data)
    assert len(svi._steps) == 1 and len(svi.compile_seconds) == 1
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=1e-11, atol=1e-12)
    assert losses == pytest.approx(expected_losses, rel=1e-10)


def test_inductor_trajectory_equals_svi():
    """The whole step compiled by Inductor takes SVI's steps (ClippedAdam with a decaying lr)."""
    data = _data()
    _, expected, _ = _run(SVI, OPTIMIZERS["clipped-adam-lrd"], 15, data)
    _, params, svi = _run(CompiledSVI, OPTIMIZERS["clipped-adam-lrd"], 15, data)
    for name, value in expected.items():
        torch.testing.assert_close(params[name], value, rtol=1e-9, atol=1e-10)
    assert len(svi.compile_seconds) == 1 and svi.compile_seconds[0] > 0


@pytest.mark.parametrize("first", [SVI, CompiledSVI])
def test_checkpoints_move_between_svi_and_compiled_svi(traced_only, first):
    """10 steps under one, the checkpoint (param store + optimizer state, pyro.optim's format),
    10 under the other: the trajectory of 20 steps under SVI."""
    data, make = _data(), OPTIMIZERS["clipped-adam-lrd"]
    _, expected, _ = _run(SVI, make, 20, data)
    _, _, svi = _run(first, make, 10, data)
    params_state = pyro.get_param_store().get_state()
    optim_state = (svi.optim if first is SVI else svi).get_state()
    assert optim_state and all("state" in s for s in optim_state.values())
    second = CompiledSVI if first is SVI else SVI
    pyro.clear_param_store()
    pyro.get_param_store().set_state(params_state)
    optim = make()
    resumed = second(_map_model, empty_guide, optim, JensenELBO())
    (resumed if second is CompiledSVI else optim).set_state(optim_state)
    for _ in range(10):
        resumed.step(data)
    for name, value in expected.items():
        torch.testing.assert_close(_params()[name], value, rtol=1e-11, atol=1e-12)


def test_compiled_svi_takes_over_the_optimizers_state(traced_only):
    data, make = _data(), OPTIMIZERS["adam"]
    _, expected, _ = _run(SVI, make, 12, data)
    _, _, svi = _run(SVI, make, 6, data)
    compiled = CompiledSVI(_map_model, empty_guide, svi.optim, JensenELBO())  # same optim
    for _ in range(6):
        compiled.step(data)
    for name, value in expected.items():
        torch.testing.assert_close(_params()[name], value, rtol=1e-11, atol=1e-12)


def test_inductor_step_is_unbiased():
    """Inductor's own random numbers: L and every element of dL, recovered from a tiny SGD
    step, average to their closed forms within K_SE standard errors."""
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    lr = 1e-6
    svi = CompiledSVI(problem.model, problem.guide, pyro.optim.SGD({"lr": lr}), JensenELBO())
    leaves = problem.unconstrained_params()
    start = {n: leaf.detach().clone() for n, leaf in leaves.items()}
    values, grads = [], {n: [] for n in leaves}
    for _ in range(600):
        values.append(-svi.step(*problem.args))
        with torch.no_grad():
            for name, leaf in leaves.items():
                grads[name].append((leaf - start[name]) / lr)  # SGD: -lr * d(-L)
                leaf.copy_(start[name])
    exact_leaves = {n: v.clone().requires_grad_() for n, v in start.items()}
    exact = problem.exact_elbo({n: biject_to(problem.constraint(n))(v)
                                for n, v in exact_leaves.items()})
    exact_grads = torch.autograd.grad(exact, list(exact_leaves.values()))
    values = torch.tensor(values, dtype=torch.float64)
    assert_mean_close(values, exact.detach(), what="L", atol=1e-6)
    for (name, draws), g in zip(grads.items(), exact_grads):
        assert_mean_close(torch.stack(draws), g, what=f"dL/d{name}", atol=1e-4)
    assert values.std() > 0  # fresh noise on every step


def test_inductor_converges_and_same_seed_same_trajectory():
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.999})
    svi = CompiledSVI(problem.model, problem.guide, optim, JensenELBO())
    svi.step(*problem.args)
    # a checkpoint as torch.save would write it (get_state returns the live tensors)
    params_state = copy.deepcopy(pyro.get_param_store().get_state())
    optim_state = svi.get_state()
    trajectories = []
    for _ in range(2):  # restore the checkpoint, reseed: the same trajectory
        pyro.get_param_store().set_state(copy.deepcopy(params_state))
        svi.set_state(optim_state)
        pyro.set_rng_seed(11)
        trajectories.append([svi.step(*problem.args) for _ in range(3000)])
    assert trajectories[0] == trajectories[1]
    # the restored store holds new tensors: the step was rebuilt (traced and compiled) twice
    assert len(svi.compile_seconds) == 3 and len(svi._steps) == 1
    # the optimizer's own noise at the end (lr 0.05 * 0.999^3000 = 0.0025): a tolerance of
    # a tenth of the posterior's standard deviation for the mean and 5% for the scale
    posterior = problem.posterior_params
    sd = float(posterior["scale"])
    assert abs(pyro.param("loc").item() - float(posterior["loc"])) < 0.1 * sd
    assert pyro.param("scale").item() == pytest.approx(sd, rel=0.05)


# ---------------------------------------------------------------- Pyro's interface
def _normal_model(data):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def test_autoguide_median_predictive_and_decompose_read_the_updated_store(traced_only):
    data = torch.randn(20) + 1.0
    guide = AutoNormal(_normal_model)
    elbo = AnalyticKLELBO()
    svi = CompiledSVI(_normal_model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(300):
        svi.step(data)
    exact_mean = float(data.sum() / (data.numel() + 1))
    assert float(guide.median()["z"]) == pytest.approx(pyro.param("AutoNormal.locs.z").item())
    assert float(guide.median()["z"]) == pytest.approx(exact_mean, abs=0.1)
    samples = Predictive(_normal_model, guide=guide, num_samples=5)(data)
    assert samples["x"].shape == (5, 20)
    assert elbo.decompose(_normal_model, guide, data).elbo < 0
    assert isinstance(svi.evaluate_loss(data), float)


def test_pyro_module_networks_are_updated_in_place(traced_only):
    problem = get_problem("vae_digits")
    problem.set_params()
    svi = CompiledSVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 1e-2}),
                      JensenELBO(max_plate_nesting=problem.max_plate_nesting))
    svi.step(*problem.args)
    before = _params()
    svi.step(*problem.args)
    after = _params()
    assert before.keys() == after.keys() and len(after) > 2
    assert all(not torch.equal(before[n], after[n]) for n in after)


# ---------------------------------------------------------------- structure changes
def _branching_model(data, flag):
    loc = pyro.param("loc", torch.tensor(0.0, dtype=data.dtype))
    if flag.sum() > 0:  # Python control flow on a tensor's value
        loc = loc + 10.0
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


def test_a_changed_tensor_read_retraces_with_a_warning(traced_only, monkeypatch):
    monkeypatch.setattr(svi_module, "MAX_RETRACES", 2)
    data = torch.zeros(3, dtype=torch.float64)
    svi = CompiledSVI(_branching_model, empty_guide, pyro.optim.SGD({"lr": 0.0}), JensenELBO())
    plus, minus = torch.ones(1), -torch.ones(1)
    exact = {1: 3 * (50.0 + 0.5 * 1.8378770664093453), -1: 3 * 0.5 * 1.8378770664093453}
    assert svi.step(data, plus) == pytest.approx(exact[1])
    with pytest.warns(RuntimeWarning, match=r"test_compiled_svi\.py:\d+ \(_branching_model\)"):
        assert svi.step(data, minus) == pytest.approx(exact[-1])  # not the stale branch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert svi.step(data, minus) == pytest.approx(exact[-1])  # the new graph holds
    with pytest.warns(RuntimeWarning):
        svi.step(data, plus)
    with pytest.raises(RuntimeError, match="reads tensor values into Python"):
        svi.step(data, minus)


def test_new_shapes_compile_new_steps_in_a_bounded_cache(traced_only, monkeypatch):
    monkeypatch.setattr(svi_module, "MAX_GRAPHS", 2)
    svi = CompiledSVI(_normal_model, AutoNormal(_normal_model), pyro.optim.Adam({"lr": 0.01}),
                      JensenELBO(), compile_after=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(torch.randn(5))
        svi.step(torch.randn(7))  # a new shape: a second step, silently (it is expected)
        svi.step(torch.randn(5))
    assert len(svi._steps) == 2
    with pytest.warns(RuntimeWarning, match="more than 2 argument structures"):
        svi.step(torch.randn(9))
    assert len(svi._steps) == 2


# ---------------------------------------------------------------- learning signals with state
STATEFUL = {
    "moving-average": dict(baseline="moving_average"),
    "learned-normalized": dict(baseline="learned", normalize=True, num_particles=4,
                               vectorize_particles=True),
    "moving-average-2-sequential": dict(baseline="moving_average", normalize=True,
                                        num_particles=2),
}


def _attention(dtype=torch.float64):
    problem = random_attention(num_glimpses=2, num_data=6, num_locations=3, dtype=dtype)
    problem.set_params()
    return problem


def _signal_state(loss) -> dict:
    return {str(k): v.detach().clone() for k, v in loss.carried_state().items()
            if k[-1] != "skipped"}


def _one_step_each_way(path, options, problem, eager_random=False):
    """A compiled path takes a step (seed 1) from the state its first step (seed 0) left;
    pyro.infer.SVI then takes the seed-1 step from that same state (params, optimizer, signal).
    Returns (compiled, eager) x (loss, params, signal state), and the state before."""
    make = lambda jit: HardAttentionELBO(estimator="reinforce", max_plate_nesting=1,  # noqa: E731
                                         jit=jit, **options)
    optim = lambda: pyro.optim.Adam({"lr": 0.05})  # noqa: E731
    loss = make(path == "jit")
    if path == "jit":
        svi = SVI(problem.model, problem.guide, optim(), loss)
    else:
        svi = CompiledSVI(problem.model, problem.guide, optim(), loss)
        svi.eager_random = eager_random
    pyro.set_rng_seed(0)
    svi.step(*problem.args)  # builds (traces, compiles) and steps
    params, checkpoint = _params(), loss.state_dict()
    # (a copy: torch's optimizer state_dict holds the live moment tensors)
    optimizer_state = copy.deepcopy(svi.optim.get_state() if path == "jit" else svi.get_state())
    before = _signal_state(loss)
    pyro.set_rng_seed(1)
    compiled = (svi.step(*problem.args), _params(), _signal_state(loss))
    with torch.no_grad():  # back to the state before the seed-1 step, in the same tensors
        for name, leaf in pyro.get_param_store().named_parameters():
            leaf.copy_(params[name])
    eager_loss = make(False)
    eager_loss.load_state_dict(checkpoint)
    eager_svi = SVI(problem.model, problem.guide, optim(), eager_loss)
    eager_svi.optim.set_state(optimizer_state)
    pyro.set_rng_seed(1)
    eager = (eager_svi.step(*problem.args), _params(), _signal_state(eager_loss))
    return compiled, eager, before


def _assert_same_step(compiled, eager, before, **tol):
    assert compiled[0] == pytest.approx(eager[0], rel=tol["rtol"])
    for name, value in eager[1].items():
        torch.testing.assert_close(compiled[1][name], value, **tol)
    assert compiled[2].keys() == eager[2].keys() == before.keys()
    for key, value in eager[2].items():
        torch.testing.assert_close(compiled[2][key], value, **tol, msg=key)
    assert any(not torch.equal(before[k], compiled[2][k]) for k in before)  # the state moved


@pytest.mark.parametrize("path", ["CompiledSVI", "jit"])
@pytest.mark.parametrize("options", list(STATEFUL.values()), ids=list(STATEFUL))
def test_learning_signal_state_steps_as_in_svi(traced_only, path, options):
    """The compiled step carries the baseline's and normalizer's state through its graph: from
    the same state and draws it takes SVI's step, parameters and state alike (issue 16.3)."""
    problem = _attention()
    compiled, eager, before = _one_step_each_way(path, options, problem)
    _assert_same_step(compiled, eager, before, rtol=1e-9, atol=1e-10)


def test_inductor_learning_signal_state_steps_as_in_svi():
    """Compiled by Inductor (with torch's random kernels, so that the draws are SVI's): the
    learned baseline's Adam step and the normalizer's update happen inside the graph."""
    problem = _attention()
    compiled, eager, before = _one_step_each_way(
        "CompiledSVI", STATEFUL["learned-normalized"], problem, eager_random=True)
    _assert_same_step(compiled, eager, before, rtol=1e-6, atol=1e-8)


def test_a_non_finite_compiled_step_keeps_the_state_and_names_the_site(traced_only):
    problem = _attention()
    loss = HardAttentionELBO(estimator="reinforce", baseline="moving_average", normalize=True,
                             max_plate_nesting=1, jit=True)
    with pyro.validation_enabled(False):
        loss.differentiable_loss(problem.model, problem.guide, *problem.args)  # trace
        loss.differentiable_loss(problem.model, problem.guide, *problem.args)  # compiled
        before = _signal_state(loss)
        x, glimpses, y = problem.args
        bad = (x, glimpses.clone().fill_(float("nan")), y)
        with pytest.warns(RuntimeWarning, match=r"site 'l\d' was not updated"):
            loss.differentiable_loss(problem.model, problem.guide, *bad)
        assert all(torch.equal(v, _signal_state(loss)[k]) for k, v in before.items())
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            value = loss.differentiable_loss(problem.model, problem.guide, *problem.args)
        assert bool(torch.isfinite(value))
    assert len(loss._compiled.lookup(
        jit_module.callable_key(problem.model, problem.guide)).graphs) == 1  # no retrace


# ---------------------------------------------------------------- the importance-weighted bound
def test_importance_weighted_iwae_compiles_and_steps_as_pyro_renyi(traced_only):
    """Issue 27 row 16: CompiledSVI with ImportanceWeightedELBO(estimator="iwae") (the path
    the DReG refusal recommends) used to raise AttributeError (state_updates_paused).  From
    the state its first step left, its seed-1 step is pyro.infer.SVI's step with Pyro's
    RenyiELBO(alpha=0) (the same estimator) for the same draws."""
    problem = get_problem("normal_normal", dtype=torch.float64)
    problem.set_params()
    optim = lambda: pyro.optim.Adam({"lr": 0.05})  # noqa: E731
    svi = CompiledSVI(problem.model, problem.guide, optim(),
                      ImportanceWeightedELBO(6, max_plate_nesting=1))
    pyro.set_rng_seed(0)
    svi.step(*problem.args)  # builds (traces, compiles) and steps
    params, optimizer_state = _params(), copy.deepcopy(svi.get_state())
    pyro.set_rng_seed(1)
    compiled = (svi.step(*problem.args), _params())
    with torch.no_grad():
        for name, leaf in pyro.get_param_store().named_parameters():
            leaf.copy_(params[name])
    renyi = SVI(problem.model, problem.guide, optim(),
                RenyiELBO(alpha=0, num_particles=6, vectorize_particles=True,
                          max_plate_nesting=1))
    renyi.optim.set_state(optimizer_state)
    pyro.set_rng_seed(1)
    eager = (renyi.step(*problem.args), _params())
    assert compiled[0] == pytest.approx(eager[0], rel=1e-10)
    for name, value in eager[1].items():
        torch.testing.assert_close(compiled[1][name], value, rtol=1e-9, atol=1e-10)
    assert any(not torch.equal(params[n], compiled[1][n]) for n in params)  # it moved


# ---------------------------------------------------------------- what runs eagerly
def _eager_fallback_matches_svi(model, make_guide, optim, loss, data, match, steps=3):
    """CompiledSVI takes SVI's steps (same seed, same values) with one warning naming why."""
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    svi = SVI(model, make_guide(), optim(), loss())
    expected = [svi.step(data) for _ in range(steps)]
    expected_params = _params()
    pyro.clear_param_store()
    pyro.set_rng_seed(3)
    with pytest.warns(EagerFallbackWarning, match=match) as record:
        compiled = CompiledSVI(model, make_guide(), optim(), loss())
        losses = [compiled.step(data) for _ in range(steps)]
    assert len([w for w in record if w.category is EagerFallbackWarning]) == 1
    assert losses == pytest.approx(expected, rel=1e-6)
    for name, value in _params().items():
        torch.testing.assert_close(value, expected_params[name], rtol=1e-6, atol=1e-7)


def test_an_unsupported_optimizer_runs_eagerly_as_svi():
    _eager_fallback_matches_svi(
        _normal_model, lambda: AutoNormal(_normal_model), lambda: pyro.optim.Adagrad({"lr": 0.1}),
        JensenELBO, torch.randn(4), "Adagrad.*supported: pyro.optim.Adam")


def test_validation_runs_eagerly_before_tracing(traced_only):
    def guide_without_z(data):
        pass

    svi = CompiledSVI(_normal_model, guide_without_z, pyro.optim.Adam({"lr": 0.1}),
                      JensenELBO())
    with pytest.raises(ValueError, match="'z' is not sampled by the guide"):
        svi.step(torch.randn(4))


def test_a_tensor_requiring_grad_outside_the_param_store_runs_eagerly(traced_only):
    """The graph could not update it (nor can SVI: it is not a parameter); SVI's step, with
    one warning naming why the structure is not compiled."""
    hidden = torch.tensor(0.3, requires_grad=True)

    def model(data):
        loc = pyro.param("loc", torch.tensor(0.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("x", dist.Normal(hidden + loc, 1.0), obs=data)

    _eager_fallback_matches_svi(model, lambda: empty_guide, lambda: pyro.optim.Adam({"lr": 0.1}),
                                JensenELBO, torch.randn(4), "not in Pyro's param store")


def test_an_argument_that_requires_grad_runs_eagerly(traced_only):
    data = torch.randn(4, requires_grad=True)
    _eager_fallback_matches_svi(_normal_model, lambda: AutoNormal(_normal_model),
                                lambda: pyro.optim.Adam({"lr": 0.1}), JensenELBO, data,
                                "argument tensor 0 \\(of shape \\(4,\\)\\) requires grad")
