"""The losses: the shared engine, one module per loss, baselines and validation.

The engine: :mod:`.sites` (site predicates), :mod:`.tracing` (Pyro's tracing and checks),
:mod:`.densities` (memoized log-densities and ``score_parts``), :mod:`.plan` (a plan per trace
structure), :mod:`.treatments` (term builders), :mod:`.engine` (combining terms into L and its
surrogate), :mod:`.base` (the ELBO interface), :mod:`.validation`, :mod:`.decomposition`.
The losses: :mod:`.jensen`, :mod:`.analytic_kl` (with :mod:`.kl` and :mod:`.dependencies`),
:mod:`.hard_attention` (with :mod:`.baselines` and :mod:`.rewards`).
"""

from .analytic_kl import AnalyticKLELBO
from .base import SiteTreatmentELBO
from .baselines import (
    LearnedBaseline,
    LearningSignal,
    LeaveOneOutBaseline,
    MovingAverageBaseline,
    SignalNormalizer,
)
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
    "LearningSignal",
    "LeaveOneOutBaseline",
    "MovingAverageBaseline",
    "SignalNormalizer",
    "SiteTreatmentELBO",
    "TermSummary",
    "empty_guide",
]
