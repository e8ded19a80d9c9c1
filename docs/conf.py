"""Sphinx configuration for pyro-elbo-ext.

Builds without network access: no intersphinx, MathJax is loaded by the reader's browser (nothing
is fetched at build time), and the notebooks are rendered from their stored outputs
(``nb_execution_mode = "off"``), never re-executed.

The notebooks (``../notebooks``) and the benchmark results (``../benchmarks/results``) live outside
this folder; they are copied into ``_generated/`` (git-ignored) when the build starts, so that
Sphinx sees them as documents of this site.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))  # document this checkout, installed or not
sys.path.insert(0, str(DOCS / "_ext"))

import pyro_elbo_ext  # noqa: E402


def _copy_generated() -> None:
    """Copy the notebooks and the benchmark results under ``_generated/``."""
    out = DOCS / "_generated"
    for name, pattern in (("notebooks", "*.ipynb"), ("results", "*")):
        src = ROOT / ("notebooks" if name == "notebooks" else "benchmarks/results")
        dst = out / name
        if dst.exists():
            shutil.rmtree(dst)
        dst.mkdir(parents=True)
        for path in sorted(src.glob(pattern)):
            if path.is_file():
                shutil.copy2(path, dst / path.name)


_copy_generated()

#: API pages: one per sub-package (and one per top-level module), every module in them listed.
#: Generated from the package itself, so a new module appears without editing the docs.
API_GROUPS = {
    "pyro_elbo_ext.elbos": "The losses",
    "pyro_elbo_ext.optim": "Optimizers",
    "pyro_elbo_ext.compare": "Comparing estimators",
    "pyro_elbo_ext.diagnostics": "Posterior diagnostics",
    "pyro_elbo_ext.problems": "Example problems",
    "pyro_elbo_ext.cli": "The command line (module)",
}

#: modules shown first in a group's page (the rest follow alphabetically)
API_FIRST = {
    "pyro_elbo_ext.elbos": ("jensen", "analytic_kl", "hard_attention", "importance_weighted",
                            "base", "plan", "treatments", "engine", "combination", "signals",
                            "baselines", "learned_baseline", "decomposition", "protocol"),
    "pyro_elbo_ext.compare": ("statistics", "training", "estimators", "records", "plots"),
    "pyro_elbo_ext.diagnostics": ("inference_data", "psis", "compare_posterior"),
}


def _write_api_pages() -> None:
    """Write ``_generated/api/<group>.rst``: an ``automodule`` per module of each group."""
    import pkgutil

    out = DOCS / "_generated" / "api"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    top = {m.name: m.ispkg for m in pkgutil.iter_modules(pyro_elbo_ext.__path__, "pyro_elbo_ext.")}
    groups = dict(API_GROUPS)
    for name in sorted(top):  # modules added later get a page of their own
        short = name.split(".")[-1]
        if name not in groups and not short.startswith("_"):
            groups[name] = short
    for order, (name, title) in enumerate(groups.items()):
        if name not in top:
            continue
        lines = [title, "=" * len(title), ""]
        if top[name]:
            package = __import__(name, fromlist=["__path__"])
            lines += [f".. automodule:: {name}", "   :no-members:", ""]
            subs = sorted(m.name for m in pkgutil.iter_modules(package.__path__, name + "."))
            first = [f"{name}.{m}" for m in API_FIRST.get(name, ()) if f"{name}.{m}" in subs]
            for sub in first + [s for s in subs if s not in first]:
                if sub.split(".")[-1].startswith("_"):
                    continue
                heading = f"``{sub}``"
                lines += [heading, "-" * len(heading), "", f".. automodule:: {sub}", ""]
        else:
            lines += [f".. automodule:: {name}", ""]
        (out / f"{order:02d}_{name.split('.')[-1]}.rst").write_text("\n".join(lines))


_write_api_pages()

project = "pyro-elbo-ext"
author = "the pyro-elbo-ext developers"
copyright = "the pyro-elbo-ext developers"
release = pyro_elbo_ext.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "sphinxarg.ext",
    "myst_nb",
]

source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_generated/results/*.md"]
root_doc = "index"

# --- MyST and notebooks -------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the committed outputs; never run a kernel
nb_merge_streams = True

# --- API reference ------------------------------------------------------------------------------
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_class_signature = "separated"
autodoc_preserve_defaults = True
autosummary_generate = False
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True
napoleon_preprocess_types = False

# --- HTML ---------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"pyro-elbo-ext {release}"
html_static_path: list[str] = []
