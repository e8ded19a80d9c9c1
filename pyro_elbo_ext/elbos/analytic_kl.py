"""AnalyticKLELBO: L = E_q[log p(X | Z)] - KL[q(Z) || p(Z)], with a closed-form KL where valid.

The closed forms are in :mod:`.kl`, the dependency analysis that decides where they are valid in
:mod:`.dependencies`; this module is the loss: its treatment of a site and its KL weight.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.infer.util import is_validation_enabled

from .base import SiteTreatmentELBO
from .densities import (
    PATHWISE,
    SCORE_FUNCTION,
    entropy_term,
    estimator_kind,
    log_density,
    scaled_and_masked,
)
from .dependencies import auxiliary_children, model_parents, preceding_latents
from .engine import Term
from .kl import analytic_kl, same_value
from .plan import AUXILIARY, GUIDED, Planning, SiteView, Treatment
from .sites import is_latent_site, plate_frames
from .tracing import graph_tracing
from .treatments import is_delta, stop_gradient
from .validation import check_choice, check_number

#: what to do with a site whose analytic KL would be biased (see ``AnalyticKLELBO``)
DEPENDENCY_VIOLATION_ACTIONS = ("fallback", "raise")

KLWeight = float | Callable[[int], float]


# ---------------------------------------------------------------------------- the loss
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
    latents by default), in its value and in its gradient.  For w < 1 it is **no longer a
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
        if not callable(kl_weight):
            kl_weight = check_number("kl_weight", kl_weight, low=0.0)
        self.kl_weight = kl_weight
        #: a schedule's weight at the current step, a 0-dim tensor refreshed in place: the
        #: value a compiled graph reads as an input (see :meth:`step_inputs`)
        self._scheduled_weight = torch.zeros((), dtype=torch.float64) if callable(
            kl_weight) else None
        self.kl_sites = _check_kl_sites(kl_sites)
        self.on_dependency_violation = check_choice(
            "on_dependency_violation", on_dependency_violation, DEPENDENCY_VIOLATION_ACTIONS
        )

    # ------------------------------------------------------------------ the weight and its state
    def _weight_at(self, step: int) -> float:
        if not callable(self.kl_weight):
            return self.kl_weight
        return check_number(f"kl_weight({step})", self.kl_weight(step), low=0.0)

    def _step_settings(self, training: bool) -> KLStep:
        """This call's KL weight: that of the current step (the count advances after a
        training call).  A schedule's weight is the tensor :meth:`step_inputs` holds, written
        here for the current step (a compiled call reads it as a graph input instead)."""
        if self._scheduled_weight is None:
            return KLStep(self.kl_weight, self.step_count)
        if not graph_tracing():  # traced, the tensor is a graph input: its value is the caller's
            self.prepare_step_inputs()
        return KLStep(self._scheduled_weight, self.step_count)

    def step_inputs(self) -> tuple[torch.Tensor, ...]:
        """``(w,)``, the schedule's weight at the current step; ``()`` for a constant weight."""
        return () if self._scheduled_weight is None else (self._scheduled_weight,)

    def prepare_step_inputs(self) -> None:
        if self._scheduled_weight is not None:
            self._scheduled_weight.fill_(self._weight_at(self.step_count))

    def state_dict(self) -> dict:
        """The estimator's state: ``{"step_count": int}`` (the schedule position)."""
        return self._with_site_baselines({"step_count": self.step_count})

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (e.g. to resume a KL warm-up from a checkpoint)."""
        state = self._restore_site_baselines(state)
        step = state.get("step_count") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(
                "state must be a dict with an integer 'step_count' >= 0 (as returned by "
                f"AnalyticKLELBO.state_dict()), got {state!r}"
            )
        self.step_count = int(step)

    # ------------------------------------------------------------------ the treatment
    def _treat(self, site: SiteView, planning: Planning) -> Treatment:
        if site.role == AUXILIARY:
            planning.memo.setdefault("auxiliary", []).append(site.name)
            weighted = self.kl_sites is None or planning.fact(
                "auxiliary_weighted", lambda: self._weigh_auxiliary(planning)
            ).get(site.name, False)
            return WeightedTreatment(super()._treat(site, planning), weighted)
        if site.role != GUIDED:
            return super()._treat(site, planning)
        planning.fact("kl_sites_checked", lambda: self._check_kl_sites_exist(planning))
        violations = planning.fact("violations", lambda: self._violations(planning))
        model_fn, guide_fn = site.model_site["fn"], site.guide_site["fn"]
        return KLTreatment(
            analytic=site.name not in violations and not is_delta(guide_fn)
            and _kl_registered(guide_fn, model_fn),
            weighted=self.kl_sites is None or site.name in self.kl_sites,
            guide_estimator=estimator_kind(guide_fn),
        )

    # ------------------------------------------------------------------ planning facts
    def _violations(self, planning: Planning) -> dict[str, tuple[str, ...]]:
        """The sites whose model distribution depends on a later guide sample (raise or warn)."""
        model_trace, guide_trace = planning.model_trace, planning.guide_trace
        try:
            parents = model_parents(self._as_traced(planning.model), guide_trace,
                                    planning.args, planning.kwargs)
        except Exception as error:  # noqa: BLE001 - any failure: the conservative rule
            parents = preceding_latents(model_trace)
            warnings.warn(
                f"{type(self).__name__}: could not trace the model's dependencies "
                f"({type(error).__name__}: {error}); treating every latent that precedes a "
                "site in the model as its parent",
                stacklevel=2,
            )
        order = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"]
        position = {name: i for i, name in enumerate(order)}
        violations: dict[str, tuple[str, ...]] = {}
        for name, site in model_trace.nodes.items():
            if not is_latent_site(site) or name not in position:
                continue
            late = tuple(sorted(p for p in parents.get(name, ())
                                if position.get(p, -1) > position[name]))
            if late:
                violations[name] = late
        if violations:
            self._report_violations(violations)
        return violations

    def _report_violations(self, violations: dict[str, tuple[str, ...]]) -> None:
        listing = "; ".join(
            f"'{name}' (its model distribution depends on {', '.join(map(repr, late))})"
            for name, late in violations.items()
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

    def _guided_latents(self, planning: Planning) -> set[str]:
        guide_nodes = planning.guide_trace.nodes
        return {name for name, site in planning.model_trace.nodes.items()
                if is_latent_site(site) and name in guide_nodes}

    def _check_kl_sites_exist(self, planning: Planning) -> None:
        """Once per plan, validation or not: every name in ``kl_sites`` is a guided latent."""
        if self.kl_sites is None:
            return
        latents = self._guided_latents(planning)
        unknown = sorted(self.kl_sites - latents)
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: kl_sites names {unknown}, which are not latent "
                f"sites sampled by both the model and the guide (those are {sorted(latents)}); "
                "fix the names"
            )

    def _weigh_auxiliary(self, planning: Planning) -> dict[str, bool]:
        """Which auxiliary sites' entropies take the KL weight (see the class docstring)."""
        guide_trace = planning.guide_trace
        auxiliary = [name for name, site in guide_trace.nodes.items()
                     if site["type"] == "sample" and name not in planning.model_trace.nodes]
        latents = self._guided_latents(planning)
        try:
            children = auxiliary_children(self._as_traced(planning.guide), guide_trace,
                                          auxiliary, planning.args, planning.kwargs)
        except Exception as error:  # noqa: BLE001 - conservative: it may feed every latent
            children = {name: frozenset(latents) for name in auxiliary}
            warnings.warn(
                f"{type(self).__name__}: could not trace which sites the guide's auxiliary "
                f"sites feed ({type(error).__name__}: {error}); assuming each feeds every "
                "latent",
                stacklevel=2,
            )
        weighted: dict[str, bool] = {}
        for name in auxiliary:
            fed = children.get(name, frozenset()) & latents
            inside, outside = sorted(fed & self.kl_sites), sorted(fed - self.kl_sites)
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

    # ------------------------------------------------------------------ decomposition notes
    def _decomposition_notes(self, settings: KLStep, plans) -> tuple[str, ...]:
        facts = plans[0].facts if plans else {}
        return self._weight_notes(settings, plans) + _auxiliary_notes(facts.get("auxiliary"))

    def _weight_notes(self, settings: KLStep, plans) -> tuple[str, ...]:
        if not callable(self.kl_weight) and self.kl_weight == 1.0:
            return ()
        if not any(isinstance(site.treatment, (KLTreatment, WeightedTreatment))
                   and site.treatment.weighted for plan in plans for site in plan.sites):
            return ()  # kl_sites names no site of this model: L itself
        w = float(settings.weight)
        which = (
            "every latent site"
            if self.kl_sites is None
            else "sites " + ", ".join(repr(s) for s in sorted(self.kl_sites))
        )
        schedule = (f" (a schedule, at step {settings.step})" if callable(self.kl_weight)
                    else "")
        if w == 1.0:
            return (
                f"kl_weight{schedule} is 1 here, so this is L; at other steps the objective "
                "is E[log p(X|Z)] - w KL, which is not L and, for w < 1, not a lower bound "
                "on log p(X)",
            )
        bound = (
            "NOT a lower bound on log p(X) in general (it can exceed it)"
            if w < 1
            else "a looser lower bound than L"
        )
        return (
            f"kl_weight = {w:g}{schedule} multiplies the KL of {which}: the value is "
            f"E[log p(X|Z)] - {w:g} KL, {bound}; the 'kl' terms shown (and the 'entropy' "
            "terms of auxiliary guide sites feeding those latents) are weighted",
        )


class KLStep(NamedTuple):
    """AnalyticKLELBO's settings for one call: the KL weight and the step it belongs to."""

    weight: float
    step: int


@dataclass(frozen=True)
class KLTreatment(Treatment):
    """``-w KL[q(z | ...) || p(z | parents)]``: closed form where ``analytic`` and the model and
    guide sites share scale and mask at this step, else the Monte Carlo ``log p - log q``."""

    analytic: bool
    weighted: bool
    guide_estimator: str

    def terms(self, ctx, model_site, guide_site):
        name = model_site["name"]
        weight = ctx.settings.weight if self.weighted else 1.0
        unweighted = _is_one(weight)
        frames = plate_frames(model_site)
        kl = _closed_form_kl(model_site, guide_site) if self.analytic else None
        if kl is not None and self.guide_estimator != SCORE_FUNCTION:
            value = scaled_and_masked(guide_site, kl)
            contribution = -value if unweighted else -weight * value
            return [Term(name, "kl", contribution, contribution, frames, analytic=True)]
        log_p = scaled_and_masked(model_site, log_density(model_site))
        log_q = scaled_and_masked(guide_site, log_density(guide_site))
        if kl is not None:  # a score-function site: its own score meets log p - log q
            value = -scaled_and_masked(guide_site, kl)
            stopped = analytic_kl(stop_gradient(guide_site["fn"]), model_site["fn"])
            pathwise = -scaled_and_masked(guide_site, stopped)  # p's side only
            sampled = log_p - log_q
            if not unweighted:
                value, pathwise, sampled = weight * value, weight * pathwise, weight * sampled
            return [Term(name, "kl", value, pathwise, frames, analytic=True, sampled=sampled)]
        contribution = log_p - log_q
        # the pathwise part of -log q is Pyro's entropy_term (none for a score-function
        # site, whose E_q[-log q] gradient comes from the score term alone)
        pathwise_q = entropy_term(guide_site, self.guide_estimator)
        if pathwise_q is None:
            pathwise = log_p
        elif self.guide_estimator == PATHWISE:
            pathwise = contribution
        else:
            pathwise = log_p - pathwise_q
        if not unweighted:
            contribution, pathwise = weight * contribution, weight * pathwise
        return [Term(name, "kl", contribution, pathwise, frames, analytic=False)]


@dataclass(frozen=True)
class WeightedTreatment(Treatment):
    """Another treatment's terms times this step's KL weight, where ``weighted``."""

    inner: Treatment
    weighted: bool

    def terms(self, ctx, model_site, guide_site):
        terms = self.inner.terms(ctx, model_site, guide_site)
        weight = ctx.settings.weight if self.weighted else 1.0
        if _is_one(weight):
            return terms
        out = []
        for term in terms:
            contribution = weight * term.contribution
            if term.pathwise is None:
                pathwise = None
            elif term.pathwise is term.contribution:
                pathwise = contribution
            else:
                pathwise = weight * term.pathwise
            sampled = None if term.sampled is None else weight * term.sampled
            out.append(Term(term.site, term.kind, contribution, pathwise, term.frames,
                            term.analytic, sampled))
        return out


def _is_one(weight) -> bool:
    """A constant weight of exactly 1 (a schedule's tensor weight is always applied: a graph
    must not branch on its value)."""
    return not isinstance(weight, torch.Tensor) and weight == 1.0


def _closed_form_kl(model_site: dict, guide_site: dict) -> torch.Tensor | None:
    """The site's unscaled closed-form KL, or None where scale or mask differ at this step
    (or the masks make the pair unregistered)."""
    if not (same_value(model_site["scale"], guide_site["scale"])
            and same_value(model_site["mask"], guide_site["mask"])):
        return None
    try:
        return analytic_kl(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None


def _kl_registered(q, p) -> bool:
    """Whether a closed-form KL exists for the pair's types (masked pairs: tried per step)."""
    if isinstance(q, MaskedDistribution) or isinstance(p, MaskedDistribution):
        return True
    try:
        analytic_kl(q, p)
    except NotImplementedError:
        return False
    return True


def _auxiliary_notes(auxiliary) -> tuple[str, ...]:
    if not auxiliary:
        return ()
    names = ", ".join(repr(s) for s in auxiliary)
    return (
        f"the guide has auxiliary sites ({names}; an AutoGuide's): the KL of the latents "
        "they feed is split between the 'entropy' term of each auxiliary site (analytic "
        "H[q_aux]) and the latents' 'kl' terms, which are Monte Carlo log q_Delta - log p "
        "(the Delta's log-density is the transform's log-Jacobian) and are not KLs "
        "themselves; the KL of those latents is sum('kl') - sum(auxiliary 'entropy')",
    )


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
