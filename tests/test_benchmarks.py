"""The benchmarks: the speed benchmark's smoke run and report (no timings), and the bound.

The bound (``benchmarks/_bound.py``'s LowerBoundELBO) only means something if it does the real
work of a loss: its value and gradient are checked draw for draw (same seed, same draws)
against Pyro's ``Trace_ELBO`` and, for a model-drawn attention site, ``HardAttentionELBO``.
"""

from __future__ import annotations

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from benchmarks import speed
from benchmarks._bound import LowerBoundELBO
from benchmarks._common import PAIRINGS
from pyro_elbo_ext.elbos.hard_attention import HardAttentionELBO, empty_guide
from pyro_elbo_ext.elbos.jensen import JensenELBO
from tests.models import discrete_guide, discrete_model

DATA = torch.tensor([0.4, 1.3, -0.2, 2.1, 0.9])


def normal_model(data):
    z = pyro.sample("z", dist.Normal(data.new_tensor(0.0), 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(z, 1.0), obs=data)


def normal_guide(data):
    loc = pyro.param("loc", lambda: data.new_tensor(0.3))
    scale = pyro.param("scale", lambda: data.new_tensor(0.7), constraint=constraints.positive)
    pyro.sample("z", dist.Normal(loc, scale))


def attention_model(y):
    """The model draws the attention location itself (the guide samples nothing)."""
    logits = pyro.param("attention", lambda: torch.tensor([0.1, -0.4, 0.3]))
    means = pyro.param("means", lambda: torch.tensor([-1.0, 0.0, 2.0]))
    where = pyro.sample("where", dist.Categorical(logits=logits))
    pyro.sample("y", dist.Normal(means[where], 1.0), obs=y)


def _value_and_grads(elbo, model, guide, *args, seed=1, via="differentiable_loss"):
    """-L and its gradients per parameter name, after seeding the draws.

    ``via="differentiable_loss"``: the tensor's value and ``autograd.grad``; ``"loss_and_grads"``:
    the float it returns and the gradients it leaves in ``.grad``.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    with pyro.poutine.trace(param_only=True) as params:
        loss = getattr(elbo, via)(model, guide, *args)
    names = list(params.trace.nodes)
    leaves = [params.trace.nodes[n]["value"].unconstrained() for n in names]
    if via == "loss_and_grads":
        return loss, {n: leaf.grad for n, leaf in zip(names, leaves)}
    return loss.item(), dict(zip(names, torch.autograd.grad(loss, leaves)))


PARTICLES = [
    {},
    {"num_particles": 3},
    {"num_particles": 3, "vectorize_particles": True, "max_plate_nesting": 1},
    {"num_particles": 4, "vectorize_particles": True},  # max_plate_nesting guessed
]


def _assert_same(ours, theirs):
    (value, grads), (value_ref, grads_ref) = ours, theirs
    assert value == pytest.approx(value_ref, rel=1e-6, abs=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ref[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("kwargs", PARTICLES)
@pytest.mark.parametrize("model,guide", [(normal_model, normal_guide),
                                         (discrete_model, discrete_guide)],
                         ids=["normal_normal", "discrete_guide_site"])
def test_bound_equals_trace_elbo_draw_for_draw(model, guide, kwargs):
    ours = _value_and_grads(LowerBoundELBO(**kwargs), model, guide, DATA)
    theirs = _value_and_grads(pyro.infer.Trace_ELBO(**kwargs), model, guide, DATA)
    assert all(g.abs().sum() > 0 for g in ours[1].values())
    _assert_same(ours, theirs)


@pytest.mark.parametrize("kwargs", PARTICLES)
@pytest.mark.parametrize("model,guide", [(normal_model, normal_guide),
                                         (discrete_model, discrete_guide)],
                         ids=["normal_normal", "discrete_guide_site"])
def test_analytic_bound_equals_jensen_elbo_draw_for_draw(model, guide, kwargs):
    """entropy="analytic": the closed-form entropy bound is JensenELBO's default estimator
    (its value; its gradient where no site has a score term: JensenELBO's score costs are
    Rao-Blackwellized by the data flow and meet a discrete site's own entropy as -log q, the
    bound's are the whole L)."""
    ours = _value_and_grads(LowerBoundELBO(entropy="analytic", **kwargs), model, guide, DATA)
    theirs = _value_and_grads(JensenELBO(**kwargs), model, guide, DATA)
    if model is discrete_model:
        assert ours[0] == pytest.approx(theirs[0], rel=1e-6, abs=1e-6)
    else:
        _assert_same(ours, theirs)


@pytest.mark.parametrize("kwargs", PARTICLES[:3])
@pytest.mark.parametrize("model,guide", [(normal_model, normal_guide),
                                         (discrete_model, discrete_guide)],
                         ids=["normal_normal", "discrete_guide_site"])
def test_bound_loss_and_grads_equal_trace_elbo(model, guide, kwargs):
    ours = _value_and_grads(LowerBoundELBO(**kwargs), model, guide, DATA, via="loss_and_grads")
    theirs = _value_and_grads(pyro.infer.Trace_ELBO(**kwargs), model, guide, DATA,
                              via="loss_and_grads")
    _assert_same(ours, theirs)


@pytest.mark.parametrize("kwargs", [
    {}, {"num_particles": 3},
    {"num_particles": 4, "vectorize_particles": True, "max_plate_nesting": 0},
])
def test_bound_equals_reinforce_on_a_model_drawn_site(kwargs):
    """A latent the guide does not sample: no term of its own, a score term on log p(l)."""
    y = torch.tensor(1.3)
    ours = _value_and_grads(LowerBoundELBO(**kwargs), attention_model, empty_guide, y)
    theirs = _value_and_grads(HardAttentionELBO(estimator="reinforce", **kwargs),
                              attention_model, empty_guide, y)
    assert ours[1]["attention"].abs().sum() > 0  # the score term reaches the attention
    _assert_same(ours, theirs)


def test_bound_loss_is_minus_the_elbo_estimate():
    pyro.set_rng_seed(3)
    loss = LowerBoundELBO().loss(normal_model, normal_guide, DATA)
    pyro.set_rng_seed(3)
    assert loss == pytest.approx(pyro.infer.Trace_ELBO().loss(normal_model, normal_guide, DATA))


def test_speed_quick_writes_files(tmp_path):
    result = speed.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "speed.json").is_file()
    report = (tmp_path / "speed.md").read_text()
    assert "JensenELBO / Trace_ELBO" in report
    for column in ("bound / Pyro", "eager / Pyro, both GroupedOptim",
                   "bound / Pyro, both GroupedOptim", "jit + GroupedOptim / floor"):
        assert f"| {column} |" in report
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["machine"]["torch_num_threads"] == result["machine"]["torch_num_threads"]
    group = saved["groups"][0]
    timed = {c["key"] for c in group["contestants"] if c["status"] == "ok"}
    assert {"JensenELBO", "Trace_ELBO", "floor:jensen", "bound", "bound grouped",
            "JensenELBO grouped", "JensenELBO jit grouped", "Trace_ELBO grouped"} <= timed
    ratios = {r["comparison"]: r for r in group["ratios"]}
    for name in ("bound / Trace_ELBO", "JensenELBO grouped / Trace_ELBO grouped",
                 "bound grouped / Trace_ELBO grouped", "JensenELBO jit grouped / floor"):
        assert ratios[name]["status"] == "ok" and math.isfinite(ratios[name]["ratio"])
    assert ratios["JensenELBO grouped / Trace_ELBO grouped"]["target"] == 0.8
    assert ratios["JensenELBO jit grouped / floor"]["target"] == 1.2
    # the compiled path (issue 16): the whole step compiled, and jit=True against TorchScript
    for name in ("JensenELBO CompiledSVI / Trace_ELBO", "JensenELBO jit / TorchScript jit"):
        assert ratios[name]["status"] == "ok" and math.isfinite(ratios[name]["ratio"])
    assert ratios["JensenELBO CompiledSVI / NumPyro"]["target"] == 1.0
    assert "| CompiledSVI / NumPyro |" in report


def _fake(key: str, ms: float) -> speed.Contestant:
    c = speed.Contestant(key, key, step=lambda: 0.0)
    c.samples = [ms * 1e-3] * 3
    return c


def test_misses_say_whether_the_bound_is_above_the_target():
    """Ratios and the notes of the "Targets not met" section, on made-up times."""
    enum, reinforce = (p for p in PAIRINGS if p.problems == ("hard_attention",))
    times = {  # ms
        enum.ours: 7.0, enum.pyro: 10.0, f"{enum.ours} grouped": 6.0,
        f"{enum.pyro} grouped": 9.0, f"{enum.ours} jit grouped": 5.0, "floor:enum": 4.0,
        reinforce.ours: 4.0, reinforce.pyro: 10.0,  # 0.4 > 0.3, and the bound is at 0.35
        f"{reinforce.ours} grouped": 3.2, f"{reinforce.pyro} grouped": 10.0,  # 0.32, bound 0.2
        f"{reinforce.ours} jit grouped": 6.0, "floor:reinforce": 4.0,  # 1.5 > 1.2
        "bound": 3.5, "bound grouped": 2.0,
    }
    contestants = [_fake(k, v) for k, v in times.items()]
    ratios = speed._group_ratios(contestants, [enum, reinforce])
    by_name = {r["comparison"]: r for r in ratios}
    assert by_name[f"bound / {enum.pyro}"]["status"] == "n/a (enumeration)"
    assert by_name[f"bound / {reinforce.pyro}"]["ratio"] == pytest.approx(0.35)
    assert by_name[f"{reinforce.ours} / {reinforce.pyro}"]["met"] is False
    group = {"problem": "hard_attention", "num_particles": 1, "validation": False,
             "ratios": ratios}
    notes = {r["comparison"]: speed._bound_note(group, r) for r in ratios if r["met"] is False}
    assert "the bound itself is above the target" in notes[f"{reinforce.ours} / {reinforce.pyro}"]
    assert "within the target" in notes[f"{reinforce.ours} grouped / {reinforce.pyro} grouped"]
    assert "does not limit a compiled step" in notes[f"{reinforce.ours} jit grouped / floor"]
    assert "n/a (enumeration)" in notes[f"{enum.ours} jit grouped / floor"]
    table = speed.ratio_table([group])
    assert "n/a (enumeration)" in table


@pytest.mark.parametrize("ours_ms, where", [(9.0, "at or below the bound"),
                                            (9.8, "1.03x the bound's ratio")])
def test_a_miss_at_the_bound_says_how_close_our_loss_is(ours_ms, where):
    jensen = PAIRINGS[0]
    times = {jensen.ours: ours_ms, jensen.pyro: 10.0, "bound": 9.5, "floor:jensen": 5.0}
    ratios = speed._group_ratios([_fake(k, v) for k, v in times.items()], [jensen])
    group = {"ratios": ratios}
    miss = next(r for r in ratios if r["comparison"] == f"{jensen.ours} / {jensen.pyro}")
    assert miss["met"] is False
    note = speed._bound_note(group, miss)
    assert "the bound itself is above the target" in note and where in note


def test_decompose_step_writes_its_table(tmp_path):
    """Smoke test of ``python -m benchmarks.decompose_step`` (no timing assertions)."""
    from benchmarks import decompose_step

    text = decompose_step.main(["--problems", "normal_normal", "--calls", "2",
                                "--out", str(tmp_path)])
    assert (tmp_path / "decompose_step.md").read_text() == text
    header = next(line for line in text.splitlines() if line.startswith("| problem"))
    assert "svi.step (jit, GroupedOptim)" in header and "step gap, GroupedOptim" in header
    assert text.count("| normal_normal |") == 1


def test_discrete_variance_writes_its_table(tmp_path):
    """Smoke test of ``python -m benchmarks.discrete_variance`` on one structure: the table
    is written, and JensenELBO(entropy="sampled") is TraceGraph_ELBO's estimator (ratio 1,
    the draws being paired), baselines or not."""
    import json

    from benchmarks import discrete_variance

    out = tmp_path / "discrete_variance"
    discrete_variance.main(["--structures", "independent_bits", "--draws", "5", "--warmup",
                            "2", "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    sampled = [r for r in rows if r["estimator"] == "JensenELBO(sampled)"]
    assert len(sampled) == 2 and all(abs(r["ratio_vs_tracegraph"] - 1) < 1e-9 for r in sampled)
    assert "| independent_bits | yes | AnalyticKLELBO |" in out.with_suffix(".md").read_text()


def test_discrete_toys_quick_writes_its_tables(tmp_path):
    """Smoke test of ``python -m benchmarks.discrete_toys --quick``: every estimator has a row
    on every toy, the exact rows of the unbiased estimators say so, and the plot is linked."""
    from benchmarks import discrete_toys

    discrete_toys.main(["--quick", "--out", str(tmp_path)])
    text = (tmp_path / "discrete_toys_quick.md").read_text()
    for toy in ("rebar_t0.499", "rebar_t0.45", "three_site", "categorical"):
        for estimator in ("reinforce", "loo", "gumbel_st"):
            assert f"| {toy} |" in text and f"| {estimator} |" in text
    # by hand: at a = 0, f(b) = (b - 0.45)^2, two samples; leave-one-out's estimate is 0.05
    # when the samples differ (probability 1/2) and 0 otherwise: variance 0.000625
    assert "| rebar_t0.45 | a = 0 | 2 | loo | 2 | 0.000625 | exact |" in text
    assert (tmp_path / "discrete_toys_quick.png").exists()


def test_discrete_digits_quick_scores_each_contestant(tmp_path):
    """Smoke test of ``python -m benchmarks.discrete_digits --quick``: Pyro's TraceGraph_ELBO
    and two of our estimators trained and scored by the same code (finite held-out bounds,
    L_K >= L up to noise), one table row each."""
    import json
    import math

    from benchmarks import discrete_digits

    discrete_digits.main(["--quick", "--contestants", "TraceGraph_ELBO", "loo", "disarm",
                          "--out", str(tmp_path)])
    result = json.loads((tmp_path / "discrete_digits_quick.json").read_text())
    assert [r["name"] for r in result["runs"]] == ["TraceGraph_ELBO", "loo", "disarm"]
    for run in result["runs"]:
        assert math.isfinite(run["test_L"]) and run["test_L_K"] > run["test_L"] - 0.5
    assert (tmp_path / "discrete_digits_quick.md").read_text().count("\n| ") == 4


def test_exact_autoguide_seeds_uses_the_models_evidence():
    """``benchmarks.exact_autoguide_seeds``' exact loss is -log p(obs) of its tree model:
    obs ~ N(0, [[3, 1], [1, 3]]) (x, y_i and the noise each add 1 to a variance; x is shared)."""
    from benchmarks.exact_autoguide_seeds import exact_loss

    data = torch.tensor([0.7, -1.3], dtype=torch.float64)
    covariance = torch.tensor([[3.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    expected = -torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                       covariance).log_prob(data)
    assert exact_loss(data) == pytest.approx(float(expected), rel=1e-12)
