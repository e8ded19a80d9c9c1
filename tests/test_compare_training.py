"""pyro_elbo_ext.compare.training: the same seeds and budget for every estimator, and the
common-yardstick decomposition of L along the way."""

from __future__ import annotations

import numpy as np
import pyro
import torch

from pyro_elbo_ext.compare import fit_estimators
from pyro_elbo_ext.problems import get_problem

F64 = {"dtype": torch.float64}


def test_fit_same_seeds_same_budget_and_decomposition():
    problem = get_problem("normal_normal", **F64)
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
    start = float(problem.exact_elbo({n: pyro.param(n).detach() for n in problem.init_params}))
    assert (final["exact_elbo"] > start + 5).all()  # training improved L (from -45.7)
    assert (final["exact_elbo"] <= problem.log_evidence + 1e-9).all()  # still a lower bound
    evaluated = frame.dropna(subset=["eval_elbo"])
    assert len(evaluated) == 3 * 3
    terms = evaluated[[c for c in frame.columns if c.startswith("term_")]]
    assert {"term_log_likelihood", "term_log_prior", "term_entropy"} <= set(terms.columns)
    np.testing.assert_allclose(terms.sum(axis=1), evaluated["eval_elbo"], rtol=1e-9)
    assert (frame["step_time_s"] > 0).all()
    assert (trace["wall_time_s"].diff().dropna() > 0).all()
