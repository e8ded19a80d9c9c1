"""Which discrete estimator each site uses, decided once per plan.

:func:`choose_estimators` reads, for every site whose sample carries a score function, its
``infer={"discrete_estimator": name}`` or the loss's default, and checks it against the site
(:func:`~.discrete_estimators.check_estimator`: the name, the distribution, the particles);
:func:`apply_choices` turns a plan's sites into what the engine needs (a straight-through site
is pathwise: its value carries the gradient, no score term).  A name given on a site that has no
score function (a reparameterized site) is an error naming it, never ignored.
"""

from __future__ import annotations

import dataclasses

from .densities import MIXED, PATHWISE
from .discrete_estimators import (
    ESTIMATORS,
    _base_distribution,
    check_estimator,
    distribution_family,
)
from .plan import OBSERVED, PlanFact
from .site_baselines import baseline_options

#: the plan fact: site name -> estimator name, for every site whose estimator is not REINFORCE
DISCRETE_ESTIMATORS: PlanFact[dict] = PlanFact("discrete estimators")


def check_default(name: str, supported: tuple[str, ...] = ESTIMATORS,
                  loss: str = "the loss", why: str = "") -> str:
    """The loss-level ``discrete_estimator`` (a known name the loss supports), or a ValueError
    listing them."""
    if name not in ESTIMATORS:
        raise ValueError(
            f"discrete_estimator must be one of {', '.join(ESTIMATORS)}, got {name!r}"
        )
    if name not in supported:
        raise ValueError(
            f"{loss} does not support discrete_estimator={name!r} (it admits "
            f"{', '.join(supported)}: {why})"
        )
    return name


def _sampled(site, model_site, guide_site):
    return model_site if site.treatment.sampled_by == "model" else guide_site


def choose_estimators(plan, model_trace, guide_trace, default: str, num_particles: int,
                      vectorized: bool, supported: tuple[str, ...] = ESTIMATORS,
                      loss: str = "the loss", why: str = "") -> dict[str, str]:
    """Each score-function site's estimator (REINFORCE sites left out).

    Raises
    ------
    ValueError
        Naming the site: an estimator that does not apply to its distribution or its particle
        count, leave-one-out or DisARM without vectorized particles, or a name given on a site
        whose gradient is pathwise.
    """
    chosen = {}
    for site in plan.sites:
        if site.role == OBSERVED or site.treatment.enumerated:
            continue
        sampled = _sampled(site, model_trace.nodes.get(site.name),
                           guide_trace.nodes.get(site.name))
        if sampled is None:
            continue
        explicit = sampled["infer"].get("discrete_estimator")
        if site.gradient == PATHWISE:
            if explicit is not None:
                raise ValueError(
                    f"site '{site.name}' asks for discrete_estimator={explicit!r}, but its "
                    f"distribution ({type(_base_distribution(sampled['fn'])).__name__}) is "
                    "reparameterized: its gradient is pathwise. Remove the setting, or draw "
                    "the site from a discrete distribution"
                )
            continue
        if explicit is None and site.gradient == MIXED:
            continue  # a reparameterized site with a score part (Rejector): Pyro's parts
        name = explicit if explicit is not None else default
        fn = sampled["fn"]
        check_estimator(name, site.name, fn, num_particles)
        if name not in supported:
            raise ValueError(
                f"site '{site.name}' asks for discrete_estimator={name!r}, which {loss} does "
                f"not support ({why}); use one of {', '.join(supported)}"
            )
        if name in ("loo", "disarm") and not vectorized:
            raise ValueError(
                f"discrete_estimator={name!r} at site '{site.name}' needs "
                "vectorize_particles=True (the particles' rewards are compared within one "
                "vectorized batch); pass it, or use 'reinforce' or 'relax'"
            )
        if name != "reinforce":
            chosen[site.name] = name
    return chosen


def apply_choices(plan, chosen: dict[str, str]):
    """The plan with its choices recorded, and straight-through sites made pathwise."""
    if not chosen:
        return plan
    sites = tuple(dataclasses.replace(site, gradient=PATHWISE)
                  if chosen.get(site.name) == "gumbel_st" else site for site in plan.sites)
    facts = dict(plan.facts)
    facts[DISCRETE_ESTIMATORS] = chosen
    return dataclasses.replace(plan, sites=sites, facts=facts)


#: the estimators in which Pyro's per-site baseline (``infer={"baseline": ...}``) has no
#: place, and why: a baseline that is the same for every particle cancels in leave-one-out's
#: and DisARM's differences of rewards, and a straight-through site has no score term
NO_SITE_BASELINE = {
    "loo": "leave-one-out's baseline is the other particles' mean reward: a per-site "
           "baseline, the same for every particle, cancels in R_k - mean(R_-k)",
    "disarm": "DisARM's estimate is the difference of an antithetic pair's rewards: a "
              "per-site baseline, the same for both members, cancels in it",
    "gumbel_st": "a straight-through site has no score term to centre (its gradient is "
                 "pathwise through the relaxation)",
}


def check_site_baselines(plan, model_trace, guide_trace) -> None:
    r"""Refuse Pyro's per-site baseline on a site whose estimator has no use for it
    (:data:`NO_SITE_BASELINE`), naming the site; a ``"relax"`` site takes it (its score term
    meets :math:`\mathrm{sg}(R - b - c(\tilde z))`, still unbiased since :math:`b` does not
    read the sample).

    Raises
    ------
    ValueError
        Naming the site, its estimator, why the baseline cannot act, and what to do.
    """
    for name, estimator in plan.fact(DISCRETE_ESTIMATORS, {}).items():
        why = NO_SITE_BASELINE.get(estimator)
        if why is None:
            continue
        site = guide_trace.nodes.get(name)
        if site is None or site.get("type") != "sample" or site["is_observed"]:
            site = model_trace.nodes.get(name)
        options = None if site is None else baseline_options(name, site["infer"])
        if options is not None and (options.decaying or options.network or options.value):
            raise ValueError(
                f"site '{name}' has infer['baseline'] and discrete_estimator={estimator!r}: "
                f"{why}, so it would be silently useless. Remove infer['baseline'] from the "
                "site, or use discrete_estimator='reinforce' or 'relax' for it"
            )


def family(fn) -> str:
    """The site's distribution family (:func:`~.discrete_estimators.distribution_family`)."""
    return distribution_family(fn)


__all__ = ["DISCRETE_ESTIMATORS", "NO_SITE_BASELINE", "apply_choices", "check_default",
           "check_site_baselines", "choose_estimators"]
