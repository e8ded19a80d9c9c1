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

    pyro.infer.SVI = CompiledAtOnce
    pyro.infer.svi.SVI = CompiledAtOnce
    if os.environ.get(BACKEND_VARIABLE) == "traced":
        from pyro_elbo_ext.compiled import backend

        backend.BACKEND = None
    config.addinivalue_line(
        "filterwarnings", "ignore::pyro_elbo_ext.compiled.adapter.EagerFallbackWarning"
    )
