r"""ImportanceWeightedELBO: the importance-weighted bound L_K, with IWAE, DReG and VIMCO gradients.

With K draws z_1..z_K from q and weights w_k = p(X, z_k) / q(z_k) (Burda, Grosse &
Salakhutdinov 2015, arXiv:1509.00519):

.. math::

    \log p(X) = \log \mathbb{E}\Big[\tfrac1K \sum_k w_k\Big]
    \;\ge\; L_K = \mathbb{E}\Big[\log \tfrac1K \sum_k w_k\Big] \;\ge\; L_1 = L,

L_K non-decreasing in K and L_K -> log p(X).  Where every latent site (of the model and the
guide) is inside a plate, the bound factorizes over the plate's elements i and the
log-mean-exp is taken per element: :math:`\hat L_K = \sum_i \log \frac1K \sum_k w_{ik}`.

The loss is the shared engine's: a treatment per site whose terms add up to log w_k
(:meth:`ImportanceWeightedELBO.treat`), the log-mean-exp over particles as its combination
(:class:`LogMeanExpOverParticles`) and VIMCO as its learning signal (:class:`VIMCOSignal`).
The formulas on tensors are in :mod:`.weights`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import SiteTreatmentELBO
from .combination import Combination, Estimate, ParticleBatch, signal_surrogate
from .decomposition import ImportanceWeightedDecomposition
from .densities import gradient_kind
from .engine import ScoreSite
from .plan import AUXILIARY, GUIDED, PlanFact, Planning, SiteView, Treatment
from .signals import LearningSignal, SignalPart, SignalSite
from .treatments import EntropyTreatment, JensenTreatment
from .validation import check_choice
from .weights import (
    WeightLayout,
    dreg_sites,
    effective_sample_size,
    log_mean_exp,
    normalized_weights,
    reduce_to_elements,
    scale_gradient,
    vimco_signal,
    weight_layout,
)

#: the gradient estimators of ``ImportanceWeightedELBO(estimator=...)``
IW_ESTIMATORS = ("iwae", "dreg")

#: the plates the bound is taken per element of, and their subsample factor
LAYOUT: PlanFact[WeightLayout] = PlanFact("importance-weight layout")
#: the guide sites whose q DReG detaches (``None``: DReG does not apply to this guide)
DREG_SITES: PlanFact[tuple[str, ...] | None] = PlanFact("DReG's stopped sites")


class VIMCOSignal(SignalPart):
    r"""VIMCO's learning signal (Mnih & Rezende 2016, arXiv:1602.06725): the signal of
    particle k's score is :math:`\hat L_K - \hat L_{-k}` of the particles' log-weights (the
    reward it is given), :func:`~.weights.vimco_signal`.  Stateless."""

    kind = "vimco"
    what = "VIMCO signal"

    def apply(self, site: SignalSite, signal: torch.Tensor) -> torch.Tensor:
        return vimco_signal(signal, site.particle_dim)


@dataclass(slots=True)
class WeightedEstimate(Estimate):
    """An :class:`~.combination.Estimate` of L_K with the log-weights it was made from."""

    log_w: torch.Tensor | None = None
    particle_dim: int = -1
    layout: WeightLayout = WeightLayout()


class LogMeanExpOverParticles(Combination):
    r"""The importance-weighted bound's combination of the particles' terms.

    Particle k's terms add up to :math:`\log w_k` (reduced to the elements of the layout's
    plates); the estimate is :math:`\hat L_K = \sum_i \log \frac1K \sum_k w_{ik}` (times
    the plates' subsample factor), and the surrogate its log-mean-exp of the terms' pathwise
    parts (the IWAE gradient; DReG's with a stopped q, each stopped sample's gradient then
    scaled by its normalized weight), plus each score site's
    :math:`\sum_k \mathrm{score}_k\, \mathrm{sg}(s_k)` with the learning signal (VIMCO's)
    of the log-weights.  The particles come vectorized in one batch, or one per batch.
    """

    quantity = "L_K"
    by_batch = False
    #: log-mean-exp is not a sum of terms: no term can be left out of VIMCO's signal, and
    #: Pyro's per-site baselines do not apply (its own signal centres the log-weights)
    sums_terms = False

    def estimate(self, batches: Sequence[ParticleBatch], num_particles: int
                 ) -> WeightedEstimate:
        layout = batches[0].plan.fact(LAYOUT, WeightLayout())
        vectorized = len(batches) == 1 and batches[0].particle_dim is not None
        if vectorized:
            dim = batches[0].particle_dim
            log_w = _batch_log_weight(batches[0], layout, dim)
            scores = _batch_score(batches[0], layout, dim)
        else:
            per_particle = [_batch_log_weight(b, layout, None) for b in batches]
            shape = torch.broadcast_shapes(*[w.shape for w in per_particle])
            log_w = torch.stack([w.expand(shape) for w in per_particle])
            dim = -log_w.dim()
            parts = [_batch_score(b, layout, None) for b in batches]
            scores = None
            if any(p is not None for p in parts):
                scores = torch.stack([torch.zeros(shape, dtype=log_w.dtype, device=log_w.device)
                                      if p is None else p.expand(shape) for p in parts])
        surrogate = log_mean_exp(log_w, dim)
        value = surrogate.detach().sum()
        _scale_stopped_gradients(batches, log_w, dim, vectorized)
        if scores is not None:
            signal = _signal(batches, scores, log_w, dim)
            surrogate = surrogate + (scores * signal).sum(dim)
        surrogate = surrogate.sum()
        for batch in batches:
            extra = signal_surrogate(batch)
            if extra is not None:  # a learning signal's own terms (a control variate's)
                surrogate = surrogate + extra
        if layout.local_factor != 1.0:
            value, surrogate = value * layout.local_factor, surrogate * layout.local_factor
        return WeightedEstimate(value, surrogate, batches, log_w=log_w.detach(), particle_dim=dim,
                                layout=layout)

    def decomposition(self, estimate: WeightedEstimate, num_particles: int,
                      notes: tuple[str, ...], log_evidence: float | None
                      ) -> ImportanceWeightedDecomposition:
        """L_K, the terms of L_1 of the same draws, the weights' effective sample size."""
        log_w, dim, layout = estimate.log_w, estimate.particle_dim, estimate.layout
        ess = effective_sample_size(log_w, dim)
        return ImportanceWeightedDecomposition.from_batches(
            float(estimate.mean_value), estimate.batches, num_particles, notes, log_evidence,
            elbo_1=float(log_w.mean(dim).sum()) * layout.local_factor, ess=float(ess.mean()),
            ess_min=float(ess.min()), local_plates=layout.local_plates,
        )


#: the combination of the importance-weighted bound
LOG_MEAN_EXP = LogMeanExpOverParticles()


def _kept_dims(layout: WeightLayout, particle_dim: int | None) -> tuple[int, ...]:
    return layout.local_dims if particle_dim is None else (particle_dim, *layout.local_dims)


def _batch_log_weight(batch: ParticleBatch, layout: WeightLayout,
                      particle_dim: int | None) -> torch.Tensor:
    """log w of the batch's particles per element: the sum of its terms' contributions,
    differentiated as they are (the treatments keep -log q's whole gradient, or DReG's
    stopped q); the subsample scale of the local plates is taken out (it is applied outside
    the log-mean-exp)."""
    kept = _kept_dims(layout, particle_dim)
    total = None
    for term in batch.terms:
        part = reduce_to_elements(term.contribution, kept)
        total = part if total is None else total + part
    if total is None:  # an empty program: log w = 0 (L_K = 0, as Pyro's ELBOs give)
        total = torch.zeros(())
    if layout.local_factor != 1.0:
        total = total / layout.local_factor
    if particle_dim is not None:
        nesting = -particle_dim
        if total.dim() < nesting:
            total = total.reshape((1,) * (nesting - total.dim()) + total.shape)
        if total.dim() > nesting:  # dims left of the particle plate (invalid; summed)
            total = total.sum(list(range(total.dim() - nesting)))
    return total


def _batch_score(batch: ParticleBatch, layout: WeightLayout,
                 particle_dim: int | None) -> torch.Tensor | None:
    """The batch's score functions (unscaled), summed per particle and element."""
    kept = _kept_dims(layout, particle_dim)
    total = None
    for site in batch.score_sites:
        part = reduce_to_elements(site.score_function, kept)
        total = part if total is None else total + part
    return total


def _signal(batches, scores, log_w, dim) -> torch.Tensor:
    """The learning signal of the score sites: the loss's (VIMCO's) applied to log w."""
    for batch in batches:
        if batch.signal is not None:
            names = "+".join(dict.fromkeys(s.site for b in batches for s in b.score_sites))
            return batch.signal(ScoreSite(names, scores, frozenset(), True), log_w,
                                particle_dim=dim)
    return vimco_signal(log_w, dim)


def _scale_stopped_gradients(batches, log_w, dim, vectorized: bool) -> None:
    """DReG: the gradient arriving at each stopped sample is scaled by its particle's
    normalized weight (a tensor hook), once more than the log-mean-exp's own."""
    stopped = batches[0].plan.fact(DREG_SITES)
    if not stopped or not log_w.requires_grad:
        return
    factor = normalized_weights(log_w, dim)
    for k, batch in enumerate(batches):
        share = factor if vectorized else factor.select(dim, k)
        nodes = batch.ctx.guide_trace.nodes
        for name in stopped:
            site = nodes.get(name)
            if site is not None and site["value"].requires_grad:
                scale_gradient(site["value"], share, len(site["fn"].event_shape))


class ImportanceWeightedELBO(SiteTreatmentELBO):
    r"""The importance-weighted bound L_K (IWAE) as a Pyro loss.

    .. math::

        L_K = \mathbb{E}_{z_{1:K} \sim q}\Big[\log \frac1K \sum_{k=1}^K
              \frac{p(X, z_k)}{q(z_k)}\Big] \le \log p(X)

    (Burda, Grosse & Salakhutdinov 2015, arXiv:1509.00519), estimated from K particles drawn
    in one vectorized pass (Pyro's outermost ``pyro.plate("num_particles_vectorized", K)``,
    left of the model's plates; ``vectorize_particles=True``, the default) or one by one
    (``vectorize_particles=False``: a model that does not broadcast over a leading dimension,
    such as a network applied to sampled weights, or a tensor indexed by a sampled
    assignment).  Where every sample site of the model and the guide is inside a plate, the
    log-mean-exp is taken per element of the plate and summed (a tighter bound than the joint
    one); otherwise the weight is joint.

    The loss is the shared engine with two hooks: each guided site is treated as in the
    Jensen form with the whole gradient of ``-log q`` (:class:`~.treatments.JensenTreatment`
    with the ``"direct"`` entropy, or DReG's ``"path"`` entropy, ``-log q`` with q's
    parameters detached), so that a particle's terms add up to log w_k; and the combination
    :class:`LogMeanExpOverParticles` takes the log-mean-exp over particles.

    Gradient estimators (``estimator``):

    ``"iwae"``
        :math:`\sum_k \tilde w_k \nabla \log w_k`, the normalized-weight gradient, through the
        reparameterized samples.  Unbiased for dL_K.
    ``"dreg"``
        Doubly reparameterized (Tucker, Lawson, Gu & Maddison 2019, arXiv:1810.04152): the
        guide's parameters get :math:`\sum_k \tilde w_k^2\, \partial \log w_k/\partial z_k\,
        dz_k/d\phi` (log q with its parameters detached), the model's parameters the IWAE
        gradient :math:`\sum_k \tilde w_k \nabla_\theta \log p(X, z_k)`.  Unbiased for dL_K,
        and the guide's gradient is exactly zero for every draw when q = p(z | X).  It needs
        each site's q parameters to be separable from its sample (see :func:`dreg_sites`):
        for a hierarchical guide (a reparameterized site whose q depends on another
        reparameterized sample) it warns once and uses ``"iwae"``.  It is implemented with a
        gradient hook on each such sample: a loss built from the same sample tensors
        elsewhere in the same backward pass would see its gradient rescaled too.

    Guide sites without ``rsample`` (discrete) get, under either estimator, the score-function
    gradient with VIMCO's leave-one-out control variates (Mnih & Rezende 2016,
    arXiv:1602.06725): :math:`\sum_k \nabla \log q(z_k)\,(\hat L_K - \hat L_{-k})`, plus the
    direct gradient of log q inside log w.  With K = 1 the signal has no baseline.

    Scales and masks: a site's ``poutine.scale`` factor and mask apply to its log-density
    *inside* the weight (as in Pyro's ``RenyiELBO``).  The subsample scale N/B of a plate
    that holds every site is applied *outside* the log-mean-exp: the sum over a minibatch of
    the per-element bounds, times N/B, is unbiased for the full data's L_K (Pyro's
    ``RenyiELBO`` puts it inside, which is not).  A subsampled plate that some site is
    outside of is refused when K > 1 (the minibatch's joint log-mean-exp is biased upward
    and is not a bound).

    Traces: the guide is run and the model replayed against it (sample sites only); a
    :class:`~pyro.infer.autoguide.GuideMessenger` guide (``AutoNormalMessenger``, ...) runs
    the model itself, as in Pyro's ``get_importance_trace``.  Auxiliary guide sites (guide
    only, e.g. an AutoGuide's ``_latent``) contribute -log q to log w and the ``Delta`` sites
    their ``log_density``, as in ``RenyiELBO``.  Under ``pyro.infer.util.is_validation_enabled()``
    the traces are checked as for every loss here (:func:`~.tracing.validate_traces`: Pyro's
    ``check_model_guide_match`` and ``check_site_shape``, and our stricter checks), and a
    non-finite estimate warns.  A model latent that the guide does not sample is always an
    error.  Which guide sites get the score-function (VIMCO) term comes from Pyro's
    ``score_parts``, as for the other losses: a rejection-sampled site gets one too.

    The VIMCO baseline is its own (a log-sum-exp with one weight replaced by the others'
    geometric mean), not :class:`~pyro_elbo_ext.elbos.baselines.LeaveOneOutBaseline`'s mean
    of the other particles' rewards: the signal it centres is the bound itself.  It is this
    loss's learning signal (:class:`VIMCOSignal`, stateless).

    Parameters
    ----------
    num_particles : int
        K >= 1 (K = 1 is the ordinary ELBO, and DReG is then the path-derivative estimator).
    estimator : {"iwae", "dreg"}
    max_plate_nesting : int
        The number of plates the model nests (without the particle plate); guessed from one
        run of model and guide when not given, as Pyro's ELBO does (the attribute then
        counts the particle plate too, as Pyro's does, when K > 1 particles are vectorized).
    jit : bool
        Compute :meth:`differentiable_loss` (and so :meth:`loss_and_grads`) with one compiled
        graph of the loss and its gradient (Inductor; see :mod:`pyro_elbo_ext.compiled`), as
        every loss here does.  ``estimator="iwae"`` only: DReG's gradient hook is not kept by
        a traced graph.
    vectorize_particles : bool
        Draw the K particles in one vectorized pass (default) or one by one.  Sequential
        particles take the log-mean-exp of the K runs' weights; with a subsampled plate they
        are refused (each run would draw its own minibatch).  Where vectorizing breaks the
        model (a shape error inside the particle plate), the error says so and names this
        option.
    **kwargs
        Forwarded to :class:`pyro.infer.elbo.ELBO` (``retain_graph``, ...).

    Examples
    --------
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
    ...                      loss=ImportanceWeightedELBO(num_particles=8, estimator="dreg"),
    ...                      )  # doctest: +SKIP
    """


    combination = LOG_MEAN_EXP

    def __init__(self, num_particles: int = 5, estimator: str = "iwae", jit: bool = False,
                 vectorize_particles: bool = True, **kwargs):
        estimator = check_choice("estimator", estimator, IW_ESTIMATORS)
        if jit and estimator == "dreg":
            raise ValueError(
                "ImportanceWeightedELBO(estimator='dreg') cannot be compiled (jit=True): its "
                "gradient is rescaled by a tensor hook, which a traced graph does not keep; "
                "use jit=False, or estimator='iwae' with jit=True"
            )
        super().__init__(num_particles=num_particles, jit=jit,
                         vectorize_particles=vectorize_particles, **kwargs)
        self.estimator = estimator
        #: VIMCO's control variates for the guide's score-function sites
        self.learning_signal = LearningSignal(VIMCOSignal())

    def _discrete_support(self):
        return (("reinforce",), type(self).__name__,
                "the gradient of L_K at a discrete site is VIMCO's leave-one-out score term, "
                "which 'reinforce' selects; the other estimators' L_K forms are not "
                "implemented")

    def treat(self, site: SiteView, planning: Planning) -> Treatment:
        """A guide site's part of log w: ``log p(z | parents)`` (a model latent) and
        ``-log q(z)`` with its whole gradient, or DReG's ``-log q`` with q's parameters
        detached (the path entropy) where DReG applies."""
        planning.fact(LAYOUT, lambda: weight_layout(
            planning.model_trace, planning.guide_trace, self.num_particles,
            sequential=self._particle_dim is None))
        if site.role not in (GUIDED, AUXILIARY):
            return super().treat(site, planning)
        fn = site.guide_site["fn"]
        stopped = self.estimator == "dreg" and site.name in (
            planning.fact(DREG_SITES, lambda: self._dreg_sites(planning)) or ())
        treatment = JensenTreatment if site.role == GUIDED else EntropyTreatment
        return treatment("path" if stopped else "direct", gradient_kind(fn))

    def _dreg_sites(self, planning: Planning) -> tuple[str, ...] | None:
        """DReG's stopped sites for this structure (an autograd walk: without a gradient
        graph, no decision, and the plan is provisional; a fallback warns once per plan)."""
        if not torch.is_grad_enabled():
            planning.provisional = True
            return None
        sites, reason = dreg_sites(planning.guide_trace)
        if sites is None:
            warnings.warn(
                f"ImportanceWeightedELBO(estimator='dreg'): {reason}; DReG does not apply and "
                "the IWAE gradient is used for this guide",
                stacklevel=2,
            )
        return sites

    def compile_refusal(self, model, guide) -> str | None:
        if self.estimator == "dreg":
            return ("ImportanceWeightedELBO(estimator='dreg'): its gradient is rescaled by a "
                    "tensor hook, which a traced graph does not keep (the compiled gradient "
                    "would be wrong). Use pyro.infer.SVI for DReG, or estimator='iwae'")
        return None


__all__ = [
    "IW_ESTIMATORS",
    "LOG_MEAN_EXP",
    "ImportanceWeightedDecomposition",
    "ImportanceWeightedELBO",
    "LogMeanExpOverParticles",
    "VIMCOSignal",
]
