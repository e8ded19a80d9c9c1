"""The losses: the shared engine, one module per loss, baselines and validation."""

from .analytic_kl import AnalyticKLELBO
from .base import SiteTreatmentELBO
from .decomposition import Decomposition, TermSummary
from .jensen import JensenELBO

__all__ = ["AnalyticKLELBO", "Decomposition", "JensenELBO", "SiteTreatmentELBO", "TermSummary"]
