"""pyro_elbo_ext.compare.report: the table and the lines that say what the numbers show."""

from __future__ import annotations

import re

import torch

from pyro_elbo_ext.compare import compare_at_points, compare_estimators
from pyro_elbo_ext.compare.report import format_table, notes
from pyro_elbo_ext.problems import get_problem

F64 = {"dtype": torch.float64}


def test_two_points_table_and_the_path_estimators_zero_variance_at_the_posterior():
    problem = get_problem("normal_normal", **F64)
    comparison = compare_at_points(problem, ["jensen_path", "trace_elbo"], num_repeats=30)
    summary = comparison.summary()
    table = format_table(summary).splitlines()
    assert table[0].split()[:2] == ["at", "estimator"] and "var / trace_elbo" in table[0]
    trace_rows = [line for line in table[1:] if line.split()[1] == "trace_elbo"]
    assert len(trace_rows) == 2 and all(" 1 " in line for line in trace_rows)
    lines = notes(comparison)
    assert lines[0].startswith("max |bias|/SE is the worst of 2 gradient element(s): at R = 30")
    [zero] = [line for line in lines if line.startswith("at posterior: jensen_path's")]
    assert "Roeder et al. 2017" in zero
    assert not any(line.startswith("at init: jensen_path's gradient variance") for line in lines)


def test_the_baselines_variance_cut_is_stated_with_the_tables_numbers():
    problem = get_problem("random_attention", **F64)
    names = ["hard_attention_reinforce", "hard_attention_reinforce_ma",
             "hard_attention_reinforce_loo"]
    comparison = compare_estimators(problem, names, num_repeats=60)
    var = comparison.summary().set_index("estimator")["grad_var_total"]
    [line] = [x for x in notes(comparison) if "the baselines divide REINFORCE's variance" in x]
    factors = dict(re.findall(r"(ma|loo) x([0-9.e+]+)", line))
    for short in ("ma", "loo"):
        ratio = var["hard_attention_reinforce"] / var[f"hard_attention_reinforce_{short}"]
        assert float(factors[short]) == float(f"{ratio:.2g}")
