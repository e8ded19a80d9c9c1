"""The losses: the shared engine, one module per loss, its public extension surface.

The engine: :mod:`.sites` (site predicates), :mod:`.tracing` (Pyro's tracing and checks),
:mod:`.densities` (memoized log-densities and ``score_parts``), :mod:`.plan` (a plan per trace
structure), :mod:`.treatments` (the standard treatments and their term builders),
:mod:`.engine` (terms, score sites, combining one particle's terms), :mod:`.combination`
(how the particles' terms become the estimate), :mod:`.base` (the ELBO interface),
:mod:`.protocol` (what the compiled path needs from a loss), :mod:`.validation`,
:mod:`.decomposition`, :mod:`.exact`.  Learning signals: :mod:`.signals` (the protocol),
:mod:`.state`, :mod:`.baselines`, :mod:`.learned_baseline`, :mod:`.rewards`.
The losses: :mod:`.jensen`, :mod:`.analytic_kl` (with :mod:`.kl` and :mod:`.dependencies`),
:mod:`.hard_attention`, :mod:`.importance_weighted` (with :mod:`.weights`).

Writing a loss (``docs/guide/writing_a_loss.md``): subclass :class:`SiteTreatmentELBO`,
implement ``treat(site, planning) -> Treatment`` from the treatments exported here (or your
own :class:`Treatment`), and set ``combination`` if the estimate is not a mean over particles.
"""

from .analytic_kl import AnalyticKLELBO, KLWeighting
from .base import SiteTreatmentELBO
from .baselines import LeaveOneOutBaseline, MovingAverageBaseline, SignalNormalizer
from .combination import MEAN, Combination, Estimate, MeanOverParticles, ParticleBatch
from .decomposition import Decomposition, HardAttentionDecomposition, TermSummary
from .engine import TERM_SIGNS, ScoreSite, Term
from .hard_attention import HardAttentionELBO, empty_guide
from .importance_weighted import (
    ImportanceWeightedDecomposition,
    ImportanceWeightedELBO,
    LogMeanExpOverParticles,
    VIMCOSignal,
)
from .jensen import JensenELBO
from .learned_baseline import LearnedBaseline
from .plan import (
    AUXILIARY,
    GUIDED,
    OBSERVED,
    UNGUIDED,
    PlanFact,
    Planning,
    SiteView,
    StepContext,
    Treatment,
    TreatmentWrapper,
)
from .protocol import CompilableLoss, is_compilable
from .signals import LearningSignal, SignalPart, SignalSite, ZeroOneReward
from .treatments import (
    EntropyTreatment,
    JensenTreatment,
    KLTreatment,
    Observed,
    PriorProposal,
    Weighted,
)

__all__ = [
    "AUXILIARY",
    "GUIDED",
    "MEAN",
    "OBSERVED",
    "TERM_SIGNS",
    "UNGUIDED",
    "AnalyticKLELBO",
    "Combination",
    "CompilableLoss",
    "Decomposition",
    "EntropyTreatment",
    "Estimate",
    "HardAttentionDecomposition",
    "HardAttentionELBO",
    "ImportanceWeightedDecomposition",
    "ImportanceWeightedELBO",
    "JensenELBO",
    "JensenTreatment",
    "KLTreatment",
    "KLWeighting",
    "LearnedBaseline",
    "LearningSignal",
    "LeaveOneOutBaseline",
    "LogMeanExpOverParticles",
    "MeanOverParticles",
    "MovingAverageBaseline",
    "Observed",
    "ParticleBatch",
    "PlanFact",
    "Planning",
    "PriorProposal",
    "ScoreSite",
    "SignalNormalizer",
    "SignalPart",
    "SignalSite",
    "SiteTreatmentELBO",
    "SiteView",
    "StepContext",
    "Term",
    "TermSummary",
    "Treatment",
    "TreatmentWrapper",
    "VIMCOSignal",
    "Weighted",
    "ZeroOneReward",
    "empty_guide",
    "is_compilable",
]
