r"""The standard treatments of a site, and the term builders they are made of.

A treatment (:class:`~pyro_elbo_ext.elbos.plan.Treatment`) says how one site contributes to
L; a loss's ``treat`` hook picks one per site, once per trace structure.  The standard ones:

- :class:`Observed`: ``log p(x | ...)`` (kind ``log_likelihood``); every loss.
- :class:`JensenTreatment`: ``log p(z | parents) + H[q(z | ...)]`` (``log_prior``,
  ``entropy``: analytic, sampled, path or direct); JensenELBO, ImportanceWeightedELBO.
- :class:`EntropyTreatment`: ``H[q(z | ...)]`` alone (an auxiliary guide site); every loss.
- :class:`KLTreatment`: ``-KL[q(z | ...) || p(z | parents)]`` (``kl``: closed form where
  registered and valid, else ``log p - log q``); AnalyticKLELBO.
- :class:`PriorProposal`: nothing (z drawn from the model, q = p), its score term meeting the
  learning signal, and an optional entropy ``bonus``; HardAttentionELBO.
- :class:`Weighted`: another treatment's terms times a weight; AnalyticKLELBO's KL weight.

Term builders (one site -> one :class:`~.engine.Term`, scaled and masked):
:func:`observed_term`, :func:`log_prior_term`, :func:`sampled_entropy_term`,
:func:`path_entropy_term`, :func:`analytic_entropy_term`; and :func:`analytic_entropy`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pyro.distributions.torch_distribution import MaskedDistribution

from .densities import PATHWISE, SCORE_FUNCTION, entropy_term, log_density, scaled_and_masked
from .engine import Term
from .graphs import stop_gradient
from .kl import analytic_kl, same_value
from .plan import StepContext, Treatment, TreatmentWrapper
from .sites import plate_frames

#: JensenELBO's entropy estimators (a treatment also takes ``"direct"``: see
#: :class:`JensenTreatment`)
ENTROPY_ESTIMATORS = ("analytic", "sampled", "path")


# ---------------------------------------------------------------------------- term builders
def analytic_entropy(fn) -> torch.Tensor | None:
    """``fn.entropy()`` over the batch shape, or ``None`` where no closed form exists.

    A masked distribution (``fn.mask(m)``) has the entropy of its base distribution where the
    mask is true and zero elsewhere.
    """
    if isinstance(fn, MaskedDistribution):
        base = analytic_entropy(fn.base_dist)
        if base is None:
            return None
        return base if fn._mask is True else torch.where(fn._mask, base, base.new_zeros(()))
    try:
        return fn.entropy()
    except NotImplementedError:
        return None


def observed_term(name: str, site: dict) -> Term:
    """log p(x | ...) of an observed site."""
    value = scaled_and_masked(site, log_density(site))
    return Term(name, "log_likelihood", value, value, plate_frames(site))


def log_prior_term(name: str, model_site: dict) -> Term:
    """log p(z | parents) of a latent site at the guide's sample."""
    value = scaled_and_masked(model_site, log_density(model_site))
    return Term(name, "log_prior", value, value, plate_frames(model_site))


def sampled_entropy_term(name: str, guide_site: dict, estimator: str) -> Term:
    """The one-sample entropy estimate -log q(z), with Pyro's ``score_parts`` gradient parts.

    Its pathwise part is ``-entropy_term`` (``-log q`` for a reparameterized site; none for a
    plain score-function site, whose gradient of E_q[-log q] comes from the score term alone,
    the direct part having mean zero).  ``estimator=PATHWISE`` keeps the whole gradient of
    ``-log q`` whatever the site.
    """
    value = scaled_and_masked(guide_site, -log_density(guide_site))
    pathwise = entropy_term(guide_site, estimator)
    if pathwise is not None:
        pathwise = value if estimator == PATHWISE else -pathwise
    return Term(name, "entropy", value, pathwise, plate_frames(guide_site))


def path_entropy_term(name: str, guide_site: dict) -> Term:
    """Path-derivative ("sticking the landing") entropy estimate.

    ``-log q_stop(z)``, where ``q_stop`` is the site's distribution with its parameters
    detached: the value equals -log q(z), the gradient flows only through the sample z.  The
    dropped part, ``-d log q(z; theta)/d theta`` at fixed z, has expectation zero, so the
    estimator stays unbiased, and at q = p(z | x) the gradient is exactly zero
    (Roeder, Wu & Duvenaud 2017, arXiv:1703.09194).
    """
    frozen = stop_gradient(guide_site["fn"])
    value = scaled_and_masked(guide_site, -frozen.log_prob(guide_site["value"]))
    return Term(name, "entropy", value, value, plate_frames(guide_site))


def analytic_entropy_term(name: str, guide_site: dict, guide_gradient: str = PATHWISE
                          ) -> Term | None:
    """H[q(z | ...)] in closed form, scaled and masked, or ``None`` where there is none.

    At a score-function site (``guide_gradient``), the site's own score term meets the sample
    ``-log q(z)`` in its place and carries its gradient through q's parameters (see
    :attr:`Term.sampled <pyro_elbo_ext.elbos.engine.Term>`); the term has no pathwise part.
    """
    entropy = analytic_entropy(guide_site["fn"])
    if entropy is None:
        return None
    batch_shape = guide_site["fn"].batch_shape
    if entropy.shape != batch_shape:
        entropy = entropy.expand(batch_shape)
    value = scaled_and_masked(guide_site, entropy)
    if guide_gradient == SCORE_FUNCTION:
        sampled = scaled_and_masked(guide_site, -log_density(guide_site))
        return Term(name, "entropy", value, None, plate_frames(guide_site), analytic=True,
                    sampled=sampled)
    return Term(name, "entropy", value, value, plate_frames(guide_site), analytic=True)


def entropy_estimate(name: str, guide_site: dict, estimator: str,
                     guide_gradient: str) -> Term:
    """H[q(z | ...)] by ``estimator`` (see :class:`JensenTreatment`)."""
    if estimator == "analytic":
        term = analytic_entropy_term(name, guide_site, guide_gradient)
        if term is not None:
            return term
    elif estimator == "path":
        return path_entropy_term(name, guide_site)
    elif estimator == "direct":
        return sampled_entropy_term(name, guide_site, PATHWISE)
    return sampled_entropy_term(name, guide_site, guide_gradient)


# ---------------------------------------------------------------------------- treatments
@dataclass(frozen=True)
class Observed(Treatment):
    """An observed site: ``log p(x | ...)``."""

    def terms(self, ctx, model_site, guide_site):
        return [observed_term(model_site["name"], model_site)]


@dataclass(frozen=True)
class EntropyTreatment(Treatment):
    """``H[q(z | ...)]`` of a guide site, alone (an auxiliary site the model does not have).

    ``entropy``: ``"analytic"`` (closed form where ``entropy()`` exists, else sampled),
    ``"sampled"`` (``-log q(z)`` with Pyro's ``score_parts`` gradient: ``Trace_ELBO``'s),
    ``"path"`` (the path derivative, :func:`path_entropy_term`) or ``"direct"`` (``-log q(z)``
    with its whole gradient, the score part's zero-mean term included: what the
    importance-weighted bound differentiates); ``guide_gradient`` is how the gradient of
    the guide's sample is estimated (:func:`~.densities.gradient_kind`).
    """

    entropy: str
    guide_gradient: str

    def terms(self, ctx, model_site, guide_site):
        return [entropy_estimate(guide_site["name"], guide_site, self.entropy,
                                 self.guide_gradient)]


@dataclass(frozen=True)
class JensenTreatment(Treatment):
    """A guided latent in the Jensen form: ``log p(z | parents)`` at the guide's sample plus
    an estimate of ``H[q(z | ...)]`` (see :class:`EntropyTreatment` for ``entropy``).

    By the chain rule of entropy these add up over the sites to E_q[log p(X, Z)] + H[q(Z)].
    """

    entropy: str
    guide_gradient: str

    def terms(self, ctx, model_site, guide_site):
        name = guide_site["name"]
        return [log_prior_term(name, model_site),
                entropy_estimate(name, guide_site, self.entropy, self.guide_gradient)]


@dataclass(frozen=True)
class KLTreatment(Treatment):
    r"""``-KL[q(z | ...) || p(z | parents)]`` of a guided latent (kind ``"kl"``).

    In closed form (:func:`~.kl.analytic_kl`) where ``analytic`` and the model and guide
    sites share scale and mask at this step; otherwise the Monte Carlo term
    ``log p(z | ...) - log q(z | ...)``, whose ``-log q`` has Pyro's ``score_parts`` gradient
    (none for a score-function site: its score term carries it).  ``analytic`` is the loss's
    decision that the closed form is valid (registered, and the model's parents of z are
    sampled before z in the guide).  At a score-function site the closed form is L's value,
    and the site's own score term meets ``log p - log q`` in its place, carrying the KL's
    gradient through q's parameters (:attr:`Term.sampled <pyro_elbo_ext.elbos.engine.Term>`;
    the pathwise part is the KL with q's parameters detached: p's side).
    """

    analytic: bool
    guide_gradient: str

    def terms(self, ctx, model_site, guide_site):
        name = model_site["name"]
        frames = plate_frames(model_site)
        kl = closed_form_kl(model_site, guide_site) if self.analytic else None
        if kl is not None and self.guide_gradient != SCORE_FUNCTION:
            contribution = -scaled_and_masked(guide_site, kl)
            return [Term(name, "kl", contribution, contribution, frames, analytic=True)]
        log_p = scaled_and_masked(model_site, log_density(model_site))
        log_q = scaled_and_masked(guide_site, log_density(guide_site))
        if kl is not None:  # a score-function site: its own score meets log p - log q
            value = -scaled_and_masked(guide_site, kl)
            stopped = analytic_kl(stop_gradient(guide_site["fn"]), model_site["fn"])
            pathwise = -scaled_and_masked(guide_site, stopped)
            return [Term(name, "kl", value, pathwise, frames, analytic=True,
                         sampled=log_p - log_q)]
        contribution = log_p - log_q
        pathwise_q = entropy_term(guide_site, self.guide_gradient)
        if pathwise_q is None:
            pathwise = log_p
        elif self.guide_gradient == PATHWISE:
            pathwise = contribution
        else:
            pathwise = log_p - pathwise_q
        return [Term(name, "kl", contribution, pathwise, frames, analytic=False)]


def closed_form_kl(model_site: dict, guide_site: dict) -> torch.Tensor | None:
    """The site's unscaled closed-form KL[q || p], or ``None`` where scale or mask differ at
    this step (or the masks make the pair unregistered)."""
    if not (same_value(model_site["scale"], guide_site["scale"])
            and same_value(model_site["mask"], guide_site["mask"])):
        return None
    try:
        return analytic_kl(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None


@dataclass(frozen=True)
class PriorProposal(Treatment):
    """A site drawn from the model's own p(l | ...) (the guide does not sample it).

    No term of its own (q = p), plus the bonus ``bonus_weight * H[p(l)]`` (kind ``"bonus"``)
    if ``bonus_weight > 0``.  Its score function (Pyro's ``score_parts`` of the model's
    sample, the unscaled ``log p(l)``) meets the loss's learning signal; a reparameterized
    model-drawn site carries the pathwise gradient into the terms downstream of it and has no
    score term.  With ``in_expectation`` the site is enumerated in parallel and every term is
    taken in expectation over it instead.
    """

    bonus_weight: float = 0.0
    in_expectation: bool = False

    @property
    def sampled_by(self) -> str:
        return "model"

    @property
    def uses_learning_signal(self) -> bool:
        return True

    @property
    def enumerated(self) -> bool:
        return self.in_expectation

    def terms(self, ctx, model_site, guide_site):
        if self.bonus_weight <= 0:
            return []
        entropy = analytic_entropy(model_site["fn"])
        value = scaled_and_masked(model_site, self.bonus_weight * entropy)
        return [Term(model_site["name"], "bonus", value, value, plate_frames(model_site),
                     analytic=True)]


@dataclass(frozen=True)
class Weighted(TreatmentWrapper):
    """``inner``'s terms times a weight (:meth:`Term.scaled <.engine.Term.scaled>`).

    ``weight`` is a number, or the name of one of the step's settings (``ctx.settings[name]``,
    e.g. a scheduled ``"kl_weight"``), read at every step.  ``decompose`` names the weight in
    its notes (``label``, or the setting's name).
    """

    weight: float | str = 1.0
    label: str = "weight"

    def transform(self, ctx: StepContext, terms: Sequence[Term]) -> Sequence[Term]:
        if isinstance(self.weight, str):
            weight, label = ctx.settings[self.weight], self.weight
        else:
            weight, label = self.weight, self.label
        return [term.scaled(weight, label) for term in terms]


__all__ = [
    "ENTROPY_ESTIMATORS",
    "EntropyTreatment",
    "JensenTreatment",
    "KLTreatment",
    "Observed",
    "PriorProposal",
    "Weighted",
    "analytic_entropy",
    "analytic_entropy_term",
    "closed_form_kl",
    "entropy_estimate",
    "log_prior_term",
    "observed_term",
    "path_entropy_term",
    "sampled_entropy_term",
]
