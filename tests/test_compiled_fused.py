"""CompiledSVI.run (many steps per compiled call) and the compile_after policy of CompiledSVI.step.

The fused loop must take exactly the steps that as many ``step`` calls take from the same
seed: checked on the traced graph (``backend.BACKEND = None``, torch's own random draws) in
float64 with and without a learning signal's carried state, and once compiled with Inductor
(Inductor's own random numbers, seeded from torch's generator per step in both paths).
"""

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_elbo_ext import CompiledSVI, HardAttentionELBO, JensenELBO
from pyro_elbo_ext.compiled import backend, fused
from pyro_elbo_ext.compiled import svi as svi_module
from pyro_elbo_ext.compiled.fused import chain
from pyro_elbo_ext.problems.hard_attention import random_attention

F64 = torch.float64


@pytest.fixture
def traced_only(monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", None)


def model(data):
    z = pyro.sample("z", dist.Normal(torch.zeros((), dtype=data.dtype), 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("x", dist.Normal(z, 1.0), obs=data)


def guide(data):
    loc = pyro.param("loc", torch.tensor(0.2, dtype=data.dtype))
    scale = pyro.param("scale", torch.tensor(0.8, dtype=data.dtype),
                       constraint=dist.constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def _both_ways(make_svi, data, num_steps, seed=5, **run_options):
    """(losses, params, svi) of num_steps ``step`` calls and of one ``run``, from ``seed``;
    ``data``: the argument, or a tuple of them."""
    args = data if isinstance(data, tuple) else (data,)
    results = []
    for fused_run in (False, True):
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        svi = make_svi()
        if fused_run:
            losses = svi.run(num_steps, *args, **run_options)
        else:
            losses = torch.tensor([svi.step(*args) for _ in range(num_steps)], dtype=F64)
        params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
        results.append((losses, params, svi))
    return results


@pytest.mark.parametrize("num_steps, unroll, steps_per_call", [(23, 4, 8), (9, 1, 1024),
                                                               (3, 4, 1024)])
def test_run_takes_the_steps_of_step_calls(traced_only, num_steps, unroll, steps_per_call):
    data = torch.linspace(-1.0, 2.0, 7, dtype=F64)
    (expected, expected_params, _), (losses, params, svi) = _both_ways(
        lambda: CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO()),
        data, num_steps, unroll=unroll, steps_per_call=steps_per_call)
    assert losses.shape == (num_steps,) and losses.dtype == F64
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    for name, value in expected_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-12, atol=1e-12)
    assert bool(svi._fused) == (num_steps - 1 >= unroll)  # a loop was used where it fits
    # the optimizer's state moved with the loop: ten more steps either way still agree
    assert svi.get_state()["loc"]["state"][0]["step"] == num_steps


def test_run_carries_a_learning_signals_state(traced_only):
    """A moving-average baseline's state enters and leaves the loop as it does each step."""
    problem = random_attention(num_glimpses=2, num_data=6, num_locations=3, dtype=F64)

    def make():
        problem.set_params()
        return CompiledSVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 0.05}),
                           HardAttentionELBO(estimator="reinforce", max_plate_nesting=1,
                                             baseline="moving_average"))

    results = []
    for losses, _, svi in _both_ways(make, tuple(problem.args), 5, seed=2, unroll=2):
        state = {str(k): v.clone() for k, v in svi.loss.carried_state().items()}
        results.append((losses, state, svi.loss.step_count))
    (expected, expected_state, expected_count), (losses, state, count) = results
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    assert state.keys() == expected_state.keys() and state
    for key, value in expected_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-12)
    assert count == expected_count == 5


def test_run_falls_back_to_steps_where_a_loop_does_not_apply(traced_only):
    """An eager loss (RenyiELBO with alpha 0.5): run is num_steps SVI steps."""
    data = torch.linspace(-1.0, 2.0, 7, dtype=F64)
    with pytest.warns(UserWarning, match="RenyiELBO"):
        (expected, _, _), (losses, _, svi) = _both_ways(
            lambda: CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}),
                                pyro.infer.RenyiELBO(alpha=0.5)), data, 6)
    torch.testing.assert_close(losses, expected)
    assert not svi._fused


def test_run_checks_its_arguments_and_shows_a_progress_bar(traced_only, capsys):
    data = torch.linspace(-1.0, 2.0, 7, dtype=F64)
    svi = CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for bad, name in (({"num_steps": -1}, "num_steps"), ({"num_steps": 2.0}, "num_steps"),
                      ({"num_steps": 3, "unroll": 0}, "unroll"),
                      ({"num_steps": 3, "steps_per_call": True}, "steps_per_call")):
        options = dict(bad)
        with pytest.raises(ValueError, match=name):
            svi.run(options.pop("num_steps"), data, **options)
    assert svi.run(0, data).shape == (0,)
    losses = svi.run(10, data, unroll=3, progress_bar=True)
    assert losses.shape == (10,)
    assert "CompiledSVI.run" in capsys.readouterr().err


def test_chain_joins_steps():
    """A toy whole-step graph (x -> x + 1, the loss x) chained three times."""
    def whole_step(x, data):
        return x.sum(), torch.ones((), dtype=torch.bool), x + data

    graph = torch.fx.experimental.proxy_tensor.make_fx(whole_step)(torch.zeros(2),
                                                                   torch.ones(2))
    chained = chain(graph, 3, n_inputs=1, n_data=1, target_positions=[0])
    losses, final = chained(torch.zeros(2), torch.ones(2))
    assert losses.tolist() == [0.0, 2.0, 4.0] and final.tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="at least one step"):
        chain(graph, 0, 1, 1, [0])


def test_inductor_run_takes_the_steps_of_step_calls():
    """Compiled (the step by compile_fx, the loop by torch.compile): the same random numbers
    and the same updates, to float32 rounding."""
    data = torch.linspace(-1.0, 2.0, 50)
    (expected, expected_params, _), (losses, params, svi) = _both_ways(
        lambda: CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), JensenELBO()),
        data, 11, unroll=2)
    torch.testing.assert_close(losses.float(), expected.float(), rtol=1e-5, atol=1e-5)
    for name, value in expected_params.items():
        torch.testing.assert_close(params[name], value, rtol=1e-5, atol=1e-6)
    assert svi.fused_compile_seconds and svi._fused


# ---------------------------------------------------------------- compile_after
def test_a_structure_runs_eagerly_for_compile_after_steps_then_compiles(traced_only):
    """compile_after=2: each argument structure takes its first two steps eagerly (SVI's
    update, from the same optimizer state), counted per structure, and compiles at its
    third; a structure seen twice (a short last batch) never compiles."""
    optim = lambda: pyro.optim.Adam({"lr": 0.05})  # noqa: E731
    long, short = torch.linspace(-1.0, 2.0, 8, dtype=F64), torch.linspace(0.0, 1.0, 3,
                                                                           dtype=F64)
    batches = [long, long, short, long, long, short, long]
    trajectories = []
    for make in (lambda: SVI(model, guide, optim(), Trace_ELBO()),
                 lambda: CompiledSVI(model, guide, optim(), Trace_ELBO(), compile_after=2)):
        pyro.clear_param_store()
        guide(long)  # the parameters exist before the first step (see test_compiled_adapter)
        pyro.set_rng_seed(1)
        svi = make()
        trajectories.append([])
        for batch in batches:
            trajectories[-1].append(svi.step(batch))
            if isinstance(svi, CompiledSVI) and len(trajectories[-1]) == 2:
                assert not svi._steps and not svi.compile_seconds  # two eager steps
    assert trajectories[1] == pytest.approx(trajectories[0], rel=1e-12)
    assert len(svi._steps) == 1 and len(svi.compile_seconds) == 1  # the long batch, once
    assert list(svi._eager_structures.values()) == [2]  # the short batch: two eager steps
    svi.step(short)  # its third: it compiles
    assert len(svi._steps) == 2 and len(svi.compile_seconds) == 2


@pytest.mark.parametrize("value", [-1, 1.5, True, "auto"])
def test_compile_after_is_checked(value):
    with pytest.raises(ValueError, match="compile_after must be an integer >= 0"):
        CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(),
                    compile_after=value)


def test_the_default_deferral_is_the_module_constant(traced_only, monkeypatch):
    """Without ``compile_after`` a structure waits :data:`DEFAULT_COMPILE_AFTER` steps (the
    suite sets it to 0; here 3)."""
    monkeypatch.setattr(svi_module, "DEFAULT_COMPILE_AFTER", 3)
    svi = CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    data = torch.zeros(4, dtype=F64)
    for _ in range(3):
        svi.step(data)
    assert not svi._steps
    svi.step(data)
    assert len(svi._steps) == 1


def test_compile_after_zero_compiles_every_structure(traced_only):
    svi = CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(),
                      compile_after=0)
    svi.step(torch.zeros(4, dtype=F64))
    svi.step(torch.zeros(3, dtype=F64))
    assert len(svi._steps) == 2 and not svi._eager_structures


def test_run_compiles_at_once_whatever_compile_after_says(traced_only):
    svi = CompiledSVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO(),
                      compile_after=10_000)
    svi.run(9, torch.zeros(4, dtype=F64), unroll=4)
    assert len(svi._steps) == 1 and svi._fused


def test_default_steps_per_call_is_a_multiple_of_the_unroll():
    assert fused.DEFAULT_STEPS_PER_CALL % fused.DEFAULT_UNROLL == 0
