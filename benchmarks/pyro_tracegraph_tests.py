"""Pyro's own TraceGraph_ELBO tests, run against ``JensenELBO(entropy="sampled")``.

Runs ``tests/integration_tests/test_tracegraph_elbo.py`` and the ``TraceGraph_ELBO`` cases of
``tests/infer/test_gradient.py`` from a checkout of Pyro's repository twice: with Pyro's own
``TraceGraph_ELBO`` (the reference run) and with our loss in its place (a pytest plugin,
``benchmarks/_tracegraph_substitute.py``, replaces the name before the tests import it), and
prints the pass counts of both.  Pyro's tests are not copied here: give the path of a
checkout (``git clone https://github.com/pyro-ppl/pyro``; its ``setup.cfg`` makes warnings
errors, as in Pyro's CI).

Run: ``python -m benchmarks.pyro_tracegraph_tests /path/to/pyro [--jit] [--only ours]``
(several minutes: the integration tests train for thousands of steps).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

TEST_FILES = {
    "tests/integration_tests/test_tracegraph_elbo.py": None,
    "tests/infer/test_gradient.py": "TraceGraph",
}
ROOT = Path(__file__).resolve().parent.parent


def run(pyro_root: Path, substitute: bool, jit: bool = False) -> dict:
    """Counts (passed, failed, errors, skipped, xfailed) and the failing test ids."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(pyro_root)]
                                        + env.get("PYTHONPATH", "").split(os.pathsep))
    env["PYRO_ELBO_EXT_JIT"] = "1" if jit else "0"
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failing": []}
    for path, keyword in TEST_FILES.items():
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.xml"
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       path, f"--junitxml={report}", "-o", "junit_family=xunit2"]
            if keyword:
                command += ["-k", keyword]
            if substitute:
                command += ["-p", "benchmarks._tracegraph_substitute"]
            subprocess.run(command, cwd=pyro_root, env=env, check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _count(report, counts)
    return counts


def _count(report: Path, counts: dict) -> None:
    if not report.exists():
        counts["errors"] += 1
        counts["failing"].append(f"{report}: no report (collection failed)")
        return
    for case in ElementTree.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag for child in case}
        if "skipped" in kinds:
            counts["skipped"] += 1
        elif "failure" in kinds:
            counts["failed"] += 1
            counts["failing"].append(name)
        elif "error" in kinds:
            counts["errors"] += 1
            counts["failing"].append(name)
        else:
            counts["passed"] += 1


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyro_root", type=Path, help="a checkout of Pyro's repository")
    parser.add_argument("--jit", action="store_true", help="our loss with jit=True")
    parser.add_argument("--only", choices=("ours", "pyro"), default=None,
                        help="run one side only")
    parser.add_argument("--out", type=Path, default=None, help="write the counts as JSON")
    args = parser.parse_args(argv)
    results = {}
    for side, substitute in (("pyro", False), ("ours", True)):
        if args.only in (None, side):
            results[side] = run(args.pyro_root.resolve(), substitute, args.jit)
            c = results[side]
            print(f"{side:5s}: {c['passed']} passed, {c['failed']} failed, "
                  f"{c['errors']} errors, {c['skipped']} skipped")
            for name in c["failing"]:
                print(f"       failing: {name}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
