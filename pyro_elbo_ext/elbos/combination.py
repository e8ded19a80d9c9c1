r"""How the particles' terms become the estimate and its surrogate: the combine hook.

The engine (:class:`~pyro_elbo_ext.elbos.base.SiteTreatmentELBO`) turns each trace pair into
a :class:`ParticleBatch` (one particle, or K vectorized along a particle dimension): the
treated sites' terms, the sites that need a score-function term and the learning signal bound
to the batch.  A loss's :class:`Combination` then says how batches become the estimate:

- :class:`MeanOverParticles` (every loss but one): L_hat is the mean over particles of the
  sum of the terms, and the surrogate the mean of :func:`~.engine.combine`'s surrogates
  (score terms meet their reward, Rao-Blackwellized by the data flow: :data:`DOWNSTREAM`);
- :class:`~pyro_elbo_ext.elbos.importance_weighted.LogMeanExpOverParticles`: the
  importance-weighted bound, :math:`\hat L_K = \log \frac1K \sum_k w_k` with
  :math:`\log w_k` the sum of particle k's terms.

A combination also says what its estimate decomposes into (:meth:`Combination.decomposition`).
Contents: :class:`ParticleBatch`, :class:`Estimate`, :class:`Combination`,
:class:`MeanOverParticles`, :data:`MEAN`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .decomposition import Decomposition
from .downstream import DOWNSTREAM
from .engine import ParticleEstimate, ScoreSite, Term, combine
from .plan import Plan, StepContext


@dataclass(slots=True)
class ParticleBatch:
    """One trace pair's share of the estimate, before combining.

    Attributes
    ----------
    terms : list of Term
        The treated sites' terms (in expectation over enumerated sites, if any).
    score_sites : list of ScoreSite
        The sites whose sample needs a score-function term.
    signal : callable or None
        The learning signal bound to this batch (``signal(site, reward) -> signal``, see
        :data:`~.engine.SignalFn`), whose state update follows the batch's gradient.
    ctx : StepContext
        The traces, the plan and the call's settings.
    size : int
        How many particles the batch holds.
    particle_dim : int or None
        The dimension of the vectorized particles; ``None`` for a single particle.
    """

    terms: list[Term]
    score_sites: list[ScoreSite]
    signal: Any
    ctx: StepContext
    size: int
    particle_dim: int | None

    @property
    def plan(self) -> Plan:
        return self.ctx.plan


@dataclass(slots=True)
class Estimate:
    """A combination's result: the estimate and the surrogate of its gradient.

    ``value / divisor`` is the estimate (of L, or of L_K) and ``surrogate / divisor`` a tensor
    whose gradient estimates the estimated quantity's gradient (the mean over particles divides
    once, at the end: a streamed part keeps ``divisor = num_particles``).  ``value`` may carry
    a gradient graph (it may be ``surrogate`` itself): detach it where it is only a value.
    ``batches`` are the batches it was made from.
    """

    value: torch.Tensor
    surrogate: torch.Tensor
    batches: Sequence[ParticleBatch]
    divisor: int = 1

    @property
    def mean_value(self) -> torch.Tensor:
        """The estimate itself, ``value / divisor``, detached."""
        value = self.value.detach()
        return value if self.divisor == 1 else value / self.divisor

    @property
    def terms(self) -> list[Term]:
        """Every batch's terms (for naming a non-finite value or gradient)."""
        return [term for batch in self.batches for term in batch.terms]


class Combination:
    """How a loss's particle batches become its estimate (the combine hook).

    A loss sets ``combination`` to an instance.  Implement :meth:`estimate` (and, for a
    decomposition of another shape, :meth:`decomposition`).
    """

    #: the quantity estimated, as messages name it
    quantity: str = "L"
    #: whether the estimate is a sum of the terms, so that a score site's reward may leave
    #: out the terms its sample cannot reach (the plan's data-flow rule,
    #: :data:`~.downstream.DOWNSTREAM`) and Pyro's per-site baselines centre it
    sums_terms: bool = True
    #: whether ``estimate(batches)`` is the sum of ``estimate([b])`` over the batches: the
    #: engine then takes each batch's gradient and learning-signal update in turn (the memory
    #: of one particle's graph at a time), as Pyro's ``Trace_ELBO`` does
    by_batch: bool = True

    def estimate(self, batches: Sequence[ParticleBatch], num_particles: int) -> Estimate:
        """The estimate and its surrogate from ``batches`` (``num_particles`` in all)."""
        raise NotImplementedError

    def decomposition(self, estimate: Estimate, num_particles: int, notes: tuple[str, ...],
                      log_evidence: float | None) -> Decomposition:
        """What ``decompose`` returns: the estimate and the mean of each site's terms."""
        return Decomposition.from_batches(float(estimate.mean_value), estimate.batches,
                                          num_particles, notes, log_evidence)


class MeanOverParticles(Combination):
    r"""L_hat, the mean over particles of the sum of the terms:

    .. math::

        \hat L = \frac1K \sum_k \sum_t c_{t,k}, \qquad
        \text{surrogate} = \frac1K \sum_k \Big(\sum_t \mathrm{pathwise}_{t,k}
          + \sum_j \mathrm{score}_{j,k}\, \mathrm{sg}(\mathrm{signal}_{j,k})\Big)

    (:func:`~.engine.combine` per batch).  Unbiased for L and, with a signal that does not
    depend on site j's sample, for dL.
    """

    def estimate(self, batches: Sequence[ParticleBatch], num_particles: int) -> Estimate:
        if len(batches) == 1:  # the common case: vectorized particles, or one at a time
            batch = batches[0]
            part = combine(batch.terms, batch.score_sites, batch.signal,
                           batch.plan.fact(DOWNSTREAM))
            surrogate = part.surrogate
            if batch.signal is not None:
                extra = batch.signal.surrogate()
                if extra is not None:  # a learning signal's own terms (a control variate's)
                    surrogate = surrogate + extra
            return Estimate(part.total, surrogate, batches, num_particles)
        value = surrogate = None
        for batch in batches:
            part: ParticleEstimate = combine(batch.terms, batch.score_sites, batch.signal,
                           batch.plan.fact(DOWNSTREAM))
            value = part.total if value is None else value + part.total
            surrogate = part.surrogate if surrogate is None else surrogate + part.surrogate
            if batch.signal is not None:
                extra = batch.signal.surrogate()
                if extra is not None:  # a learning signal's own terms (a control variate's)
                    surrogate = surrogate + extra
        if value is None:  # no batch at all
            value = surrogate = torch.zeros(())
        return Estimate(value, surrogate, batches, num_particles)


def signal_surrogate(batch: ParticleBatch) -> torch.Tensor | None:
    """The extra surrogate terms the batch's learning signal added (none by default)."""
    return None if batch.signal is None else batch.signal.surrogate()


#: the combination of every loss whose estimate is a mean over particles
MEAN = MeanOverParticles()

__all__ = ["MEAN", "Combination", "Estimate", "MeanOverParticles", "ParticleBatch",
           "signal_surrogate"]
