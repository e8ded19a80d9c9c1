"""pyro_elbo_ext._extras: with only the core install (torch, pyro-ppl) the losses and the
problems work, and a module whose extra is missing says which ``pip install`` to run.

A missing module is simulated in a fresh interpreter by ``sys.modules[name] = None``, which
makes ``import name`` raise ImportError as if it were not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyro_elbo_ext._extras import MissingExtraError, require

ROOT = Path(__file__).resolve().parents[1]

#: the optional dependencies (tqdm comes with pyro-ppl itself)
EXTRA_MODULES = ("pandas", "matplotlib", "arviz", "xarray", "sklearn", "scipy")


def _run_without(modules, code: str) -> subprocess.CompletedProcess:
    blocker = "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return subprocess.run([sys.executable, "-c", blocker + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_require_returns_the_module_or_names_the_extra():
    assert require("math", "compare").sqrt(4.0) == 2.0
    with pytest.raises(MissingExtraError) as info:
        require("no_such_module_xyz.sub", "diagnostics", "the test")
    assert str(info.value) == ("no_such_module_xyz is needed for the test; install it with: "
                               "pip install 'pyro-elbo-ext[diagnostics]'")
    assert isinstance(info.value, ImportError)
    with pytest.raises(ValueError, match="unknown extra 'bogus'"):
        require("math", "bogus")


def test_the_core_install_trains_and_the_extras_name_their_install_line():
    done = _run_without(EXTRA_MODULES, """
        import pyro
        from pyro_elbo_ext import JensenELBO
        from pyro_elbo_ext.problems import get_problem

        problem = get_problem("normal_normal")
        problem.set_params()
        svi = pyro.infer.SVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 0.1}),
                             loss=JensenELBO())
        print("step", svi.step(*problem.args))
        for what in ("import pyro_elbo_ext.compare", "import pyro_elbo_ext.diagnostics",
                     "get_problem('vae_digits')"):
            try:
                exec(what)
            except ImportError as exc:
                print(what, "->", exc)
        from pyro_elbo_ext.cli import main
        print("exit", main(["compare", "-R", "3"]))
    """)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "step " in out
    install = "install it with: pip install 'pyro-elbo-ext[{}]'"
    assert f"import pyro_elbo_ext.compare -> pandas is needed for estimator comparison " \
           f"(pyro_elbo_ext.compare); {install.format('compare')}" in out
    assert f"import pyro_elbo_ext.diagnostics -> arviz is needed for posterior diagnostics; " \
           f"{install.format('diagnostics')}" in out
    assert f"get_problem('vae_digits') -> sklearn is needed for the digits data set; " \
           f"{install.format('compare')}" in out
    assert "exit 1" in out and install.format("compare") in done.stderr


def test_diagnostics_without_arviz_alone_names_the_diagnostics_extra():
    done = _run_without(("arviz",), "import pyro_elbo_ext.diagnostics")
    assert done.returncode == 1
    assert "pip install 'pyro-elbo-ext[diagnostics]'" in done.stderr.strip().splitlines()[-1]
