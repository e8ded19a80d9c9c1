"""Pyro's per-site baselines (``infer={"baseline": {...}}``) on every loss.

Against Pyro's own TraceGraph_ELBO on the same draws (decaying average, a network, a value:
gradients and the network's own gradient equal draw for draw, the state evolving alike), the
exact gradient by enumeration (unbiased with a baseline), Pyro's validation of the options,
checkpoints, and the compiled step (the averages carried through the graph).
"""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceGraph_ELBO
from torch import nn

from pyro_elbo_ext import (
    AnalyticKLELBO,
    CompiledSVI,
    HardAttentionELBO,
    JensenELBO,
    empty_guide,
)
from pyro_elbo_ext.problems.discrete import binary_chain
from tests.mc import assert_mean_close
from tests.test_compiled import traced_only  # noqa: F401 - a fixture

D = torch.float64
SITES = tuple(f"z_{t}" for t in range(6))
#: where a loss's state_dict keeps Pyro's per-site baselines
KEY = "site_baselines._extra_state"


def _averages(loss) -> dict:
    return copy.deepcopy(loss.state_dict()[KEY]["slots"])


def _with(options_for):
    """``fn`` with ``infer={"baseline": options_for(name)}`` on the chain's sites."""
    def wrap(fn):
        def config(msg):
            return {"baseline": options_for(msg["name"])} if msg["name"] in SITES else {}
        return poutine.infer_config(fn, config)
    return wrap


def _chain_with(options_for, markov=True):
    problem = binary_chain(markov=markov, dtype=D)
    problem.set_params()
    return problem, _with(options_for)(problem.guide)


class Net(nn.Module):
    """A baseline network of the guide's input (the observations), one output per site."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(6, 6).double()

    def forward(self, x):
        return self.layer(x)


def _network_guide(problem):
    """The chain's guide with a registered network baseline per site (Pyro's usage)."""
    net = Net()

    def guide(data):
        module = pyro.module("baseline_net", net)
        out = module(data)
        q_logits = pyro.param("q_logits", lambda: torch.zeros(6, dtype=D))
        for t in range(6):
            pyro.sample(f"z_{t}", dist.Bernoulli(logits=q_logits[t]), infer={"baseline": {
                "nn_baseline": lambda x, t=t: module(x)[t], "nn_baseline_input": data,
                "use_decaying_avg_baseline": t % 2 == 0}})
        del out
    return guide


def _grads(loss_fn, seed):
    """The gradient wrt every parameter but TraceGraph_ELBO's own averages (which it keeps
    in the param store)."""
    pyro.set_rng_seed(seed)
    loss = loss_fn()
    names, leaves = zip(*sorted((n, p) for n, p in pyro.get_param_store().named_parameters()
                                if not n.startswith("__baseline")))
    return dict(zip(names, torch.autograd.grad(loss, leaves, allow_unused=True)))


def _assert_steps_equal_tracegraph(elbo, model, guide, args, steps=6, rtol=1e-9):
    """Call after call (the baselines' state moving at each), every gradient equals
    TraceGraph_ELBO's on the same draws."""
    tracegraph = TraceGraph_ELBO(max_plate_nesting=0)
    for seed in range(steps):
        ours = _grads(lambda: elbo.differentiable_loss(model, guide, *args), seed)
        theirs = _grads(lambda: tracegraph._loss_and_surrogate_loss(model, guide, args, {})[1],
                        seed)
        assert ours.keys() == theirs.keys()
        for name, grad in theirs.items():
            if grad is None:
                assert ours[name] is None or not ours[name].any()
            else:
                torch.testing.assert_close(ours[name], grad, rtol=rtol, atol=rtol / 10,
                                           msg=f"step {seed}, d/d{name}")


# ---------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("make", [lambda: JensenELBO(entropy="sampled", max_plate_nesting=0),
                                  lambda: JensenELBO(max_plate_nesting=0),
                                  lambda: AnalyticKLELBO(max_plate_nesting=0)],
                         ids=["jensen_sampled", "jensen_analytic", "analytic_kl"])
def test_decaying_average_equals_tracegraphs(make):
    problem, guide = _chain_with(lambda name: {"use_decaying_avg_baseline": True,
                                               "baseline_beta": 0.7}, markov=False)
    _assert_steps_equal_tracegraph(make(), problem.model, guide, problem.args)


def test_network_baseline_and_its_training_equal_tracegraphs():
    """The network's parameters get TraceGraph_ELBO's gradient (the squared error through
    the surrogate), so the SVI optimizer trains it as Pyro does."""
    problem = binary_chain(dtype=D)
    problem.set_params()
    guide = _network_guide(problem)
    elbo = JensenELBO(entropy="sampled", max_plate_nesting=0)
    # Pyro adds the network's output in place into its float32 zero average on the first
    # call (rounding it to float32): equal to that precision
    _assert_steps_equal_tracegraph(elbo, problem.model, guide, problem.args, rtol=1e-6)
    assert any(name.startswith("baseline_net") for name in pyro.get_param_store().keys())


def test_baseline_value_equals_tracegraphs():
    problem, guide = _chain_with(lambda name: {"baseline_value": pyro.param(
        f"b_{name}", lambda: torch.tensor(-1.5, dtype=D))})
    _assert_steps_equal_tracegraph(JensenELBO(entropy="sampled", max_plate_nesting=0),
                                   problem.model, guide, problem.args, steps=3)


def test_gradient_with_baselines_matches_enumeration():
    """A warmed-up decaying average and a network: the mean gradient of the guide's logits
    is the exact one (the baseline reads only past state and inputs)."""
    problem = binary_chain(dtype=D)
    problem.set_params()
    guide = _network_guide(problem)
    elbo = AnalyticKLELBO(num_particles=50, vectorize_particles=True, max_plate_nesting=0)
    for _ in range(20):  # the averages learn (the parameters do not move)
        elbo.differentiable_loss(problem.model, guide, *problem.args)
    leaves = problem.unconstrained_params()
    exact = problem.exact_elbo_and_grad()[1]["q_logits"]
    rows = []
    for _ in range(100):
        loss = elbo.differentiable_loss(problem.model, guide, *problem.args)
        rows.append(-torch.autograd.grad(loss, [leaves["q_logits"]])[0])
    assert_mean_close(torch.stack(rows), exact, what="dL/dq_logits with baselines")


def test_a_site_baseline_overrides_the_losss_for_that_site():
    """Hard attention: a glimpse with its own ``infer={"baseline": ...}`` takes Pyro's
    decaying average; the other keeps the loss's moving average."""
    data = torch.tensor([0.4, -0.8], dtype=D)

    def model(data):
        att = pyro.param("att", lambda: torch.tensor([0.3, -0.6], dtype=D))
        for t in range(2):
            infer = {"baseline": {"use_decaying_avg_baseline": True}} if t == 0 else {}
            g = pyro.sample(f"g{t}", dist.Bernoulli(logits=att[t]), infer=infer)
            pyro.sample(f"x{t}", dist.Normal(2.0 * g - 1.0, 1.0), obs=data[t])

    elbo = HardAttentionELBO(estimator="reinforce", baseline="moving_average",
                             max_plate_nesting=0)
    for _ in range(3):
        elbo.differentiable_loss(model, empty_guide, data)
    state = elbo.carried_state()
    assert ("site_baselines", "g0", "average") in state
    assert ("site_baselines", "g1", "average") not in state
    assert ("baseline", "g1", "average") in state and ("baseline", "g0", "average") not in state


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize("options, match", [
    ({"use_decaying_avg": True}, r"site 'z_0': unrecognized baseline options "
                                 r"\['use_decaying_avg'\]"),
    ({"baseline_beta": 1.5, "use_decaying_avg_baseline": True}, r"'z_0'.*baseline_beta"),
    ({"nn_baseline": nn.Linear(1, 1), "nn_baseline_input": torch.ones(1),
      "baseline_value": torch.zeros(())}, r"'z_0'.*baseline_value and nn_baseline"),
    ({"nn_baseline": nn.Linear(1, 1)}, r"'z_0'.*nn_baseline_input"),
    ({"baseline_value": torch.zeros(3)}, r"site 'z_0': the baseline has shape \(3,\)"),
])
def test_bad_options_are_errors_that_name_the_site(options, match):
    problem, guide = _chain_with(lambda name: options if name == "z_0" else {})
    with pytest.raises(ValueError, match=match):
        JensenELBO(max_plate_nesting=0).differentiable_loss(problem.model, guide,
                                                            *problem.args)


def test_options_of_reparameterized_sites_are_ignored_as_pyro_does():
    def model():
        pyro.sample("x", dist.Normal(pyro.sample("u", dist.Normal(0.0, 1.0)), 1.0),
                    obs=torch.tensor(0.5))

    def guide():
        pyro.sample("u", dist.Normal(pyro.param("m", torch.tensor(0.0)), 1.0),
                    infer={"baseline": {"use_decaying_avg_baseline": True}})

    elbo = JensenELBO()
    elbo.differentiable_loss(model, guide)
    assert elbo.carried_state() == {} and elbo.state_dict() == {}


# ---------------------------------------------------------------------------- state
def test_checkpoint_restores_the_averages():
    problem, guide = _chain_with(lambda name: {"use_decaying_avg_baseline": True})
    elbo = AnalyticKLELBO(max_plate_nesting=0)
    for seed in range(3):
        pyro.set_rng_seed(seed)
        elbo.differentiable_loss(problem.model, guide, *problem.args)
    state = elbo.state_dict()
    saved = state[KEY]
    assert state["step_count"] == 3 and saved["kind"] == "site_baselines"
    assert set(saved["slots"]) == {(name, "average") for name in SITES}
    fresh = AnalyticKLELBO(max_plate_nesting=0)
    fresh.load_state_dict(copy.deepcopy(state))
    for loss in (elbo, fresh):
        pyro.set_rng_seed(7)
        value = loss.differentiable_loss(problem.model, guide, *problem.args)
        grad = torch.autograd.grad(value, [problem.unconstrained_params()["q_logits"]])[0]
        if loss is elbo:
            expected = grad
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    JensenELBO().load_state_dict({KEY: saved})  # any loss takes them


@pytest.mark.usefixtures("traced_only")
def test_compiled_step_carries_the_averages_as_svi_does():
    """CompiledSVI's step from a saved state equals pyro.infer.SVI's (parameters, a learned
    baseline value and the averages), the averages entering and leaving the graph."""
    problem = binary_chain(num_sites=3, dtype=D)
    problem.set_params()

    def options(name):
        if name == "z_1":
            return {"baseline_value": pyro.param("b", lambda: torch.tensor(-1.0, dtype=D)),
                    "use_decaying_avg_baseline": True}
        return {"use_decaying_avg_baseline": True}

    guide = _with(options)(problem.guide)
    optim = lambda: pyro.optim.Adam({"lr": 0.05})  # noqa: E731
    loss = JensenELBO(max_plate_nesting=0)
    compiled = CompiledSVI(problem.model, guide, optim(), loss)
    pyro.set_rng_seed(0)
    compiled.step(*problem.args)
    params = {n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()}
    checkpoint, optimizer_state = loss.state_dict(), copy.deepcopy(compiled.get_state())
    pyro.set_rng_seed(1)
    compiled.step(*problem.args)
    after = ({n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()},
             _averages(loss))
    with torch.no_grad():
        for name, leaf in pyro.get_param_store().named_parameters():
            leaf.copy_(params[name])
    eager_loss = JensenELBO(max_plate_nesting=0)
    eager_loss.load_state_dict(checkpoint)
    svi = SVI(problem.model, guide, optim(), eager_loss)
    svi.optim.set_state(optimizer_state)
    pyro.set_rng_seed(1)
    svi.step(*problem.args)
    for name, leaf in pyro.get_param_store().named_parameters():
        torch.testing.assert_close(after[0][name], leaf.detach(), rtol=1e-9, atol=1e-10)
    assert not torch.equal(after[0]["b"], params["b"])  # the value learned
    for key, value in _averages(eager_loss).items():
        torch.testing.assert_close(after[1][key], value, rtol=1e-9, atol=1e-10)
    assert not torch.equal(after[1][("z_0", "average")],
                           checkpoint[KEY]["slots"][("z_0", "average")])


def test_the_importance_weighted_bound_says_it_ignores_them():
    """Its log-mean-exp is not a sum of terms; VIMCO's signal centres the log-weights."""
    from pyro_elbo_ext import ImportanceWeightedELBO

    problem, guide = _chain_with(lambda name: {"use_decaying_avg_baseline": True})
    with pytest.warns(UserWarning, match="does not use Pyro's per-site baselines.*'z_0'"):
        ImportanceWeightedELBO(num_particles=2, max_plate_nesting=0).loss(
            problem.model, guide, *problem.args)
