r"""AnalyticKLELBO: L = E_q[log p(X | Z)] - KL[q(Z) || p(Z)], with a closed-form KL where valid.

The closed forms are in :mod:`.kl` and the treatment in :mod:`.treatments`
(:class:`~.treatments.KLTreatment`); the dependency analysis that decides where a closed form
is valid is in :mod:`.dependencies`.  This module is the loss: its choice per site and its KL
weight (:class:`KLWeighting`).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.util import is_validation_enabled

from .base import SiteTreatmentELBO
from .densities import gradient_kind
from .dependencies import auxiliary_feeds, late_parents
from .graphs import is_delta
from .kl import analytic_kl
from .plan import AUXILIARY, GUIDED, PlanFact, Planning, SiteView, Treatment
from .sites import is_latent_site
from .tracing import graph_tracing
from .treatments import KLTreatment, Weighted
from .validation import check_choice, check_number

#: what to do with a site whose analytic KL would be biased (see ``AnalyticKLELBO``)
DEPENDENCY_VIOLATION_ACTIONS = ("fallback", "raise")

KLWeight = float | Callable[[int], float]

#: the latents whose model parents the guide samples later: ``{site: (late parents...)}``
LATE_PARENTS: PlanFact[dict[str, tuple[str, ...]]] = PlanFact("late parents")
#: per auxiliary guide site, whether its entropy takes the KL weight
AUXILIARY_WEIGHTED: PlanFact[dict[str, bool]] = PlanFact("auxiliary sites weighted")
#: ``kl_sites`` checked against the guided latents of the structure (``None``)
KL_SITES_CHECKED: PlanFact[None] = PlanFact("kl_sites checked")


@dataclass(frozen=True)
class KLWeighting:
    """The KL weight option: a number >= 0 or a schedule ``weight(step) -> number``, and the
    latent sites it applies to (``None``: all)."""

    weight: KLWeight = 1.0
    sites: frozenset[str] | None = None

    def __post_init__(self):
        if not callable(self.weight):
            object.__setattr__(self, "weight", check_number("kl_weight", self.weight, low=0.0))
        object.__setattr__(self, "sites", _check_kl_sites(self.sites))

    @property
    def scheduled(self) -> bool:
        return callable(self.weight)

    @property
    def trivial(self) -> bool:
        """A constant weight of 1: L itself."""
        return not self.scheduled and self.weight == 1.0

    def at(self, step: int) -> float:
        """The weight at ``step`` (a schedule's value checked: a number >= 0)."""
        if not self.scheduled:
            return self.weight
        return check_number(f"kl_weight({step})", self.weight(step), low=0.0)

    def applies_to(self, site: str) -> bool:
        return self.sites is None or site in self.sites


class AnalyticKLELBO(SiteTreatmentELBO):
    r"""The evidence lower bound in its KL form, with a closed-form KL wherever it is valid.

    .. math::

        L = \mathbb{E}_{q(Z)}[\log p(X \mid Z)] - \mathrm{KL}[q(Z) \,\|\, p(Z)]
          = \mathbb{E}_{q(Z)}[\log p(X \mid Z)]
            - \sum_i \mathbb{E}_{q(z_{<i})}\,
              \mathrm{KL}[q(z_i \mid z_{<i}) \,\|\, p(z_i \mid \mathrm{pa}(z_i))]

    where :math:`z_{<i}` are the latents the guide samples before :math:`z_i` (the chain rule
    of KL).  Each latent site contributes the term ``-KL`` of kind ``"kl"``:

    - computed in closed form by :func:`torch.distributions.kl_divergence` (torch's and Pyro's
      registrations: Normal, MultivariateNormal, Beta, Gamma, Dirichlet, Categorical,
      Bernoulli, ``Independent`` / ``to_event``, ...; see :func:`analytic_kl` for masked and
      expanded distributions), with the site's plate scale and mask applied, when the pair
      has one and the model and guide site share scale and mask (Kingma & Welling 2013,
      arXiv:1312.6114, appendix B);
    - otherwise the one-sample Monte Carlo term ``log p(z_i | ...) - log q(z_i | ...)``
      (flagged ``analytic=False`` in :meth:`decompose`).  A ``Delta`` guide site (the sites
      of ``AutoNormal``, ``AutoDiagonalNormal``, ``AutoDelta``) always takes this term: it is
      exact given the guide's upstream samples, and it keeps the ``log_density`` (the
      log-Jacobian of the autoguide's transform) that the registered ``KL(Delta, p)``
      leaves out.

    **AutoGuides get no analytic KL; their KL is estimated by Monte Carlo.**  ``AutoNormal``,
    ``AutoDiagonalNormal``, ``AutoMultivariateNormal`` sample an *auxiliary* latent ``u``
    (``infer={"is_auxiliary": True}``, a site the model does not have) and give each model
    latent a ``Delta`` site at ``z = T(u)`` with log-density :math:`\log|du/dz|`.  Since
    :math:`\log q(z) = \log q(u) + \log|du/dz|`, the KL of the latents that ``u`` feeds is

    .. math::

        \mathrm{KL}[q(z) \,\|\, p(z)]
          = \mathbb{E}_q\Big[\sum_{i \in \mathrm{fed}(u)}
              (\log|du/dz_i| - \log p(z_i \mid \ldots))\Big] - H[q(u)]

    and :meth:`decompose` shows it in two parts: each latent's ``"kl"`` term (the Monte Carlo
    ``log q_Delta - log p``, **not** a KL by itself) and the auxiliary site's ``"entropy"``
    term (H[q(u)], analytic where ``entropy()`` exists); a note says so.  The KL weight
    multiplies both parts, so the weighted objective is the one stated below.  With
    ``kl_sites`` naming some latents, the auxiliary sites are mapped to the latents they feed
    (once per plan, by provenance through a replay of the guide,
    :func:`auxiliary_children`): an auxiliary site feeding only weighted latents has its
    entropy weighted, one feeding none of them keeps weight 1, and one feeding both kinds
    (``AutoDiagonalNormal``'s joint latent when ``kl_sites`` names a strict subset) raises a
    ``ValueError`` naming it, since its entropy cannot be split between the latents; use
    ``kl_sites=None``, or ``AutoNormal`` (one auxiliary site per latent).

    **Validity.**  The closed form integrates :math:`z_i` out with everything it is
    conditioned on held fixed, so it is correct only when the model's parents
    :math:`\mathrm{pa}(z_i)` are sampled *before* :math:`z_i` in the guide.  That condition is
    checked from the actual dependencies, not from site order: the model is replayed once
    against a guide trace with every latent sample tracked by provenance
    (:func:`~pyro_elbo_ext.elbos.dependencies.model_parents`), and each site is decided once
    per plan.  A plan is keyed by the model and guide objects, the signature of their
    arguments (tensor shapes and dtypes, plain values) and the trace structure, so a
    decision made for one model or one argument value is never reused for another (a
    dependency that depends on tensor *values* through Python control flow is not seen).
    A guide such as ``q(z1) q(z2 | z1)`` for
    ``p(z1) p(z2 | z1)`` keeps the analytic path; one that samples ``z2`` before ``z1``
    violates it for ``z2``.  A violating site **falls back to the Monte Carlo term** (which is
    unbiased for any guide) and, under ``pyro.infer.util.is_validation_enabled()``, a
    ``UserWarning`` names it and the samples it depends on;
    ``on_dependency_violation="raise"`` raises a ``ValueError`` instead.  The analysis runs
    whether or not validation is on, because it decides a treatment, but only once per
    structure.  If the provenance replay fails, every latent that precedes a site in the model
    is treated as its parent (conservative) and a warning says so.

    **Discrete guide sites** (no ``rsample``), which Pyro's ``TraceMeanField_ELBO`` refuses, are
    supported.  Their own KL's value is in closed form; its gradient through q's parameters and
    the rest of L reach them through the score-function surrogate
    ``log q(z_j) * stop_grad(reward_j)``, whose reward holds the site's own
    ``log p(z_j) - log q(z_j)`` (the sampled form of its KL, constant at the posterior) and
    the terms of L that the data flow says may depend on :math:`z_j`: the KL of every later
    site that reads it, in closed form (its sample integrated out), and the log-likelihoods
    behind it (:mod:`~pyro_elbo_ext.elbos.downstream`; Ranganath, Gerrish & Blei 2014,
    arXiv:1401.0118).  The terms left out do not depend on :math:`z_j`, so their product with
    the score has expectation zero: the surrogate is unbiased for dL.  Pyro's per-site
    baselines (``infer={"baseline": {...}}``) apply, as for ``TraceGraph_ELBO``
    (:mod:`~pyro_elbo_ext.elbos.site_baselines`).

    **KL weight.**  With ``kl_weight`` = w (a number, or a callable of the step count, e.g. a
    warm-up ramp; Bowman et al. 2015, arXiv:1511.06349; Sønderby et al. 2016,
    arXiv:1602.02282; beta-VAE: Higgins et al. 2017, Burgess et al. 2018, arXiv:1804.03599)
    the objective is ``E_q[log p(X | Z)] - w * KL`` (for the sites in ``kl_sites``, all
    latents by default), in its value and in its gradient: each weighted site's treatment is
    :class:`~.treatments.Weighted` around :class:`~.treatments.KLTreatment`, reading the
    step's ``"kl_weight"`` setting.  For w < 1 it is **no longer a
    lower bound** on log p(X) (it can exceed it; at w = 0 it is the expected log-likelihood);
    for w > 1 it is a looser bound than L; either way its maximizer is in general not the q
    closest to the posterior.  The step count (``step_count``) advances once per
    :meth:`differentiable_loss` / :meth:`loss_and_grads` call (one SVI step); :meth:`loss` and
    :meth:`decompose` evaluate at the current count without advancing it.  The count is
    saved by :meth:`state_dict`.

    Parameters
    ----------
    num_particles : int
        Samples per estimate.
    kl_weight : float or callable
        A number >= 0, or ``kl_weight(step) -> float`` returning one (checked at each step).
    kl_sites : iterable of str, optional
        Limit the weight to these latent sites (others keep weight 1).  A name that is not a
        latent sampled by both model and guide raises a ``ValueError`` (validation or not);
        so does an auxiliary guide site that feeds both named and unnamed latents.
    on_dependency_violation : {"fallback", "raise"}
        What to do with a site whose analytic KL would be biased.
    **kwargs
        Forwarded to :class:`SiteTreatmentELBO` and :class:`pyro.infer.elbo.ELBO`
        (``vectorize_particles``, ``max_plate_nesting``, ``retain_graph``, ``jit``, ...).
        ``jit=True`` (and :class:`~pyro_elbo_ext.CompiledSVI`) read a schedule's weight as a
        graph input, refreshed at every step (:meth:`step_inputs`).

    Examples
    --------
    >>> warm_up = lambda step: min(1.0, step / 1000)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}),
    ...                      loss=AnalyticKLELBO(kl_weight=warm_up))      # doctest: +SKIP
    """

    def __init__(
        self,
        num_particles: int = 1,
        kl_weight: KLWeight = 1.0,
        kl_sites: Iterable[str] | None = None,
        on_dependency_violation: str = "fallback",
        **kwargs,
    ):
        super().__init__(num_particles=num_particles, **kwargs)
        self.weighting = KLWeighting(kl_weight, kl_sites)
        self.on_dependency_violation = check_choice(
            "on_dependency_violation", on_dependency_violation, DEPENDENCY_VIOLATION_ACTIONS
        )
        #: a schedule's weight at the current step, a 0-dim tensor refreshed in place: the
        #: value a compiled graph reads as an input (see :meth:`step_inputs`)
        self._scheduled_weight = (torch.zeros((), dtype=torch.float64)
                                  if self.weighting.scheduled else None)

    @property
    def kl_weight(self) -> KLWeight:
        return self.weighting.weight

    @property
    def kl_sites(self) -> frozenset[str] | None:
        return self.weighting.sites

    # ------------------------------------------------------------------ the treatment
    def treat(self, site: SiteView, planning: Planning) -> Treatment:
        """Guided latents: -KL (closed form where valid), weighted where ``kl_sites`` says;
        auxiliary sites: their entropy, weighted where they feed weighted latents."""
        if site.role == AUXILIARY:
            inner = super().treat(site, planning)
            weighted = self.weighting.sites is None or planning.fact(
                AUXILIARY_WEIGHTED, lambda: self._weigh_auxiliary(planning))[site.name]
            return self._weighted(inner, weighted)
        if site.role != GUIDED:
            return super().treat(site, planning)
        planning.fact(KL_SITES_CHECKED, lambda: self._check_kl_sites_exist(planning))
        late = planning.fact(LATE_PARENTS, lambda: self._late_parents(planning))
        model_fn, guide_fn = site.model_site["fn"], site.guide_site["fn"]
        analytic = (site.name not in late and not is_delta(guide_fn)
                    and _kl_registered(guide_fn, model_fn))
        kl = KLTreatment(analytic, gradient_kind(guide_fn))
        return self._weighted(kl, self.weighting.applies_to(site.name))

    def _weighted(self, treatment: Treatment, weighted: bool) -> Treatment:
        if not weighted or self.weighting.trivial:
            return treatment
        return Weighted(treatment, "kl_weight")

    # ------------------------------------------------------------------ the weight
    def step_settings(self, training: bool) -> dict:
        """This call's KL weight, that of the current step (the count advances after a
        training call): a schedule's is the tensor :meth:`step_inputs` holds, written here for
        the current step (a compiled call reads it as a graph input instead)."""
        if self._scheduled_weight is None:
            return {"kl_weight": self.weighting.weight}
        if not graph_tracing():  # traced, the tensor is a graph input: its value is the caller's
            self.prepare_step_inputs()
        return {"kl_weight": self._scheduled_weight}

    def step_inputs(self) -> tuple[torch.Tensor, ...]:
        """``(w,)``, the schedule's weight at the current step; ``()`` for a constant weight."""
        return () if self._scheduled_weight is None else (self._scheduled_weight,)

    def prepare_step_inputs(self) -> None:
        if self._scheduled_weight is not None:
            self._scheduled_weight.fill_(self.weighting.at(self.step_count))

    def state_dict(self) -> dict:
        """The estimator's state: ``{"step_count": int}`` (the schedule position), and the
        per-site baselines' where a site has them."""
        return {"step_count": self.step_count, **super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (e.g. to resume a KL warm-up from a checkpoint)."""
        step = state.get("step_count") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(
                "state must be a dict with an integer 'step_count' >= 0 (as returned by "
                f"AnalyticKLELBO.state_dict()), got {state!r}"
            )
        self.step_count = int(step)
        super().load_state_dict({k: v for k, v in state.items() if k != "step_count"})

    # ------------------------------------------------------------------ planning facts
    def _late_parents(self, planning: Planning) -> dict[str, tuple[str, ...]]:
        """The sites whose model distribution depends on a later guide sample (raise or warn)."""
        late = late_parents(self._as_traced(planning.model), planning.model_trace,
                            planning.guide_trace, planning.args, planning.kwargs,
                            type(self).__name__)
        if late:
            self._report_violations(late)
        return late

    def _report_violations(self, late: dict[str, tuple[str, ...]]) -> None:
        listing = "; ".join(
            f"'{name}' (its model distribution depends on {', '.join(map(repr, parents))})"
            for name, parents in late.items()
        )
        advice = (
            "sample those latents before the site in the guide (or condition the guide the "
            "same way the model is ordered)"
        )
        if self.on_dependency_violation == "raise":
            raise ValueError(
                f"{type(self).__name__}: the analytic KL is invalid for {listing}, which the "
                f"guide samples later; {advice}, or pass "
                "on_dependency_violation='fallback' to use the Monte Carlo term there"
            )
        if is_validation_enabled():
            warnings.warn(
                f"{type(self).__name__}: using the Monte Carlo KL term for {listing}, "
                f"which the guide samples later; to keep the analytic KL, {advice}",
                stacklevel=2,
            )

    def _check_kl_sites_exist(self, planning: Planning) -> None:
        """Once per plan, validation or not: every name in ``kl_sites`` is a guided latent."""
        if self.weighting.sites is None:
            return
        guide_nodes = planning.guide_trace.nodes
        latents = {name for name, site in planning.model_trace.nodes.items()
                   if is_latent_site(site) and name in guide_nodes}
        unknown = sorted(self.weighting.sites - latents)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: kl_sites names {unknown}, which are not latent "
                f"sites sampled by both the model and the guide (those are {sorted(latents)}); "
                "fix the names"
            )

    def _weigh_auxiliary(self, planning: Planning) -> dict[str, bool]:
        """Which auxiliary sites' entropies take the KL weight (see the class docstring)."""
        feeds = auxiliary_feeds(self._as_traced(planning.guide), planning.model_trace,
                                planning.guide_trace, planning.args, planning.kwargs,
                                type(self).__name__)
        weighted: dict[str, bool] = {}
        for name, fed in feeds.items():
            inside = sorted(fed & self.weighting.sites)
            outside = sorted(fed - self.weighting.sites)
            if inside and outside:
                raise ValueError(
                    f"{type(self).__name__}: kl_sites weights {inside} but not {outside}, and "
                    f"the guide's auxiliary site {name!r} feeds all of them (an AutoGuide's "
                    "joint latent couples its sites' KL, which cannot be split between them); "
                    "use kl_sites=None (weight every latent), list every site the auxiliary "
                    "site feeds, or use a guide with one auxiliary site per latent "
                    "(e.g. AutoNormal)"
                )
            weighted[name] = bool(inside)
        return weighted


def _kl_registered(q, p) -> bool:
    """Whether a closed-form KL exists for the pair's types (masked pairs: tried per step)."""
    if isinstance(q, MaskedDistribution) or isinstance(p, MaskedDistribution):
        return True
    try:
        analytic_kl(q, p)
    except NotImplementedError:
        return False
    return True


def _check_kl_sites(kl_sites) -> frozenset[str] | None:
    """``kl_sites`` as a frozenset of names (a single name allowed), or a ValueError."""
    if kl_sites is None:
        return None
    if isinstance(kl_sites, str):
        kl_sites = (kl_sites,)
    try:
        names = frozenset(kl_sites)
    except TypeError:
        raise ValueError(
            f"kl_sites must be None or an iterable of site names, got {kl_sites!r}"
        ) from None
    bad = [name for name in names if not isinstance(name, str)]
    if bad:
        raise ValueError(f"kl_sites must name sites by their (string) names, got {bad!r}")
    return names


__all__ = ["DEPENDENCY_VIOLATION_ACTIONS", "AnalyticKLELBO", "KLWeighting"]
