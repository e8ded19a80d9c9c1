"""A pytest plugin: Pyro's ``TraceGraph_ELBO`` replaced by ``JensenELBO(entropy="sampled")``.

Loaded with ``pytest -p benchmarks._tracegraph_substitute`` (see
``benchmarks/pyro_tracegraph_tests.py``): at configuration, before any test module imports
``pyro.infer``'s names, ``pyro.infer.TraceGraph_ELBO`` (and the same name in
``pyro.infer.tracegraph_elbo``) becomes a subclass of our loss that takes TraceGraph_ELBO's
arguments, so that Pyro's own tests run against it unchanged.  With the environment variable
``PYRO_ELBO_EXT_JIT=1`` the substitute (and ``JitTraceGraph_ELBO``'s) is compiled
(``jit=True``).
"""

from __future__ import annotations

import os


def pytest_configure(config):
    import pyro.infer
    import pyro.infer.tracegraph_elbo

    from pyro_elbo_ext import JensenELBO

    jit = os.environ.get("PYRO_ELBO_EXT_JIT") == "1"

    class TraceGraph_ELBO(JensenELBO):  # noqa: N801 - the name the tests import
        """``JensenELBO(entropy="sampled")`` under Pyro's name (a test substitute)."""

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("jit", jit)
            super().__init__(*args, entropy="sampled", **kwargs)

    pyro.infer.TraceGraph_ELBO = TraceGraph_ELBO
    pyro.infer.tracegraph_elbo.TraceGraph_ELBO = TraceGraph_ELBO
    if jit:
        pyro.infer.JitTraceGraph_ELBO = TraceGraph_ELBO
        pyro.infer.tracegraph_elbo.JitTraceGraph_ELBO = TraceGraph_ELBO
