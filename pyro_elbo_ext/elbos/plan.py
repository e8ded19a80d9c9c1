"""A plan per trace structure: each site's role, treatment and estimator parts, decided once.

A loss answers one question, "how is this site treated?" (its :meth:`treat` hook, given a
:class:`SiteView`); the engine asks it once per trace structure and reuses the answer at every
step with that structure.  The structure is keyed by everything the decisions may depend on:
the model and guide objects, the signature of their arguments (tensor shapes, dtypes and
devices; plain values themselves; the contents of containers and plain objects), and each
site's name, observedness, distribution types, shapes, plates and whether it is
reparameterized (:mod:`.keys`).  A change in any of them makes a new plan; a
plan is never reused where its key differs, and a call whose arguments cannot be summarized
gets a plan of its own that is not kept.

Contents
--------
Treatment, TreatmentWrapper
    How a site contributes to L (the losses' building block), and a treatment built on another
    that keeps its sampling facts.
SiteView
    What a loss sees of a site when it chooses a treatment.
PlanFact, Planning
    Whole-trace facts (typed keys, computed once per plan), and the call and trace pair a plan
    is made from.
SitePlan, Plan, StepContext
    The decisions, and the per-call data a treatment reads.
make_plan, site_views, PlanCache
    Making and keeping plans (their keys: :mod:`.keys`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from .densities import PATHWISE, gradient_kind
from .engine import Term
from .sites import (
    Frame,
    is_deterministic_site,
    is_enumerated_site,
    is_subsample_site,
    plate_frames,
)

#: site roles
OBSERVED = "observed"  # the model observes it
GUIDED = "guided"  # a model latent that the guide samples
UNGUIDED = "unguided"  # a model latent that the guide does not sample (drawn from the model)
AUXILIARY = "auxiliary"  # a guide site that the model does not have

T = TypeVar("T")


@dataclass(frozen=True)
class Treatment:
    """How one site contributes to L, at every step of a structure.

    Subclasses are frozen dataclasses (so that two equal decisions compare equal) and
    implement :meth:`terms`.  Three facts say how the engine handles the site's sample; they
    are properties, so that a :class:`TreatmentWrapper` forwards them by construction:

    ``sampled_by``
        Whose sample the site's score function (Pyro's ``score_parts``, if it has one)
        belongs to: ``"guide"`` (default) or ``"model"`` (a site the guide does not sample,
        drawn from the model: the prior-proposal treatment).
    ``uses_learning_signal``
        Whether the loss's learning signal (baseline, normalizer, ...) replaces the plain
        reward in the site's score term.
    ``enumerated``
        Whether the site is enumerated in parallel and its terms taken in expectation.

    :func:`make_plan` refuses a treatment whose facts contradict the site (a site the guide
    does not sample treated as the guide's, or the reverse; an enumerated site not treated
    as enumerated).
    """

    def terms(self, ctx: StepContext, model_site: dict | None,
              guide_site: dict | None) -> Sequence[Term]:
        """The site's terms at this step (scaled and masked, one tensor per kind)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement terms()")

    @property
    def sampled_by(self) -> str:
        return "guide"

    @property
    def uses_learning_signal(self) -> bool:
        return False

    @property
    def enumerated(self) -> bool:
        return False


@dataclass(frozen=True)
class TreatmentWrapper(Treatment):
    """A treatment built on ``inner``: it keeps ``inner``'s sampling facts.

    Subclasses implement :meth:`transform`, which turns the inner terms into this treatment's
    (e.g. :meth:`Term.scaled <pyro_elbo_ext.elbos.engine.Term.scaled>` them).
    """

    inner: Treatment

    def terms(self, ctx, model_site, guide_site):
        return self.transform(ctx, self.inner.terms(ctx, model_site, guide_site))

    def transform(self, ctx: StepContext, terms: Sequence[Term]) -> Sequence[Term]:
        """The inner terms as this treatment's (identity by default)."""
        return terms

    @property
    def sampled_by(self) -> str:
        return self.inner.sampled_by

    @property
    def uses_learning_signal(self) -> bool:
        return self.inner.uses_learning_signal

    @property
    def enumerated(self) -> bool:
        return self.inner.enumerated


@dataclass(frozen=True)
class SiteView:
    """A site as a loss sees it when choosing its treatment (once per structure)."""

    name: str
    role: str
    model_site: dict | None
    guide_site: dict | None


class PlanFact(Generic[T]):
    """A typed key of a whole-trace fact: computed once per plan, read by treatments and
    combinations (e.g. a dependency analysis, the layout of the importance weights).

    Facts are module-level constants, ``VIOLATIONS: PlanFact[dict] = PlanFact("...")``; the
    key is the object itself, so two facts never collide.
    """

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"PlanFact({self.name!r})"


@dataclass
class Planning:
    """The call and the trace pair a plan is made from, and the facts computed so far.

    ``provisional`` is set by a decision that could not be made definitively from these traces
    (e.g. a dependency question without a gradient graph, under ``torch.no_grad``): the plan
    is then used for this call and not kept.
    """

    model: Callable
    guide: Callable
    args: tuple
    kwargs: dict
    model_trace: Any
    guide_trace: Any
    facts: dict = field(default_factory=dict)
    provisional: bool = False

    def fact(self, key: PlanFact[T], compute: Callable[[], T]) -> T:
        """``compute()`` once per plan, kept under ``key``."""
        if key not in self.facts:
            self.facts[key] = compute()
        return self.facts[key]


@dataclass(frozen=True)
class SitePlan:
    """One site's decisions."""

    name: str
    role: str
    treatment: Treatment
    frames: frozenset[Frame]
    #: how the gradient of the sample behind the score term is estimated (Pyro's
    #: ``score_parts``, :func:`~.densities.gradient_kind`; ``PATHWISE``: no score term)
    gradient: str


@dataclass
class Plan:
    """The decisions for one trace structure, in model order, then the auxiliary sites."""

    sites: tuple[SitePlan, ...]
    #: the names of the sites enumerated in parallel
    enumerated: tuple[str, ...] = ()
    #: whole-trace facts computed while planning (:class:`PlanFact` -> value)
    facts: dict = field(default_factory=dict)
    #: whether the structure passed the validation checks (run once, under validation)
    validated: bool = False
    #: the parameters behind the surrogate (for naming a non-finite gradient), refreshed
    #: every :data:`LEAF_REFRESH` calls; ``leaf_calls`` counts the calls
    parameter_leaves: list | None = None
    leaf_calls: int = 0

    def fact(self, key: PlanFact[T], default: T | None = None) -> T | None:
        """The value of a whole-trace fact computed while planning, or ``default``."""
        return self.facts.get(key, default)


#: how many calls a plan's parameter leaves are reused before the autograd walk is repeated
LEAF_REFRESH = 64


@dataclass(slots=True)
class StepContext:
    """Per-call data, passed explicitly (never kept on the loss).

    Attributes
    ----------
    model_trace, guide_trace
        This particle's traces.
    plan : Plan
    settings : Mapping
        The loss's settings for this call by name (e.g. ``{"kl_weight": w}``, this step's
        weight of a schedule); empty if it has none.
    """

    model_trace: Any
    guide_trace: Any
    plan: Plan
    settings: Mapping = field(default_factory=dict)


def site_views(model_trace, guide_trace) -> list[SiteView]:
    """Every site that can contribute to L, with its role: model order, then auxiliary."""
    views = []
    guide_nodes = guide_trace.nodes
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or is_subsample_site(site):
            continue
        if site["is_observed"]:
            views.append(SiteView(name, OBSERVED, site, None))
            continue
        guide_site = guide_nodes.get(name)
        if guide_site is None or guide_site["type"] != "sample":
            views.append(SiteView(name, UNGUIDED, site, None))
        else:
            views.append(SiteView(name, GUIDED, site, guide_site))
    model_nodes = model_trace.nodes
    for name, site in guide_nodes.items():
        if (site["type"] == "sample" and name not in model_nodes
                and not is_subsample_site(site) and not is_deterministic_site(site)):
            views.append(SiteView(name, AUXILIARY, None, site))
    return views


def check_treatment(view: SiteView, treatment: Treatment) -> None:
    """Refuse a treatment whose sampling facts contradict the site (see :class:`Treatment`).

    Raises
    ------
    TypeError
        When ``treatment`` is not a :class:`Treatment`.
    ValueError
        Naming the site, the treatment and what contradicts it.
    """
    if not isinstance(treatment, Treatment):
        raise TypeError(
            f"the treatment of site '{view.name}' must be a Treatment, got "
            f"{type(treatment).__name__}: return one from the loss's treat()"
        )
    what = type(treatment).__name__
    if view.role == UNGUIDED and treatment.sampled_by != "model" and not treatment.enumerated:
        raise ValueError(
            f"site '{view.name}' is a model latent that the guide does not sample, but its "
            f"treatment {what} says the guide samples it (sampled_by="
            f"{treatment.sampled_by!r}): its score-function term would be dropped. A "
            "treatment of a model-drawn site has sampled_by='model' (a wrapper keeps its "
            "inner treatment's facts by subclassing TreatmentWrapper)"
        )
    if view.role in (GUIDED, AUXILIARY) and treatment.sampled_by != "guide":
        raise ValueError(
            f"site '{view.name}' is sampled by the guide, but its treatment {what} says "
            f"sampled_by={treatment.sampled_by!r}; use sampled_by='guide' for a guide site"
        )
    model_site = view.model_site
    enumerated = model_site is not None and is_enumerated_site(model_site)
    if enumerated and not treatment.enumerated:
        raise ValueError(
            f"site '{view.name}' is enumerated in parallel, but its treatment {what} does not "
            "take its terms in expectation (enumerated=False); keep the enumerating "
            "treatment's facts (subclass TreatmentWrapper)"
        )
    if treatment.enumerated and view.role != UNGUIDED:
        raise ValueError(
            f"site '{view.name}' ({view.role}) cannot be enumerated by {what}: only a model "
            "latent that the guide does not sample is enumerated"
        )


def make_plan(views: Sequence[SiteView], treat: Callable[[SiteView, Planning], Treatment],
              planning: Planning) -> Plan:
    """Ask ``treat`` for each site's treatment (checked against the site) and read each
    sample's gradient kind."""
    sites = []
    enumerated = []
    for view in views:
        treatment = treat(view, planning)
        check_treatment(view, treatment)
        if view.role == OBSERVED or treatment.enumerated:
            sampled = None  # no sample, or one summed over exactly: no score term
        elif treatment.sampled_by == "model":
            sampled = view.model_site
        else:
            sampled = view.guide_site
        gradient = PATHWISE if sampled is None else gradient_kind(sampled["fn"])
        any_site = view.model_site if view.model_site is not None else view.guide_site
        sites.append(SitePlan(view.name, view.role, treatment, plate_frames(any_site),
                              gradient))
        if treatment.enumerated:
            enumerated.append(view.name)
    return Plan(tuple(sites), tuple(enumerated), dict(planning.facts))


class PlanCache:
    """A bounded, least-recently-used map from plan keys to plans."""

    def __init__(self, maxsize: int = 32):
        self.maxsize = maxsize
        self._plans: OrderedDict = OrderedDict()

    def get(self, key) -> Plan | None:
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
        return plan

    def put(self, key, plan: Plan) -> None:
        self._plans[key] = plan
        if len(self._plans) > self.maxsize:
            self._plans.popitem(last=False)

    def plans(self) -> list[Plan]:
        """The plans kept, least recently used first."""
        return list(self._plans.values())

    def __len__(self) -> int:
        return len(self._plans)


__all__ = [
    "AUXILIARY",
    "GUIDED",
    "LEAF_REFRESH",
    "OBSERVED",
    "UNGUIDED",
    "Plan",
    "PlanCache",
    "PlanFact",
    "Planning",
    "SitePlan",
    "SiteView",
    "StepContext",
    "Treatment",
    "TreatmentWrapper",
    "check_treatment",
    "make_plan",
    "site_views",
]
