"""The losses: the shared engine, one module per loss, baselines and validation."""

from .base import SiteTreatmentELBO
from .decomposition import Decomposition, TermSummary
from .jensen import JensenELBO

__all__ = ["Decomposition", "JensenELBO", "SiteTreatmentELBO", "TermSummary"]
