"""The discrete estimators in the comparison tools: registry entries, their applicability, and
the particle count K stated in the table."""

from __future__ import annotations

import pytest
import torch

from pyro_elbo_ext.compare import compare_estimators, get_estimator
from pyro_elbo_ext.compare.report import format_table
from pyro_elbo_ext.problems import get_problem


def test_the_discrete_entries_apply_where_their_estimator_is_defined():
    sbn = get_problem("sbn_digits", latent_dim=3, num_data=4, num_test=0, dtype=torch.float64)
    mixed = get_problem("tiny_discrete", dtype=torch.float64)  # Bernoulli + Categorical sites
    normal = get_problem("normal_normal")
    for name in ("discrete_loo", "discrete_disarm", "discrete_relax", "discrete_gumbel_st"):
        assert get_estimator(name).applies_to(sbn) == (True, "")
        ok, reason = get_estimator(name).applies_to(normal)
        assert not ok and "no discrete" in reason
    assert get_estimator("discrete_loo").applies_to(mixed)[0]
    assert get_estimator("discrete_relax").applies_to(mixed)[0]
    ok, reason = get_estimator("discrete_disarm").applies_to(mixed)
    assert not ok and "['z']" in reason and "bernoulli" in reason


@pytest.mark.parametrize("name, particles, expected", [
    ("discrete_loo", 1, 2), ("discrete_disarm", 1, 2), ("discrete_disarm", 3, 4),
    ("discrete_relax", 1, 1), ("importance_weighted_iwae", 1, 4),
    ("importance_weighted_iwae", 8, 8),
])
def test_estimators_that_need_particles_get_enough(name, particles, expected):
    problem = get_problem("sbn_digits", latent_dim=3, num_data=4, num_test=0)
    loss, _, _ = get_estimator(name).build(problem, particles)
    assert loss.num_particles == expected


def test_the_table_states_k_and_the_estimators_are_unbiased():
    problem = get_problem("sbn_digits", latent_dim=3, num_data=4, num_test=0,
                          dtype=torch.float64)
    comparison = compare_estimators(problem, ["trace_elbo", "discrete_loo", "discrete_disarm",
                                              "importance_weighted_iwae"],
                                    num_repeats=100, num_particles=2, progress=False)
    summary = comparison.summary()
    table = format_table(summary)
    assert " K " in table.splitlines()[0]
    ks = dict(zip(summary["estimator"], summary["num_particles"]))
    assert ks == {"trace_elbo": 2, "discrete_loo": 2, "discrete_disarm": 2,
                  "importance_weighted_iwae": 4}
    unbiased = summary[summary["objective"] == "L"]
    assert (unbiased["bias_max_z"] < unbiased["bias_z_threshold"]).all()
    var = dict(zip(summary["estimator"], summary["grad_var_total"]))
    assert var["discrete_loo"] < var["trace_elbo"] / 10
