"""A pytest plugin that runs Pyro's own tests with ``pyro.infer.SVI`` replaced by ``CompiledSVI``.

Loaded by :mod:`benchmarks.pyro_tests` (``pytest -p benchmarks.pyro_svi_plugin``) when the
environment variable ``PYRO_ELBO_EXT_SVI`` is ``compiled``.  Before any test module is
imported, ``pyro.infer.SVI`` (and ``pyro.infer.svi.SVI``) become
:class:`pyro_elbo_ext.CompiledSVI`, so a test file's ``from pyro.infer import SVI`` gets it;
Pyro's ELBOs are left as they are.  CompiledSVI's one documented warning when it runs a loss
eagerly (:class:`~pyro_elbo_ext.compiled.adapter.EagerFallbackWarning`) is ignored: Pyro's
``filterwarnings = error`` would otherwise turn the promised fallback into a failure.
"""

from __future__ import annotations

import os

MODE_VARIABLE = "PYRO_ELBO_EXT_SVI"
#: ``traced``: run CompiledSVI's traced graphs uncompiled (no Inductor): a quick check of the
#: adapter and the traces, without the compile's seconds per test
BACKEND_VARIABLE = "PYRO_ELBO_EXT_BACKEND"
#: an integer k > 1: run every k-th collected test only (a deterministic sample, the same in
#: both modes), for a run with Inductor that would otherwise take hours on two cores
SAMPLE_VARIABLE = "PYRO_ELBO_EXT_SAMPLE"
#: a path: where the compiled mode writes, per test, what its CompiledSVI instances did
#: (``compiled``: at least one step graph built; ``eager``: every step eager; ``none``: no
#: CompiledSVI made), as JSON
STATS_VARIABLE = "PYRO_ELBO_EXT_STATS"

_made: list = []  # the CompiledSVI instances of the running test
_stats: dict[str, str] = {}


def pytest_runtest_setup(item) -> None:
    _made.clear()


def pytest_runtest_teardown(item) -> None:
    if not _made:
        _stats[item.nodeid] = "none"
    else:
        built = any(svi.compile_seconds for svi in _made)
        _stats[item.nodeid] = "compiled" if built else "eager"
    _made.clear()


def pytest_sessionfinish(session) -> None:
    path = os.environ.get(STATS_VARIABLE)
    if path and _stats:
        import json

        with open(path, "w") as handle:
            json.dump(_stats, handle, indent=0)


def pytest_collection_modifyitems(config, items) -> None:
    every = int(os.environ.get(SAMPLE_VARIABLE, "1") or 1)
    if every > 1:
        kept = items[::every]
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


def pytest_configure(config) -> None:
    if os.environ.get(MODE_VARIABLE, "eager") != "compiled":
        return
    import pyro.infer
    import pyro.infer.svi

    from pyro_elbo_ext import CompiledSVI

    class CompiledAtOnce(CompiledSVI):
        """``CompiledSVI`` that compiles at the first step (``compile_after=0``): Pyro's tests
        take fewer steps than the default deferral, and would otherwise run eagerly."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("compile_after", 0)
            super().__init__(*args, **kwargs)
            _made.append(self)

    pyro.infer.SVI = CompiledAtOnce
    pyro.infer.svi.SVI = CompiledAtOnce
    if os.environ.get(BACKEND_VARIABLE) == "traced":
        from pyro_elbo_ext.compiled import backend

        backend.BACKEND = None
    config.addinivalue_line(
        "filterwarnings", "ignore::pyro_elbo_ext.compiled.adapter.EagerFallbackWarning"
    )
