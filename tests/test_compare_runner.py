"""pyro_elbo_ext.compare's draws, reference, summary and runner, measured on problems: common
random numbers, bias against exact and estimated references, the Normal-Normal ranking at the
posterior, several parameter points in one run, and the particles each estimator used."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch

from pyro_elbo_ext.compare import (
    compare_at_points,
    compare_estimators,
    draw_estimates,
    get_estimator,
)
from pyro_elbo_ext.problems import get_problem
from tests.mc import K_SE

F64 = {"dtype": torch.float64}


def test_common_random_numbers_across_estimators():
    """jensen_sampled and Trace_ELBO are the same estimator: under the shared seeds their draws
    coincide to rounding, and jensen_path sees the same samples (same L draws)."""
    problem = get_problem("normal_normal", **F64)
    a = draw_estimates(problem, "jensen_sampled", 20, seed=5)
    b = draw_estimates(problem, "trace_elbo", 20, seed=5)
    c = draw_estimates(problem, "jensen_path", 20, seed=5)
    np.testing.assert_allclose(a.values, b.values, rtol=1e-12)
    np.testing.assert_allclose(a.values, c.values, rtol=1e-12)
    for name in a.grads:
        np.testing.assert_allclose(a.grads[name], b.grads[name], rtol=1e-9, atol=1e-12)
    d = draw_estimates(problem, "trace_elbo", 20, seed=6)
    assert not np.allclose(a.values, d.values)


def test_bias_is_measured_against_the_exact_gradient_on_tiny_discrete():
    problem = get_problem("tiny_discrete", **F64)
    comparison = compare_estimators(problem, ["trace_elbo"], num_repeats=120)
    assert comparison.reference.kind == "exact"
    problem.set_params()
    exact_elbo, exact_grad = problem.exact_elbo_and_grad()
    for name, grad in exact_grad.items():
        np.testing.assert_allclose(comparison.reference.grads[name], grad.numpy(), rtol=1e-12)
    trace = comparison.record("trace_elbo")
    enum = compare_estimators(problem, ["traceenum_elbo"], num_repeats=3).record("traceenum_elbo")
    assert trace.reference == "exact" and trace.exact_elbo == pytest.approx(exact_elbo)
    assert trace.bias_max_z <= K_SE  # unbiased within K_SE (22 elements, fixed seed)
    assert abs(trace.elbo_mean - exact_elbo) <= K_SE * trace.elbo_se
    # enumeration is exact: zero variance, and its gradient is the exact one
    assert enum.grad_var_total < 1e-20
    for p in enum.params:
        np.testing.assert_allclose(p.grad_mean, p.reference, rtol=1e-8, atol=1e-10)
    assert enum.elbo_mean == pytest.approx(exact_elbo, rel=1e-10)


def test_a_biased_gradient_is_flagged():
    """RenyiELBO(alpha=0.5) estimates a different objective: its bias against dL shows up."""
    problem = get_problem("normal_normal", **F64)
    comparison = compare_estimators(problem, ["renyi_elbo", "trace_elbo"], num_repeats=200)
    assert comparison.record("renyi_elbo").bias_max_z > K_SE
    assert comparison.record("renyi_elbo").objective != "L"
    assert comparison.record("trace_elbo").bias_max_z <= K_SE


@pytest.mark.parametrize("at", ["posterior", "init"])
def test_normal_normal_table_agrees_with_the_closed_form(at):
    problem = get_problem("normal_normal", **F64)
    names = ["jensen_path", "trace_elbo", "jensen_analytic"]
    comparison = compare_estimators(problem, names, num_repeats=200, at=at)
    summary = comparison.summary()
    problem.set_params(problem.posterior_params if at == "posterior" else None)
    exact = float(problem.exact_elbo({n: torch.as_tensor(v) for n, v in
                                      _constrained(problem).items()}))
    for _, row in summary.iterrows():
        assert row["exact_elbo"] == pytest.approx(exact, rel=1e-12)
        assert abs(row["elbo_mean"] - exact) <= K_SE * row["elbo_se"] + 1e-9 * (1 + abs(exact))
        assert row["log_evidence"] == pytest.approx(problem.log_evidence)
        assert row["gap"] == pytest.approx(problem.log_evidence - row["elbo_mean"])
        assert row["bias_max_z"] <= K_SE
        assert row["time_per_eval_s"] > 0


def _constrained(problem):
    return {n: pyro.param(n).detach() for n in problem.init_params}


def test_path_estimator_ranks_far_below_trace_elbo_at_the_posterior():
    problem = get_problem("normal_normal", **F64)
    comparison = compare_estimators(problem, ["trace_elbo", "jensen_path"], num_repeats=200,
                                    at="posterior")
    path, trace = comparison.record("jensen_path"), comparison.record("trace_elbo")
    assert trace.grad_var_total > 1.0  # Trace_ELBO's gradient is noisy there ...
    assert trace.grad_var_total - K_SE * trace.grad_var_total_se > 0
    assert path.grad_var_total < 1e-20 * trace.grad_var_total  # ... the path gradient is 0
    order = comparison.summary().sort_values("grad_var_total")["estimator"].tolist()
    assert order[0] == "jensen_path"
    assert path.efficiency > 1e12 * trace.efficiency


def test_analytic_kl_variance_no_higher_than_trace_elbo_at_the_posterior():
    problem = get_problem("normal_normal", **F64)
    comparison = compare_estimators(problem, ["trace_elbo", "analytic_kl"], num_repeats=400,
                                    at="posterior")
    kl, trace = comparison.record("analytic_kl"), comparison.record("trace_elbo")
    allowance = K_SE * math.hypot(kl.grad_var_total_se, trace.grad_var_total_se)
    assert kl.grad_var_total <= trace.grad_var_total + allowance
    assert abs(kl.elbo_mean - kl.exact_elbo) <= K_SE * kl.elbo_se


def test_vae_digits_problem_and_estimated_reference():
    problem = get_problem("vae_digits", num_data=10, hidden_dim=8)
    (x,) = problem.args
    assert x.shape == (10, 64) and set(x.unique().tolist()) <= {0.0, 1.0}
    assert any(n.startswith("encoder$$$") for n in problem.init_params)
    assert any(n.startswith("decoder$$$") for n in problem.init_params)
    assert problem.exact_elbo is None and problem.log_evidence is None
    comparison = compare_estimators(problem, ["jensen_analytic", "trace_elbo"], num_repeats=5,
                                    reference_repeats=20)
    assert comparison.reference.kind == "estimate"
    assert comparison.reference.label == "estimate: jensen_analytic x 20"
    rec = comparison.record("trace_elbo")
    assert rec.reference.startswith("estimate") and math.isfinite(rec.elbo_mean)
    # the encoder's and decoder's weights are the param store's leaves: they get gradients
    assert all(np.any(p.grad_mean != 0) for p in rec.params)


def test_logistic_breast_cancer_problem():
    problem = get_problem("logistic_breast_cancer", num_data=100)
    x, y = problem.args
    assert x.shape == (100, 31) and y.shape == (100,)
    full_x, _ = get_problem("logistic_breast_cancer").args
    assert torch.allclose(full_x[:, 0], torch.ones(()))
    assert torch.allclose(full_x[:, 1:].mean(0), torch.zeros(()), atol=1e-5)
    assert torch.allclose(full_x[:, 1:].std(0), torch.ones(()), atol=1e-4)
    comparison = compare_estimators(problem, ["jensen_path", "tracemeanfield_elbo"],
                                    num_repeats=5, reference_repeats=20)
    assert comparison.reference.kind == "estimate"
    assert len(comparison.tidy()) == 2 * 62


def test_hard_attention_estimators_against_the_exact_bound():
    problem = get_problem("random_attention", **F64)
    assert not get_estimator("trace_elbo").applies_to(problem)[0]
    comparison = compare_estimators(
        problem, ["hard_attention_enum", "hard_attention_reinforce_ma"], num_repeats=100)
    assert comparison.reference.kind == "exact"
    enum = comparison.record("hard_attention_enum")
    reinforce = comparison.record("hard_attention_reinforce_ma")
    assert enum.grad_var_total < 1e-20 and enum.bias_max_z <= K_SE
    assert enum.elbo_mean == pytest.approx(enum.exact_elbo, rel=1e-10)
    assert reinforce.grad_var_total > 0 and reinforce.bias_max_z <= K_SE


def test_cluttered_digits_gradients_are_measured():
    """The networks' weights are the param store's leaves: compare sees every one of them."""
    problem = get_problem("cluttered_digits", num_train=64, num_test=16)
    names = {name for name in problem.init_params}
    assert {n.split("$$$")[0] for n in names} == {"attention", "classifier"}
    comparison = compare_estimators(
        problem, ["hard_attention_enum", "hard_attention_reinforce_loo"], num_repeats=30)
    enum = comparison.record("hard_attention_enum")
    loo = comparison.record("hard_attention_reinforce_loo")
    assert {p.name for p in enum.params} == names == {p.name for p in loo.params}
    # the batch is the whole training set: enumeration is exact, leave-one-out is not
    assert enum.grad_var_total < 1e-9 * loo.grad_var_total
    assert loo.grad_var_total > 0 and math.isfinite(loo.bias_max_z)


def test_records_say_how_many_particles_each_estimator_used():
    """renyi_elbo and hard_attention_reinforce_loo need K >= 2 and use 2 when asked for 1."""
    normal = get_problem("normal_normal", **F64)
    comparison = compare_estimators(normal, ["renyi_elbo", "trace_elbo"], num_repeats=3)
    assert comparison.record("renyi_elbo").num_particles == 2
    assert comparison.record("trace_elbo").num_particles == 1
    attention = get_problem("random_attention", **F64)
    comparison = compare_estimators(attention, ["hard_attention_reinforce_loo",
                                                "hard_attention_reinforce"], num_repeats=3)
    assert comparison.record("hard_attention_reinforce_loo").num_particles == 2
    assert comparison.record("hard_attention_reinforce").num_particles == 1
    assert list(comparison.summary()["num_particles"]) == [2, 1]
    # asked for more than the minimum, they use what was asked
    assert compare_estimators(normal, ["renyi_elbo"], num_repeats=3,
                              num_particles=3).records[0].num_particles == 3


def test_an_estimator_named_twice_gives_an_error_not_two_rows():
    problem = get_problem("normal_normal", **F64)
    with pytest.raises(ValueError, match="named more than once"):
        compare_estimators(problem, ["jensen_path", "jensen_path"], num_repeats=3)


def test_compare_at_points_measures_each_point_against_its_own_reference():
    problem = get_problem("normal_normal", **F64)
    comparison = compare_at_points(problem, ["jensen_path", "trace_elbo"], ("init", "posterior"),
                                   num_repeats=20)
    assert comparison.points == ["init", "posterior"]
    assert list(comparison.summary()["at"]) == ["init", "init", "posterior", "posterior"]
    for at, values in (("init", None), ("posterior", problem.posterior_params)):
        problem.set_params(values)
        elbo, grads = problem.exact_elbo_and_grad()
        reference = comparison.references[at]
        assert reference.kind == "exact" and reference.elbo == pytest.approx(elbo, rel=1e-12)
        for name, grad in grads.items():
            np.testing.assert_allclose(reference.grads[name], grad.numpy(), rtol=1e-12)
        assert comparison.record("trace_elbo", at).exact_elbo == pytest.approx(elbo, rel=1e-12)
    # the same seeds at both points, so the init rows equal a run at init alone
    alone = compare_estimators(problem, ["trace_elbo"], num_repeats=20, at="init")
    assert comparison.record("trace_elbo", "init").elbo_mean == alone.records[0].elbo_mean
    path, trace = (comparison.record(n, "posterior") for n in ("jensen_path", "trace_elbo"))
    assert path.grad_var_total < 1e-20 * trace.grad_var_total
    with pytest.raises(ValueError, match="each parameter point must be given once"):
        compare_at_points(problem, ["trace_elbo"], ("init", "init"), num_repeats=3)


def test_an_unbiased_estimator_at_r_10_stays_below_the_stated_threshold():
    """Trace_ELBO at the posterior of normal_normal, R = 10, 100 seeds: the worst |bias|/SE
    exceeds the stated 99% threshold, in a run not flagged as having too few draws (Cochran),
    in about 1% of runs (at most 1% + K_SE binomial SEs).  The normal quantile printed before
    (2.81 for two elements) was exceeded in about 11%."""
    problem = get_problem("normal_normal", **F64)
    runs = [compare_estimators(problem, ["trace_elbo"], num_repeats=10, seed=1000 * s,
                               at="posterior").records[0] for s in range(100)]
    over = [r.bias_max_z > r.bias_z_threshold and not r.too_few_repeats for r in runs]
    assert np.mean(over) <= 0.01 + K_SE * math.sqrt(0.01 * 0.99 / len(runs))
    assert all(r.bias_z_threshold > 3.5 for r in runs)  # t with 9 degrees of freedom
    assert np.mean([r.too_few_repeats for r in runs]) > 0.5  # skewed draws: R = 10 is too few


# ---------------------------------------------------------------- a user's pyro.module problem
def _module_problem(update_module_params: bool, list_module_params: bool = True):
    """A user's own Problem: a linear decoder registered with ``pyro.module`` (Pyro's default
    ``update_module_params=False`` unless asked), local latents with a Normal guide."""
    from pyro.params import param_with_module_name

    from pyro_elbo_ext.problems import Problem

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, **F64)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = torch.nn.Linear(2, 3).double()

    def model(data):
        decoder = pyro.module("decoder", net, update_module_params=update_module_params)
        with pyro.plate("data", data.shape[0]):
            z = pyro.sample("z", pyro.distributions.Normal(torch.zeros(2, **F64), 1.0)
                            .to_event(1))
            pyro.sample("obs", pyro.distributions.Normal(decoder(z), 1.0).to_event(1), obs=data)

    def guide(data):
        loc = pyro.param("loc", torch.zeros(data.shape[0], 2, **F64))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("z", pyro.distributions.Normal(loc, 0.5).to_event(1))

    init = {"loc": 0.1 * torch.ones(12, 2, **F64)}
    if list_module_params:
        init.update({param_with_module_name("decoder", n): p.detach().clone()
                     for n, p in net.named_parameters()})
    return Problem("user_module", "a user's pyro.module model", model, guide, args=(x,),
                   init_params=init), net, model, guide


@pytest.mark.parametrize("update_module_params", [False, True])
def test_module_parameters_are_measured_as_pyro_computes_their_gradient(update_module_params):
    """Each draw of the module's gradient is Pyro's own Trace_ELBO gradient of the module's
    parameters in ordinary use (a fresh param store, the same seed), and the comparison
    reports their variance (not 0 and an infinite efficiency) and leaves the module as it was."""
    problem, net, model, guide = _module_problem(update_module_params)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    draws = draw_estimates(problem, "trace_elbo", 4, seed=7)
    for r in range(4):
        pyro.clear_param_store()
        pyro.param("loc", problem.init_params["loc"].clone())
        with torch.no_grad():  # the problem's starting values, as the user's module had them
            for n, p in net.named_parameters():
                p.copy_(before[n])
                p.grad = None
        pyro.set_rng_seed(7 + r)
        pyro.infer.Trace_ELBO().loss_and_grads(model, guide, *problem.args)
        for n, p in net.named_parameters():
            np.testing.assert_allclose(draws.grads[f"decoder$$${n}"][r], -p.grad.numpy(),
                                       rtol=1e-12)
    comparison = compare_estimators(problem, ["trace_elbo", "jensen_analytic"], num_repeats=20,
                                    reference="none", progress=False)
    tidy = comparison.tidy()
    module_var = tidy[tidy["parameter"].str.startswith("decoder")].groupby("estimator")[
        "grad_var"].sum()
    assert (module_var > 1.0).all(), module_var
    assert np.isfinite(comparison.summary()["efficiency"]).all()
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), before[n])


def test_module_parameters_missing_from_init_params_are_refused():
    problem, *_ = _module_problem(False, list_module_params=False)
    with pytest.raises(ValueError, match=r"reads the parameter\(s\) \['decoder\$\$\$bias', "
                                         r"'decoder\$\$\$weight'\], which init_params does not"):
        compare_estimators(problem, ["trace_elbo"], num_repeats=3, reference="none",
                           progress=False)
