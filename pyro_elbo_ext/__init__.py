"""pyro_elbo_ext: ELBO losses for Pyro, tools to compare them, and ArviZ diagnostics.

The losses subclass :class:`pyro.infer.elbo.ELBO` and are passed as ``loss=`` to
:class:`pyro.infer.SVI`.  Estimator comparison lives in :mod:`pyro_elbo_ext.compare`, ArviZ
diagnostics in :mod:`pyro_elbo_ext.diagnostics` (imported on first use, so that importing the
losses does not load ArviZ), the example problems in :mod:`pyro_elbo_ext.problems`, and
:class:`~pyro_elbo_ext.optim.GroupedOptim`, one torch optimizer for all of SVI's parameters, and
:class:`~pyro_elbo_ext.compiled.CompiledSVI`, the whole SVI step compiled (torch.compile).
"""

from .compiled import CompiledSVI
from .elbos import (
    AnalyticKLELBO,
    Decomposition,
    HardAttentionELBO,
    ImportanceWeightedELBO,
    JensenELBO,
    SiteTreatmentELBO,
    TermSummary,
    empty_guide,
)
from .optim import GroupedOptim

__version__ = "0.1.0"

__all__ = [
    "AnalyticKLELBO",
    "CompiledSVI",
    "Decomposition",
    "GroupedOptim",
    "HardAttentionELBO",
    "ImportanceWeightedELBO",
    "JensenELBO",
    "SiteTreatmentELBO",
    "TermSummary",
    "__version__",
    "empty_guide",
]
