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


def pytest_configure(config) -> None:
    if os.environ.get(MODE_VARIABLE, "eager") != "compiled":
        return
    import pyro.infer
    import pyro.infer.svi

    from pyro_elbo_ext import CompiledSVI

    pyro.infer.SVI = CompiledSVI
    pyro.infer.svi.SVI = CompiledSVI
    if os.environ.get(BACKEND_VARIABLE) == "traced":
        from pyro_elbo_ext.compiled import backend

        backend.BACKEND = None
    config.addinivalue_line(
        "filterwarnings", "ignore::pyro_elbo_ext.compiled.adapter.EagerFallbackWarning"
    )
