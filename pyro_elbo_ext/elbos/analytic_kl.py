"""AnalyticKLELBO: L = E_q[log p(X | Z)] - KL[q(Z) || p(Z)], with a closed-form KL where valid."""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from pyro.infer.util import is_validation_enabled
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger
from torch.distributions import Independent, kl_divergence

from .base import SiteTreatmentELBO
from .engine import Term, plate_frames
from .treatments import distribution_tensors, is_reparameterized, log_density, scaled
from .validation import is_subsample_site

#: what to do with a site whose analytic KL would be biased (see ``AnalyticKLELBO``)
DEPENDENCY_VIOLATION_ACTIONS = ("fallback", "raise")

#: how many trace structures (site names and guide order) keep a cached plan
_MAX_CACHED_PLANS = 32

KLWeight = float | Callable[[int], float]


# ---------------------------------------------------------------------------- closed-form KL
def analytic_kl(q, p) -> torch.Tensor:
    """KL[q || p] element by element over the broadcast batch shape of ``q`` and ``p``.

    Looks through the wrappers Pyro puts around distributions before asking
    :func:`torch.distributions.kl_divergence` (which holds torch's and Pyro's registrations):

    - ``MaskedDistribution`` (``fn.mask(m)``): allowed only when both sides carry the same
      mask; the KL is zero where the mask is false (where both log-densities are zero);
    - ``ExpandedDistribution`` (``fn.expand(shape)``): the KL of the base, broadcast;
    - ``Independent`` (``fn.to_event(n)``) on both sides: the shared reinterpreted
      dimensions are summed, the rest handled recursively.

    Parameters
    ----------
    q, p : torch.distributions.Distribution
        The guide's and the model's distribution of one site.

    Returns
    -------
    torch.Tensor
        Shaped ``torch.broadcast_shapes(q.batch_shape, p.batch_shape)``.

    Raises
    ------
    NotImplementedError
        When no closed form is registered for the pair (or the masks differ).
    """
    shape = torch.broadcast_shapes(q.batch_shape, p.batch_shape)
    q_masked, p_masked = isinstance(q, MaskedDistribution), isinstance(p, MaskedDistribution)
    if q_masked or p_masked:
        if not (q_masked and p_masked) or not _same_value(q._mask, p._mask):
            raise NotImplementedError("guide and model distributions carry different masks")
        kl = analytic_kl(q.base_dist, p.base_dist)
        mask = q._mask
        if mask is False:
            kl = torch.zeros_like(kl)
        elif mask is not True:
            kl = torch.where(mask, kl, kl.new_zeros(()))
    elif isinstance(q, ExpandedDistribution):
        kl = analytic_kl(q.base_dist, p)
    elif isinstance(p, ExpandedDistribution):
        kl = analytic_kl(q, p.base_dist)
    elif isinstance(q, Independent) and isinstance(p, Independent):
        nq, np_ = q.reinterpreted_batch_ndims, p.reinterpreted_batch_ndims
        shared = min(nq, np_)
        q_inner = Independent(q.base_dist, nq - shared) if nq > shared else q.base_dist
        p_inner = Independent(p.base_dist, np_ - shared) if np_ > shared else p.base_dist
        kl = analytic_kl(q_inner, p_inner)
        if shared:
            kl = kl.sum(tuple(range(-shared, 0)))
    else:
        kl = kl_divergence(q, p)
        if not torch.is_tensor(kl):
            kl = torch.as_tensor(kl)
    return kl if kl.shape == shape else kl.expand(shape)


def _same_value(a, b) -> bool:
    """Whether two scales or masks (numbers, bools, tensors or None) are equal.

    Evaluated at every step, not once per trace structure: a mask or scale is whatever tensor
    the model and guide compute on that call (a data-dependent ``poutine.mask``, a subsample's
    mask), so equal masks at one step say nothing about the next.  The identity check comes
    first, so the tensor comparison (and its device sync) only happens when the model and
    guide pass different tensor objects.
    """
    if a is b:
        return True
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool((a == b).all())
    if torch.is_tensor(a) or torch.is_tensor(b) or a is None or b is None:
        return False
    return a == b


def _structure(fn) -> tuple:
    """The wrapper/base types of a distribution: what decides whether a KL is registered."""
    types = []
    while fn is not None:
        types.append(type(fn))
        fn = getattr(fn, "base_dist", None)
    return tuple(types)


# ---------------------------------------------------------------------------- dependencies
class _TagLatentSamples(Messenger):
    """Makes every latent sample a ProvenanceTensor tagged with its own site name."""

    def _pyro_post_sample(self, msg):
        if msg["is_observed"] or is_subsample_site(msg):
            return
        msg["value"] = ProvenanceTensor(detach_provenance(msg["value"]), frozenset({msg["name"]}))


class _TagNamedSamples(Messenger):
    """Makes the samples of the named sites ProvenanceTensors tagged with their own names."""

    def __init__(self, names: frozenset[str]):
        super().__init__()
        self.names = names

    def _pyro_post_sample(self, msg):
        if msg["name"] in self.names:
            msg["value"] = ProvenanceTensor(
                detach_provenance(msg["value"]), frozenset({msg["name"]})
            )


def auxiliary_children(
    guide, guide_trace, auxiliary: Iterable[str], args, kwargs
) -> dict[str, frozenset[str]]:
    """For each auxiliary guide site, the other guide sample sites computed from its sample.

    An AutoGuide (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ...)
    samples auxiliary latents (``infer={"is_auxiliary": True}``) and gives each model latent a
    ``Delta`` site whose value is a transform of them; this finds which.  The guide is replayed
    once against ``guide_trace`` with the auxiliary samples tracked by provenance (as in
    :func:`model_parents`: no gradients, validation off, random state restored), and a site
    depends on an auxiliary sample when its distribution's tensors (a Delta's value and
    log-density) or its log-density carry that sample's name.
    """
    auxiliary = frozenset(auxiliary)
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        with _TagNamedSamples(auxiliary):
            trace = poutine.trace(poutine.replay(guide, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    children: dict[str, set[str]] = {name: set() for name in auxiliary}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in auxiliary or is_subsample_site(site):
            continue
        provenance = frozenset()
        for tensor in distribution_tensors(site["fn"]):
            provenance |= get_provenance(tensor)
        try:
            value = detach_provenance(site["value"])
            provenance |= get_provenance(site["fn"].log_prob(value))
        except Exception:  # noqa: BLE001 - the tensors above are then all we know
            pass
        for aux in provenance & auxiliary:
            children[aux].add(name)
    return {name: frozenset(sites) for name, sites in children.items()}


def model_parents(model, guide_trace, args, kwargs) -> dict[str, frozenset[str]]:
    """For each model latent, the latent sites its distribution's parameters are computed from.

    The model is replayed once against ``guide_trace`` with each latent sample wrapped in a
    :class:`pyro.ops.provenance.ProvenanceTensor` (provenance tracking: Wingate et al. 2011,
    "Nonstandard interpretations of probabilistic programs"), so that every tensor computed
    from a sample carries that sample's name.  Runs without gradients, with validation off and
    with the random state restored afterwards (it consumes no randomness of the caller).

    Dependencies through Python control flow or ``.item()`` are not seen.
    """
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        with _TagLatentSamples():
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    parents: dict[str, frozenset[str]] = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or is_subsample_site(site):
            continue
        provenance = frozenset()
        for tensor in distribution_tensors(site["fn"]):
            provenance |= get_provenance(tensor)
        try:  # parameters a distribution computes lazily show up in its log-density
            value = detach_provenance(site["value"])
            provenance |= get_provenance(site["fn"].log_prob(value))
        except Exception:  # noqa: BLE001 - the tensors above are then all we know
            pass
        parents[name] = provenance - {name}
    return parents


def _preceding_latents(model_trace) -> dict[str, frozenset[str]]:
    """The conservative parent sets: every latent that precedes a site in the model."""
    seen: list[str] = []
    out: dict[str, frozenset[str]] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"]:
            out[name] = frozenset(seen)
            seen.append(name)
    return out


@dataclass(frozen=True)
class _Plan:
    """Per-site decisions for one trace structure."""

    analytic_allowed: dict[str, bool]  # False: the model's p(z_i | ...) depends on a later sample
    violations: dict[str, tuple[str, ...]]  # site -> the later guide samples it depends on
    #: guide sample sites the model does not have (an AutoGuide's auxiliary latents)
    auxiliary: tuple[str, ...] = ()
    #: auxiliary site -> whether its entropy takes the KL weight (it feeds weighted sites only)
    auxiliary_weighted: dict[str, bool] | None = None


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
    (once per trace structure, by provenance through a replay of the guide,
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
    (:func:`model_parents`), and each site is decided once per trace structure (site names and
    guide order; the plan is cached).  A guide such as ``q(z1) q(z2 | z1)`` for
    ``p(z1) p(z2 | z1)`` keeps the analytic path; one that samples ``z2`` before ``z1``
    violates it for ``z2``.  A violating site **falls back to the Monte Carlo term** (which is
    unbiased for any guide) and, under ``pyro.infer.util.is_validation_enabled()``, a
    ``UserWarning`` names it and the samples it depends on;
    ``on_dependency_violation="raise"`` raises a ``ValueError`` instead.  The analysis runs
    whether or not validation is on, because it decides a treatment, but only once per
    structure.  If the provenance replay fails, every latent that precedes a site in the model
    is treated as its parent (conservative) and a warning says so.

    **Discrete guide sites** (no ``rsample``), which Pyro's ``TraceMeanField_ELBO`` refuses, are
    supported.  Their own KL is exact (its gradient is the gradient of the closed form); the
    rest of L reaches their parameters through the score-function surrogate
    ``log q(z_j) * stop_grad(cost_j)``, with ``cost_j`` Rao-Blackwellized by plates (Ranganath,
    Gerrish & Blei 2014, arXiv:1401.0118).  The cost contains the KL of every later site that
    depends on :math:`z_j`, which it must; it also contains terms that do not depend on
    :math:`z_j` (its own KL, a function of :math:`z_{<j}` only, and the KLs of earlier sites),
    whose product with the score has expectation zero given :math:`z_{<j}`.  The surrogate is
    therefore unbiased for dL.

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
        ``jit=True`` works with a constant ``kl_weight``; with a schedule it raises a
        ``ValueError`` (a compiled trace would freeze the weight).

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
            kl_weight = _check_weight(kl_weight)
        elif getattr(self, "jit", False):
            raise ValueError(
                "kl_weight is a schedule (a callable), which a compiled loss (jit=True) would "
                "freeze at its first value; use jit=False, or a constant kl_weight"
            )
        self.kl_weight = kl_weight
        if isinstance(kl_sites, str):
            kl_sites = (kl_sites,)
        self.kl_sites = None if kl_sites is None else frozenset(kl_sites)
        if on_dependency_violation not in DEPENDENCY_VIOLATION_ACTIONS:
            raise ValueError(
                f"on_dependency_violation must be one of {DEPENDENCY_VIOLATION_ACTIONS}, "
                f"got {on_dependency_violation!r}"
            )
        self.on_dependency_violation = on_dependency_violation
        #: optimization steps taken (calls of differentiable_loss / loss_and_grads)
        self.step_count = 0
        self._step_depth = 0
        self._weight = self._weight_at(0) if callable(kl_weight) else kl_weight
        self._plans: dict[tuple, _Plan] = {}
        self._plan: _Plan | None = None
        self._kl_registered: dict[tuple, bool] = {}

    # ------------------------------------------------------------------ the weight and its state
    def _weight_at(self, step: int) -> float:
        if not callable(self.kl_weight):
            return self.kl_weight
        return _check_weight(self.kl_weight(step), step)

    def _site_weight(self, name: str) -> float:
        if self.kl_sites is None or name in self.kl_sites:
            return self._weight
        return 1.0

    def state_dict(self) -> dict:
        """The estimator's state: ``{"step_count": int}`` (the schedule position)."""
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (e.g. to resume a KL warm-up from a checkpoint)."""
        step = state.get("step_count") if isinstance(state, dict) else None
        if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
            raise ValueError(
                "state must be a dict with an integer 'step_count' >= 0 (as returned by "
                f"AnalyticKLELBO.state_dict()), got {state!r}"
            )
        self.step_count = int(step)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-L_w as a tensor (see the class docstring); one step of the KL-weight schedule."""
        with self._one_step():
            return super().differentiable_loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """-L_w, with its gradient accumulated into ``.grad``; one step of the schedule."""
        with self._one_step():
            return super().loss_and_grads(model, guide, *args, **kwargs)

    @contextmanager
    def _one_step(self):
        """Fix the weight for this step and advance the count after it (re-entrant: the
        compiled ``loss_and_grads`` calls ``differentiable_loss``)."""
        outermost = self._step_depth == 0
        if outermost:
            self._weight = self._weight_at(self.step_count)
        self._step_depth += 1
        try:
            yield
        finally:
            self._step_depth -= 1
        if outermost:
            self.step_count += 1

    def _estimates(self, model, guide, args, kwargs, update_state: bool = True):
        if self._step_depth == 0:  # loss() and decompose(): the weight of the current step
            self._weight = self._weight_at(self.step_count)
        yield from super()._estimates(model, guide, args, kwargs, update_state)

    def _decomposition_notes(self) -> tuple[str, ...]:
        return self._weight_notes() + self._auxiliary_notes()

    def _auxiliary_notes(self) -> tuple[str, ...]:
        plan = self._plan
        if plan is None or not plan.auxiliary:
            return ()
        names = ", ".join(repr(s) for s in plan.auxiliary)
        return (
            f"the guide has auxiliary sites ({names}; an AutoGuide's): the KL of the latents "
            "they feed is split between the 'entropy' term of each auxiliary site (analytic "
            "H[q_aux]) and the latents' 'kl' terms, which are Monte Carlo log q_Delta - log p "
            "(the Delta's log-density is the transform's log-Jacobian) and are not KLs "
            "themselves; the KL of those latents is sum('kl') - sum(auxiliary 'entropy')",
        )

    def _weight_notes(self) -> tuple[str, ...]:
        if not callable(self.kl_weight) and self.kl_weight == 1.0:
            return ()
        w = self._weight
        which = (
            "every latent site"
            if self.kl_sites is None
            else "sites " + ", ".join(repr(s) for s in sorted(self.kl_sites))
        )
        schedule = f" (a schedule, at step {self.step_count})" if callable(self.kl_weight) else ""
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

    # ------------------------------------------------------------------ the plan
    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        guide_order = tuple(
            name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
        )
        latents = tuple(
            name
            for name, site in model_trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
        )
        key = (guide_order, latents)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._make_plan(
                model, guide, args, kwargs, model_trace, guide_trace, guide_order
            )
            if len(self._plans) >= _MAX_CACHED_PLANS:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        self._plan = plan
        return model_trace, guide_trace

    def _make_plan(
        self, model, guide, args, kwargs, model_trace, guide_trace, guide_order
    ) -> _Plan:
        try:
            parents = model_parents(model, guide_trace, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any failure: the conservative rule
            parents = _preceding_latents(model_trace)
            warnings.warn(
                f"{type(self).__name__}: could not trace the model's dependencies "
                f"({type(error).__name__}: {error}); treating every latent that precedes a "
                "site in the model as its parent",
                stacklevel=5,
            )
        position = {name: i for i, name in enumerate(guide_order)}
        allowed: dict[str, bool] = {}
        violations: dict[str, tuple[str, ...]] = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or name not in position:
                continue
            late = tuple(
                sorted(p for p in parents.get(name, ()) if position.get(p, -1) > position[name])
            )
            allowed[name] = not late
            if late:
                violations[name] = late
        if violations:
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
                    stacklevel=5,
                )
        if self.kl_sites is not None:  # once per structure, so always (not only validating)
            unknown = sorted(self.kl_sites - set(allowed))
            if unknown:
                raise ValueError(
                    f"{type(self).__name__}: kl_sites names {unknown}, which are not latent "
                    "sites sampled by both the model and the guide (those are "
                    f"{sorted(allowed)}); fix the names"
                )
        auxiliary = tuple(
            name
            for name, site in guide_trace.nodes.items()
            if site["type"] == "sample" and name not in model_trace.nodes
        )
        return _Plan(
            analytic_allowed=allowed,
            violations=violations,
            auxiliary=auxiliary,
            auxiliary_weighted=self._weigh_auxiliary(
                guide, guide_trace, auxiliary, set(allowed), args, kwargs
            ),
        )

    def _weigh_auxiliary(
        self, guide, guide_trace, auxiliary, latents, args, kwargs
    ) -> dict[str, bool]:
        """Which auxiliary sites' entropies take the KL weight (see the class docstring)."""
        if not auxiliary:
            return {}
        if self.kl_sites is None:  # every latent is weighted: so is every auxiliary entropy
            return {name: True for name in auxiliary}
        try:
            children = auxiliary_children(guide, guide_trace, auxiliary, args, kwargs)
        except Exception as error:  # noqa: BLE001 - conservative: it may feed every latent
            children = {name: frozenset(latents) for name in auxiliary}
            warnings.warn(
                f"{type(self).__name__}: could not trace which sites the guide's auxiliary "
                f"sites feed ({type(error).__name__}: {error}); assuming each feeds every "
                "latent",
                stacklevel=6,
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

    # ------------------------------------------------------------------ the treatment
    def _auxiliary_terms(self, name: str, guide_site: dict) -> list[Term]:
        """The auxiliary site's entropy (kind ``"entropy"``), times the KL weight where it is
        part of a weighted KL (with the Delta sites it feeds it makes up their KL)."""
        terms = super()._auxiliary_terms(name, guide_site)
        plan = self._plan
        weighted = self.kl_sites is None or (
            plan is not None and bool((plan.auxiliary_weighted or {}).get(name, False))
        )
        weight = self._weight if weighted else 1.0
        if weight == 1.0:
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
            out.append(
                Term(term.site, term.kind, contribution, pathwise, term.frames, term.analytic)
            )
        return out

    def _latent_terms(self, name: str, model_site: dict, guide_site: dict) -> list[Term]:
        weight = self._site_weight(name)
        kl = self._analytic_kl(name, model_site, guide_site)
        frames = plate_frames(model_site)
        if kl is not None:
            value = scaled(guide_site, kl)
            contribution = -value if weight == 1.0 else -weight * value
            return [Term(name, "kl", contribution, contribution, frames, analytic=True)]
        log_p = scaled(model_site, log_density(model_site))
        log_q = scaled(guide_site, log_density(guide_site))
        contribution = log_p - log_q
        # for a sample without rsample the gradient of E_q[-log q] comes from the score term;
        # the direct part (zero mean) is left out, as in the engine's sampled entropy
        pathwise = contribution if is_reparameterized(guide_site) else log_p
        if weight != 1.0:
            contribution, pathwise = weight * contribution, weight * pathwise
        return [Term(name, "kl", contribution, pathwise, frames, analytic=False)]

    def _analytic_kl(self, name: str, model_site: dict, guide_site: dict) -> torch.Tensor | None:
        """The closed-form KL of a site (unscaled), or None where the Monte Carlo term is used."""
        plan = self._plan
        if plan is not None and not plan.analytic_allowed.get(name, True):
            return None
        if not (
            _same_value(model_site["scale"], guide_site["scale"])
            and _same_value(model_site["mask"], guide_site["mask"])
        ):
            return None
        q, p = guide_site["fn"], model_site["fn"]
        key = (_structure(q), _structure(p))
        registered = self._kl_registered.get(key)
        if registered is False:
            return None
        if registered is None and any(t.__name__ == "Delta" for t in key[0]):
            # a Delta guide site (AutoNormal, AutoDiagonalNormal, AutoDelta, ...) carries the
            # log-Jacobian of its transform in ``log_density``, which Pyro's registered
            # KL(Delta, p) = -log p(v) drops; its MC term log q - log p is exact anyway
            self._kl_registered[key] = False
            return None
        try:
            kl = analytic_kl(q, p)
        except NotImplementedError:
            if not isinstance(q, MaskedDistribution) and not isinstance(p, MaskedDistribution):
                self._kl_registered[key] = False
            return None
        self._kl_registered[key] = True
        return kl


def _check_weight(value, step: int | None = None) -> float:
    """A KL weight as a float, or a ValueError naming ``kl_weight`` (and the step)."""
    where = "kl_weight" if step is None else f"kl_weight({step})"
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where} must be a number >= 0 (or a callable of the step count returning one), "
            f"got {value!r}"
        ) from None
    if isinstance(value, bool) or not math.isfinite(weight) or weight < 0:
        raise ValueError(
            f"{where} must be a finite number >= 0 (1 gives the ELBO itself), got {value!r}"
        )
    return weight
