"""pyro_elbo_ext.diagnostics.workflow: fit a guide with a named estimator, then PSIS and the
posterior against a reference; what the ``diagnose`` command runs."""

from __future__ import annotations

import math

import pytest

from pyro_elbo_ext.compare import IncompatibleEstimatorError
from pyro_elbo_ext.diagnostics import diagnose
from pyro_elbo_ext.diagnostics.workflow import nuts_reference
from pyro_elbo_ext.problems import get_problem

from .mc import K_SE


def test_diagnose_fits_the_guide_to_the_closed_form_posterior(tmp_path):
    problem = get_problem("normal_normal")
    result = diagnose(problem, "jensen_path", num_steps=300, num_samples=500)
    assert result.reference == "the closed-form posterior"
    row = result.table.loc["z"]
    assert row["ref_mean"] == pytest.approx(float(problem.posterior_params["loc"]), rel=1e-6)
    assert abs(row["mean_error"]) <= K_SE * row["mean_error_se"]
    assert result.psis.verdict == "good" and result.psis.num_samples == 500
    paths = result.save(tmp_path, plots=False)
    assert set(paths) == {"table", "idata"}
    assert all(p.stat().st_size > 0 for p in paths.values())


def test_diagnose_without_a_reference_summarizes_the_guide():
    problem = get_problem("beta_bernoulli")
    result = diagnose(problem, "trace_elbo", num_steps=0, num_samples=100, reference="none")
    assert result.reference is None
    assert {"mean", "sd"} <= set(result.table.columns) and "ref_mean" not in result.table
    assert math.isfinite(result.psis.khat)


def test_diagnose_rejects_what_it_cannot_do():
    problem = get_problem("normal_normal")
    with pytest.raises(ValueError, match="reference must be one of"):
        diagnose(problem, reference="exact", num_steps=0, num_samples=50)
    with pytest.raises(IncompatibleEstimatorError, match="traceenum_elbo"):
        diagnose(problem, "traceenum_elbo", num_steps=0, num_samples=50)


def test_nuts_on_a_model_with_only_discrete_latents_says_why():
    with pytest.raises(ValueError, match="NUTS drew no latent .* all discrete"):
        nuts_reference(get_problem("tiny_discrete"), num_samples=5)
