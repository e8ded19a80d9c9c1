"""Pyro's own SVI tests with ``pyro.infer.SVI`` replaced by :class:`pyro_elbo_ext.CompiledSVI`.

Runs Pyro's test files (by default ``tests/infer/test_inference.py``,
``tests/infer/autoguide/test_inference.py`` and ``tests/infer/test_autoguide.py``) twice from a
checkout of Pyro's sources: once as they are (``pyro.infer.SVI``) and once with
``pyro.infer.SVI`` replaced by ``CompiledSVI`` (:mod:`benchmarks.pyro_svi_plugin`; Pyro's ELBOs
are left as they are), then lists the tests that pass with SVI and fail with CompiledSVI.
Nothing of Pyro's is copied here: give the path of a checkout (or ``git archive`` of one)::

    python -m benchmarks.pyro_tests /path/to/pyro [--only compiled] [-k EXPR] [--sample K]
        [--traced] [--out DIR]

Slow (an hour or more on 2 cores: every compiled test compiles its own graphs); not part of
the test suite.  Results go to ``--out`` (default ``benchmarks/results/pyro_tests``): one
JUnit XML per run and ``summary.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

FILES = (
    "tests/infer/test_inference.py",
    "tests/infer/autoguide/test_inference.py",
    "tests/infer/test_autoguide.py",
)
ROOT = Path(__file__).resolve().parent.parent


def run(pyro_path: Path, mode: str, out: Path, files, keyword: str | None,
        timeout: float, traced: bool = False, sample: int = 1) -> Path:
    """Run the files under ``mode`` (``eager``: SVI; ``compiled``: CompiledSVI; ``traced``:
    with the graphs run uncompiled); the XML path."""
    xml = out / f"{mode}.xml"
    env = dict(os.environ, PYRO_ELBO_EXT_SVI=mode,
               PYRO_ELBO_EXT_BACKEND="traced" if traced else "inductor",
               PYRO_ELBO_EXT_SAMPLE=str(sample),
               PYRO_ELBO_EXT_STATS=str(out / f"{mode}_stats.json"),
               PYTHONPATH=os.pathsep.join([str(pyro_path), str(ROOT),
                                           os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "pytest", "-p", "benchmarks.pyro_svi_plugin",
               "--rootdir", str(pyro_path), "-c", str(pyro_path / "setup.cfg"),
               "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", "-o",
               f"faulthandler_timeout={int(timeout)}"]
    if keyword:
        command += ["-k", keyword]
    command += [str(pyro_path / f) for f in files]
    start = time.perf_counter()
    subprocess.run(command, cwd=pyro_path, env=env, check=False)
    print(f"{mode}: {time.perf_counter() - start:.0f} s", flush=True)
    return xml


def outcomes(xml: Path) -> dict[str, tuple[str, str]]:
    """``{test id: (outcome, first line of the message)}`` from a JUnit XML file."""
    result = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed", "error": "error"}.get(child.tag, "skipped")
                message = (child.get("message") or "").splitlines()[0][:200] if child.get(
                    "message") else ""
                break
        result[name] = (outcome, message)
    return result


def summarize(eager: dict, compiled: dict, stats: dict | None = None) -> str:
    """A markdown summary: counts, what CompiledSVI did in the tests (``stats``, from the
    plugin), and the tests that pass with SVI and not with CompiledSVI."""
    def count(results, what):
        return sum(1 for outcome, _ in results.values() if outcome == what)

    lines = ["# Pyro's tests under CompiledSVI", "",
             "`python -m benchmarks.pyro_tests <Pyro checkout>`: " + ", ".join(
                 f"`{f}`" for f in FILES) + ", as they are (`pyro.infer.SVI`) and with "
             "`pyro.infer.SVI` replaced by `CompiledSVI` (Pyro's ELBOs unchanged).", "",
             "| run | passed | failed | errors | skipped |", "|---|---|---|---|---|"]
    for label, results in (("pyro.infer.SVI", eager), ("CompiledSVI", compiled)):
        lines.append(f"| {label} | {count(results, 'passed')} | {count(results, 'failed')} | "
                     f"{count(results, 'error')} | {count(results, 'skipped')} |")
    regressions = sorted(name for name, (outcome, _) in eager.items()
                         if outcome == "passed" and compiled.get(name, ("missing",))[0]
                         != "passed")
    if stats:
        kinds = {kind: sum(1 for v in stats.values() if v == kind)
                 for kind in ("compiled", "eager", "none")}
        lines += ["", f"In the CompiledSVI run, {kinds['compiled']} tests built at least one "
                  f"compiled step graph, {kinds['eager']} ran every CompiledSVI step eagerly (a "
                  f"loss or structure that runs eagerly, with its warning) and {kinds['none']} "
                  "made no CompiledSVI (tests of guides alone)."]
    lines += ["", f"Pass with SVI, not with CompiledSVI: {len(regressions)}", ""]
    lines += [f"- `{name}`: {compiled.get(name, ('missing', ''))[1]}" for name in regressions]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyro_path", type=Path, help="a checkout of Pyro's sources")
    parser.add_argument("--only", choices=("eager", "compiled"),
                        help="run one mode (the other's XML, if in --out, is reused)")
    parser.add_argument("-k", dest="keyword", help="pytest's -k expression")
    parser.add_argument("--files", nargs="+", default=list(FILES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/pyro_tests")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds before a hanging test's stack is dumped")
    parser.add_argument("--traced", action="store_true",
                        help="CompiledSVI's graphs run uncompiled (no Inductor): a quick check")
    parser.add_argument("--sample", type=int, default=1, metavar="K",
                        help="run every K-th collected test only, in both modes (the same "
                             "tests): a run with Inductor in a fraction of the hours")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pyro_path = args.pyro_path.resolve()
    for mode in ("eager", "compiled"):
        if args.only in (None, mode):
            run(pyro_path, mode, args.out, args.files, args.keyword, args.timeout,
                args.traced and mode == "compiled", args.sample)
    xmls = {mode: args.out / f"{mode}.xml" for mode in ("eager", "compiled")}
    if all(path.exists() for path in xmls.values()):
        stats_path = args.out / "compiled_stats.json"
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
        summary = summarize(outcomes(xmls["eager"]), outcomes(xmls["compiled"]), stats)
        (args.out / "summary.md").write_text(summary)
        if args.out.parent.name == "results":  # the page the docs include
            (args.out.parent / "pyro_tests.md").write_text(summary)
        print(summary)


if __name__ == "__main__":
    main()
