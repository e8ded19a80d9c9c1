"""Smoke test of the speed benchmark: it runs in quick mode and writes its files (no timings)."""

from __future__ import annotations

import json

from benchmarks import speed


def test_speed_quick_writes_files(tmp_path):
    result = speed.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "speed.json").is_file()
    report = (tmp_path / "speed.md").read_text()
    assert "JensenELBO / Trace_ELBO" in report
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert saved["machine"]["torch_num_threads"] == result["machine"]["torch_num_threads"]
    group = saved["groups"][0]
    timed = {c["key"] for c in group["contestants"] if c["status"] == "ok"}
    assert {"JensenELBO", "Trace_ELBO", "floor:jensen"} <= timed
