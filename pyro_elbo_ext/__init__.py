"""pyro_elbo_ext: ELBO losses for Pyro, tools to compare them, and ArviZ diagnostics.

The losses subclass :class:`pyro.infer.elbo.ELBO` and are passed as ``loss=`` to
:class:`pyro.infer.SVI`.
"""

from .elbos import Decomposition, JensenELBO, SiteTreatmentELBO, TermSummary

__version__ = "0.1.0"

__all__ = ["Decomposition", "JensenELBO", "SiteTreatmentELBO", "TermSummary", "__version__"]
