"""Whether an estimator applies to a problem, read from the problem's trace structure.

* :class:`ProblemStructure` and :func:`problem_structure` -- one (guide, model) trace at the
  starting parameters, classified: guided and unguided latents, non-reparameterized guide
  sites, enumerable and continuous sites (cached per problem object);
* the rules, each ``rule(structure) -> None | reason``: :func:`needs_guided_latents`,
  :func:`needs_reparameterized_guide`, :func:`needs_discrete_latents`,
  :func:`needs_unguided_latents`, :func:`needs_enumerable_unguided`, and for the discrete
  estimators :func:`needs_discrete_guide_sites` and :func:`discrete_sites_of`.

The registry (:mod:`.estimators`) lists the rules of each estimator.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine

from ..elbos.discrete_estimators import distribution_family
from ..problems import Problem


@dataclass(frozen=True)
class ProblemStructure:
    """What the estimators' applicability depends on, read from one (guide, model) trace.

    Attributes
    ----------
    guided_latents : tuple of str
        Model latent sites that the guide samples.
    unguided_latents : tuple of str
        Model latent sites the guide does not sample (hard-attention / prior-proposal sites).
    nonreparam_guide_sites : tuple of str
        Guide sample sites without ``rsample`` (discrete or otherwise score-function sites).
    enumerable_sites : tuple of str
        Latent sites (guide or model) whose distribution has a finite, enumerable support.
    continuous_sites : tuple of str
        Latent sites whose support cannot be enumerated.
    """

    guided_latents: tuple[str, ...]
    unguided_latents: tuple[str, ...]
    nonreparam_guide_sites: tuple[str, ...]
    enumerable_sites: tuple[str, ...]
    continuous_sites: tuple[str, ...]
    #: the distribution family of each non-reparameterized guide site (``"bernoulli"``,
    #: ``"categorical"``, ``"one_hot_categorical"`` or ``"other"``), in site order
    nonreparam_families: tuple[str, ...] = ()

    @property
    def fully_reparameterized(self) -> bool:
        return not self.nonreparam_guide_sites and not self.unguided_latents

    @property
    def has_discrete_latents(self) -> bool:
        return bool(self.enumerable_sites)


#: id(problem) -> (weak reference to it, its structure)
_STRUCTURE_CACHE: dict[int, tuple[weakref.ref, ProblemStructure]] = {}


def problem_structure(problem: Problem) -> ProblemStructure:
    """Trace the guide and replay the model once at ``init_params`` and classify the sites.

    The param store is saved and restored around the trace, so this has no side effect.
    The result is cached per problem object.
    """
    cached = _STRUCTURE_CACHE.get(id(problem))
    if cached is not None and cached[0]() is problem:
        return cached[1]
    store = pyro.get_param_store()
    saved = store.get_state()
    try:
        problem.set_params()
        guide_trace = poutine.trace(problem.guide).get_trace(*problem.args, **problem.kwargs)
        model_trace = poutine.trace(poutine.replay(problem.model, trace=guide_trace)).get_trace(
            *problem.args, **problem.kwargs
        )
    finally:
        store.set_state(saved)
    guide_sites = {
        name: site for name, site in guide_trace.nodes.items() if site["type"] == "sample"
    }
    latents = {
        name: site
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
        and not site["infer"].get("_do_not_trace") and not _is_subsample(site)
    }
    guided = tuple(n for n in latents if n in guide_sites)
    unguided = tuple(n for n in latents if n not in guide_sites)
    nonreparam = tuple(
        n for n, s in guide_sites.items()
        if not _is_subsample(s) and not getattr(s["fn"], "has_rsample", False)
    )
    all_latent = {**{n: s for n, s in guide_sites.items() if not _is_subsample(s)}, **latents}
    enumerable = tuple(
        n for n, s in all_latent.items() if getattr(s["fn"], "has_enumerate_support", False)
    )
    continuous = tuple(n for n in all_latent if n not in enumerable)
    families = tuple(distribution_family(guide_sites[n]["fn"]) for n in nonreparam)
    structure = ProblemStructure(guided, unguided, nonreparam, enumerable, continuous, families)
    for key in [k for k, (ref, _) in _STRUCTURE_CACHE.items() if ref() is None]:
        del _STRUCTURE_CACHE[key]
    _STRUCTURE_CACHE[id(problem)] = (weakref.ref(problem), structure)
    return structure


def _is_subsample(site: dict) -> bool:
    return type(site["fn"]).__name__ == "_Subsample"


#: a rule maps a problem's structure to ``None`` (applies) or the reason it does not
Rule = Callable[[ProblemStructure], "str | None"]


def needs_guided_latents(s: ProblemStructure) -> str | None:
    """Every model latent must be sampled by the guide."""
    if s.unguided_latents:
        return (
            f"the guide does not sample the latent site(s) {list(s.unguided_latents)}; "
            "use a hard_attention_* estimator"
        )
    return None


def needs_reparameterized_guide(s: ProblemStructure) -> str | None:
    """Every guide site must be reparameterized (``rsample``)."""
    if s.nonreparam_guide_sites:
        return (
            f"the guide site(s) {list(s.nonreparam_guide_sites)} are not reparameterizable "
            "(discrete); use trace_elbo, tracegraph_elbo or a jensen_* estimator"
        )
    return None


def needs_discrete_latents(s: ProblemStructure) -> str | None:
    """Enumeration needs at least one enumerable latent and no continuous unguided latent."""
    if not s.has_discrete_latents:
        return "the problem has no discrete latent site to enumerate (all latents are continuous)"
    return None


def needs_unguided_latents(s: ProblemStructure) -> str | None:
    """The hard-attention bound needs latents drawn from the model's own distribution."""
    if not s.unguided_latents:
        return (
            "the problem has no attention (unguided) latent site; its guide samples every latent, "
            "so use a jensen_* or trace_* estimator"
        )
    return None


def needs_enumerable_unguided(s: ProblemStructure) -> str | None:
    """Exact enumeration of the attention sites needs each to have a finite support."""
    reason = needs_unguided_latents(s)
    if reason:
        return reason
    bad = [n for n in s.unguided_latents if n not in s.enumerable_sites]
    if bad:
        return f"the attention site(s) {bad} have no finite support to enumerate"
    return None


__all__ = [
    "ProblemStructure",
    "Rule",
    "needs_discrete_latents",
    "needs_enumerable_unguided",
    "needs_guided_latents",
    "needs_reparameterized_guide",
    "needs_unguided_latents",
    "problem_structure",
]


def needs_discrete_guide_sites(s: ProblemStructure) -> str | None:
    """A discrete estimator needs guide sites without ``rsample``."""
    if not s.nonreparam_guide_sites:
        return ("the guide has no discrete (non-reparameterized) site, so no discrete "
                "estimator applies")
    return None


def discrete_sites_of(*families: str) -> Rule:
    """A rule: every non-reparameterized guide site is of one of ``families`` (what the
    estimator is defined for: DisARM, Bernoulli; RELAX, Bernoulli or Categorical)."""

    def rule(s: ProblemStructure) -> str | None:
        reason = needs_discrete_guide_sites(s)
        if reason:
            return reason
        other = [n for n, f in zip(s.nonreparam_guide_sites, s.nonreparam_families)
                 if f not in families]
        if other:
            return (f"the guide site(s) {other} are not of the families it is defined for "
                    f"({', '.join(families)})")
        return None

    rule.__doc__ = f"Every non-reparameterized guide site is {' or '.join(families)}."
    return rule
