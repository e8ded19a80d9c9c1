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


def test_a_long_table_against_a_reference_shows_the_worst_rows_of_every_site():
    """table_text on 42 rows over two sites: one line per site with its worst |z|, then the
    16 rows with the largest |mean_error_z|, the small site's worst among them; the plot's
    panels: each site's worst, then the worst of all."""
    import numpy as np
    import pandas as pd

    from pyro_elbo_ext.diagnostics.plots import chosen_elements
    from pyro_elbo_ext.diagnostics.workflow import Diagnosis

    labels = [f"theta[{i}]" for i in range(40)] + ["tau[0]", "tau[1]"]
    z = np.concatenate([np.linspace(-8.0, 8.0, 40), [0.5, -1.5]])
    table = pd.DataFrame({"mean": np.arange(42.0), "sd": np.ones(42), "mean_error_z": z,
                          "sd_error": np.full(42, 0.1)}, index=labels)
    text = Diagnosis(None, "jensen_path", 0, 0.1, None, None, table, "NUTS").table_text()
    lines = text.splitlines()
    assert lines[0] == "42 rows over 2 site(s); per site:"
    assert lines[2].split()[:2] == ["theta", "40"] and lines[3].split()[:2] == ["tau", "2"]
    assert "16 of 42 rows, the rows with the largest |mean_error_z|" in text
    shown = [line.split()[0] for line in lines[lines.index("") + 3:]]
    expected = sorted(labels[:40], key=lambda label: -abs(z[labels.index(label)]))[:15]
    assert set(shown) == set(expected) | {"tau[1]"}
    assert shown[:2] == ["theta[0]", "theta[39]"]  # |z| = 8, largest first
    assert chosen_elements(table, 4) == ["theta[0]", "tau[1]", "theta[39]", "theta[1]"]
