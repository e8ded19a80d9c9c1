"""pyro_elbo_ext.compare.records: the summary and tidy frames, JSON and files."""

from __future__ import annotations

import json

import torch

from pyro_elbo_ext.compare import compare_estimators
from pyro_elbo_ext.problems import get_problem

F64 = {"dtype": torch.float64}


def test_records_frames_json_and_files(tmp_path):
    problem = get_problem("normal_normal", num_data=5, **F64)
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
