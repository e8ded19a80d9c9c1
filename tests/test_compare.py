"""pyro_elbo_ext.compare: statistics against numpy and known moments, exact-gradient bias,
the Normal-Normal ranking at the posterior, records, training runs and plots."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyro_elbo_ext.compare import (
    ESTIMATORS,
    IncompatibleEstimatorError,
    UnknownEstimatorError,
    UnknownProblemError,
    build_problem,
    compare_estimators,
    draw_estimates,
    fit_estimators,
    get_estimator,
)
from pyro_elbo_ext.compare.plots import plot_bound, plot_gradient_variance, plot_learning_curves
from pyro_elbo_ext.compare.statistics import (
    efficiency,
    mean_and_se,
    parameter_statistics,
    signal_to_noise,
    standardized_bias,
    total_variance_and_se,
    variance_and_se,
)
from tests.mc import K_SE

F64 = {"dtype": torch.float64}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is fastest and immune to other processes' load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- pure statistics
def test_statistics_match_numpy_on_synthetic_draws():
    rng = np.random.default_rng(0)
    mu, sd, r = np.array([1.0, -2.0, 0.5]), np.array([0.5, 2.0, 3.0]), 400
    draws = mu + sd * rng.standard_normal((r, 3))

    mean, se = mean_and_se(draws)
    np.testing.assert_allclose(mean, draws.mean(0), rtol=1e-12)
    np.testing.assert_allclose(se, draws.std(0, ddof=1) / np.sqrt(r), rtol=1e-12)
    var, var_se = variance_and_se(draws)
    np.testing.assert_allclose(var, draws.var(0, ddof=1), rtol=1e-12)
    total, total_se = total_variance_and_se(draws)
    np.testing.assert_allclose(total, np.trace(np.cov(draws, rowvar=False)), rtol=1e-12)
    # and they estimate the known moments within K_SE of their own standard errors
    assert np.all(np.abs(mean - mu) <= K_SE * se)
    assert np.all(np.abs(var - sd**2) <= K_SE * var_se)
    assert abs(total - np.sum(sd**2)) <= K_SE * total_se
    # Gaussian draws: se(s^2) ~ s^2 sqrt(2 / R)
    np.testing.assert_allclose(var_se, var * np.sqrt(2 / r), rtol=0.2)


def test_variance_standard_errors_are_calibrated():
    """Across 2000 independent experiments the spread of the variance estimates matches the
    standard error each experiment reports (to 10%), for one element and for the trace."""
    rng = np.random.default_rng(1)
    draws = rng.normal(0.0, [2.0, 1.0], size=(2000, 50, 2))
    var_estimates, var_ses, totals, total_ses = [], [], [], []
    for experiment in draws:
        v, s = variance_and_se(experiment[:, 0])
        var_estimates.append(v)
        var_ses.append(s)
        t, ts = total_variance_and_se(experiment)
        totals.append(t)
        total_ses.append(ts)
    assert np.std(var_estimates) == pytest.approx(np.mean(var_ses), rel=0.1)
    assert np.std(totals) == pytest.approx(np.mean(total_ses), rel=0.1)
    assert np.mean(var_estimates) == pytest.approx(4.0, rel=0.02)  # unbiased (ddof=1)
    assert np.mean(totals) == pytest.approx(5.0, rel=0.02)


def test_signal_to_noise_and_efficiency_edge_cases():
    snr = signal_to_noise(np.array([-2.0, 1.0, 0.0, 0.0]), np.array([4.0, 0.0, 0.0, 1.0]))
    assert snr[0] == pytest.approx(1.0)
    assert snr[1] == math.inf and math.isnan(snr[2]) and snr[3] == 0.0
    assert efficiency(2.0, 0.5) == pytest.approx(1.0)
    assert efficiency(0.0, 0.5) == math.inf


def test_parameter_statistics_bias_against_a_reference():
    rng = np.random.default_rng(2)
    r, true_bias = 500, np.array([[0.0, 0.3], [0.0, -0.2]])
    reference = np.array([[1.0, 2.0], [3.0, 4.0]])
    reference_se = np.full((2, 2), 0.01)
    draws = reference + true_bias + rng.standard_normal((r, 2, 2))
    rec = parameter_statistics("w", draws, reference, reference_se)
    assert rec.shape == (2, 2)
    flat = draws.reshape(r, -1)
    np.testing.assert_allclose(rec.bias, flat.mean(0) - reference.ravel(), rtol=1e-12)
    np.testing.assert_allclose(
        rec.bias_se, np.sqrt(flat.var(0, ddof=1) / r + 0.01**2), rtol=1e-12
    )
    z = np.abs(rec.bias - true_bias.ravel()) / rec.bias_se
    assert np.all(z <= K_SE)
    assert abs(rec.bias[1]) / rec.bias_se[1] > K_SE  # a real bias of 0.3 is detected


# ---------------------------------------------------------------------------- registry
def test_registry_applicability_and_errors():
    normal = build_problem("normal_normal")
    discrete = build_problem("tiny_discrete")
    ok, reason = get_estimator("traceenum_elbo").applies_to(normal)
    assert not ok and "discrete" in reason
    assert get_estimator("traceenum_elbo").applies_to(discrete)[0]
    ok, reason = get_estimator("tracemeanfield_elbo").applies_to(discrete)
    assert not ok and "reparameterizable" in reason
    assert not get_estimator("renyi_elbo").applies_to(discrete)[0]
    for name in ("jensen_analytic", "jensen_sampled", "jensen_path", "trace_elbo",
                 "tracegraph_elbo"):
        assert get_estimator(name).applies_to(normal)[0]
        assert get_estimator(name).applies_to(discrete)[0]
    with pytest.raises(IncompatibleEstimatorError, match="traceenum_elbo.*normal_normal"):
        get_estimator("traceenum_elbo").build(normal)
    with pytest.raises(UnknownEstimatorError, match="known estimators: .*trace_elbo"):
        get_estimator("no_such_estimator")
    with pytest.raises(UnknownProblemError, match="known problems: .*vae_digits"):
        build_problem("no_such_problem")
    with pytest.raises(ValueError, match="no option"):
        build_problem("normal_normal", bogus=1)


def test_optional_estimators_are_registered_when_their_modules_exist():
    pytest.importorskip("pyro_elbo_ext.elbos.analytic_kl")
    assert "analytic_kl" in ESTIMATORS
    assert get_estimator("analytic_kl").applies_to(build_problem("normal_normal"))[0]


def test_hard_attention_estimators_apply_only_to_attention_problems():
    pytest.importorskip("pyro_elbo_ext.elbos.hard_attention")
    names = [n for n in ESTIMATORS if n.startswith("hard_attention")]
    assert {"hard_attention_enum", "hard_attention_reinforce",
            "hard_attention_reinforce_ma"} <= set(names)
    normal = build_problem("normal_normal")
    for name in names:
        ok, reason = get_estimator(name).applies_to(normal)
        assert not ok and "attention" in reason


# ---------------------------------------------------------------------------- measured on problems
def test_common_random_numbers_across_estimators():
    """jensen_sampled and Trace_ELBO are the same estimator: under the shared seeds their draws
    coincide to rounding, and jensen_path sees the same samples (same L draws)."""
    problem = build_problem("normal_normal", **F64)
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
    problem = build_problem("tiny_discrete", **F64)
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
    problem = build_problem("normal_normal", **F64)
    comparison = compare_estimators(problem, ["renyi_elbo", "trace_elbo"], num_repeats=200)
    assert comparison.record("renyi_elbo").bias_max_z > K_SE
    assert comparison.record("renyi_elbo").objective != "L"
    assert comparison.record("trace_elbo").bias_max_z <= K_SE


@pytest.mark.parametrize("at", ["posterior", "init"])
def test_normal_normal_table_agrees_with_the_closed_form(at):
    problem = build_problem("normal_normal", **F64)
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
    import pyro

    return {n: pyro.param(n).detach() for n in problem.init_params}


def test_path_estimator_ranks_far_below_trace_elbo_at_the_posterior():
    problem = build_problem("normal_normal", **F64)
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
    pytest.importorskip("pyro_elbo_ext.elbos.analytic_kl")
    problem = build_problem("normal_normal", **F64)
    comparison = compare_estimators(problem, ["trace_elbo", "analytic_kl"], num_repeats=400,
                                    at="posterior")
    kl, trace = comparison.record("analytic_kl"), comparison.record("trace_elbo")
    allowance = K_SE * math.hypot(kl.grad_var_total_se, trace.grad_var_total_se)
    assert kl.grad_var_total <= trace.grad_var_total + allowance
    assert abs(kl.elbo_mean - kl.exact_elbo) <= K_SE * kl.elbo_se


# ---------------------------------------------------------------------------- records, new problems
def test_records_frames_json_and_files(tmp_path):
    problem = build_problem("normal_normal", num_data=5, **F64)
    comparison = compare_estimators(problem, ["jensen_path", "trace_elbo"], num_repeats=10,
                                    at="posterior")
    summary, tidy = comparison.summary(), comparison.tidy()
    assert list(summary["estimator"]) == ["jensen_path", "trace_elbo"]
    assert len(tidy) == 2 * 2  # two estimators x (loc, scale)
    assert set(tidy["parameter"]) == {"loc", "scale"}
    doc = json.loads(comparison.to_json())
    assert doc["reference"]["kind"] == "exact"
    assert [e["estimator"] for e in doc["estimators"]] == ["jensen_path", "trace_elbo"]
    paths = comparison.save(tmp_path)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())


def test_vae_digits_problem_and_estimated_reference():
    problem = build_problem("vae_digits", num_data=10, hidden_dim=8)
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
    problem = build_problem("logistic_breast_cancer", num_data=100)
    x, y = problem.args
    assert x.shape == (100, 31) and y.shape == (100,)
    full_x, _ = build_problem("logistic_breast_cancer").args
    assert torch.allclose(full_x[:, 0], torch.ones(()))
    assert torch.allclose(full_x[:, 1:].mean(0), torch.zeros(()), atol=1e-5)
    assert torch.allclose(full_x[:, 1:].std(0), torch.ones(()), atol=1e-4)
    comparison = compare_estimators(problem, ["jensen_path", "tracemeanfield_elbo"],
                                    num_repeats=5, reference_repeats=20)
    assert comparison.reference.kind == "estimate"
    assert len(comparison.tidy()) == 2 * 62


# ---------------------------------------------------------------------------- training and plots
def test_fit_same_seeds_same_budget_and_decomposition():
    problem = build_problem("normal_normal", **F64)
    result = fit_estimators(problem, ["jensen_sampled", "trace_elbo", "jensen_path"],
                            num_steps=60, lr=0.05, eval_every=20, progress=False)
    frame = result.frame
    assert frame.groupby("estimator").size().tolist() == [60, 60, 60]
    sampled = frame[frame.estimator == "jensen_sampled"]
    trace = frame[frame.estimator == "trace_elbo"]
    # the same estimator under the same seeds: the same trajectory, step by step
    np.testing.assert_allclose(sampled["loss"].to_numpy(), trace["loss"].to_numpy(), rtol=1e-9)
    final = result.final()
    assert list(final["step"]) == [60, 60, 60]
    problem.set_params()
    start = float(problem.exact_elbo(_constrained(problem)))
    assert (final["exact_elbo"] > start + 5).all()  # training improved L (from -45.7)
    assert (final["exact_elbo"] <= problem.log_evidence + 1e-9).all()  # still a lower bound
    evaluated = frame.dropna(subset=["eval_elbo"])
    assert len(evaluated) == 3 * 3
    terms = evaluated[[c for c in frame.columns if c.startswith("term_")]]
    assert {"term_log_likelihood", "term_log_prior", "term_entropy"} <= set(terms.columns)
    np.testing.assert_allclose(terms.sum(axis=1), evaluated["eval_elbo"], rtol=1e-9)
    assert (frame["step_time_s"] > 0).all()
    assert (trace["wall_time_s"].diff().dropna() > 0).all()


def test_plots_return_figures(tmp_path):
    problem = build_problem("normal_normal", num_data=5, **F64)
    summary = compare_estimators(problem, ["jensen_path", "trace_elbo"], num_repeats=10,
                                 at="posterior").summary()
    fit = fit_estimators(problem, ["trace_elbo"], num_steps=10, progress=False)
    figures = [plot_gradient_variance(summary), plot_bound(summary),
               plot_learning_curves(fit.frame, fit.log_evidence)]
    assert all(isinstance(f, Figure) for f in figures)
    assert [len(f.axes) for f in figures] == [3, 1, 2]
    assert figures[0].axes[0].get_xscale() == "log"
    for i, fig in enumerate(figures):
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 1000


def test_hard_attention_estimators_against_the_exact_bound():
    pytest.importorskip("pyro_elbo_ext.elbos.hard_attention")
    pytest.importorskip("pyro_elbo_ext.problems.hard_attention")
    problem = build_problem("random_attention", **F64)
    assert not get_estimator("trace_elbo").applies_to(problem)[0]
    comparison = compare_estimators(
        problem, ["hard_attention_enum", "hard_attention_reinforce_ma"], num_repeats=100)
    assert comparison.reference.kind == "exact"
    enum = comparison.record("hard_attention_enum")
    reinforce = comparison.record("hard_attention_reinforce_ma")
    assert enum.grad_var_total < 1e-20 and enum.bias_max_z <= K_SE
    assert enum.elbo_mean == pytest.approx(enum.exact_elbo, rel=1e-10)
    assert reinforce.grad_var_total > 0 and reinforce.bias_max_z <= K_SE


def test_standardized_bias_leaves_out_elements_a_stochastic_estimator_never_varied():
    """Element 2 took one value in every draw but sits 0.5 from the reference: its SE of 0 is
    no evidence, so it is counted, not standardized; a deterministic estimator keeps it."""
    bias = np.array([0.1, -0.2, 0.5, 0.0])
    bias_se = np.array([0.1, 0.1, 0.0, 0.0])
    var = np.array([1.0, 1.0, 0.0, 0.0])  # element 3: no variation and no bias: assessable
    z, unassessed = standardized_bias(bias, bias_se, var, 1e-12, stochastic=True)
    assert (z, unassessed) == (pytest.approx(2.0), 1)
    z, unassessed = standardized_bias(bias, bias_se, var, 1e-12, stochastic=False)
    assert unassessed == 0 and z > 1e10  # exactness claimed, and refuted by element 2


def test_cluttered_digits_gradients_are_measured():
    """The networks' weights are the param store's leaves: compare sees every one of them."""
    pytest.importorskip("pyro_elbo_ext.problems.hard_attention")
    problem = build_problem("cluttered_digits", num_train=64, num_test=16)
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
