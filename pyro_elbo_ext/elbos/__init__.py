"""The losses: the shared engine, one module per loss, baselines and validation."""

from .analytic_kl import AnalyticKLELBO
from .base import SiteTreatmentELBO
from .baselines import LearnedBaseline, LeaveOneOutBaseline, MovingAverageBaseline, SignalNormalizer
from .decomposition import Decomposition, TermSummary
from .hard_attention import HardAttentionDecomposition, HardAttentionELBO, empty_guide
from .importance_weighted import ImportanceWeightedDecomposition, ImportanceWeightedELBO
from .jensen import JensenELBO

__all__ = [
    "AnalyticKLELBO",
    "Decomposition",
    "HardAttentionDecomposition",
    "HardAttentionELBO",
    "ImportanceWeightedDecomposition",
    "ImportanceWeightedELBO",
    "JensenELBO",
    "LearnedBaseline",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "SignalNormalizer",
    "SiteTreatmentELBO",
    "TermSummary",
    "empty_guide",
]
