"""The shared estimator engine: from per-site terms to the value of L and a surrogate.

Contents: :class:`Term`, :class:`ScoreSite`, :class:`ParticleEstimate`, :data:`SignalFn`,
:func:`sum_to_frames`, :func:`combine` and :func:`expect_over_enumerated`.

Every loss in :mod:`pyro_elbo_ext.elbos` turns one particle's (model trace, guide trace) pair
into a list of :class:`Term` s (the site contributions to L, each with the tensor whose gradient
is its pathwise gradient) and a list of :class:`ScoreSite` s (sites whose samples are not
reparameterized). :func:`combine` then forms

    L_hat       = sum_t contribution_t
    surrogate   = sum_t pathwise_t + sum_j sum(score_j * stop_grad(signal_j))

where ``reward_j`` is the part of L_hat that may depend on the sample at site j (and
``signal_j = reward_j`` unless a learning signal, e.g. ``reward_j - baseline_j``, replaces
it): the terms whose values the data flow says may depend on it, decided once per plan
(:mod:`.downstream`), Rao-Blackwellized further by :class:`pyro.plate` independence: terms in
plates that site j is not in are summed, terms that share j's plates are kept element by
element, so that the i-th element of ``score_j`` only meets the rewards of data point i (and
the global terms).  The gradient of the surrogate is then an unbiased estimate of dL for any
baseline that does not depend on the sample at site j (Williams 1992; Ranganath, Gerrish &
Blei 2014, arXiv:1401.0118; Schulman et al. 2015, arXiv:1506.05254).

The engine knows nothing of which loss it serves; the losses decide each site's treatment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .densities import log_density
from .sites import Frame, plate_frames

#: kinds of term and the sign with which each enters L
TERM_SIGNS: dict[str, float] = {
    "log_likelihood": 1.0,  # log p(x | ...) of an observed site
    "log_prior": 1.0,  # log p(z | parents) of a latent site, at the guide's sample
    "entropy": 1.0,  # H[q(z | ...)], analytic, or its one-sample estimate -log q(z)
    "kl": -1.0,  # KL[q(z | ...) || p(z | parents)], analytic or log q(z) - log p(z)
    "bonus": 1.0,  # anything a loss adds on purpose (e.g. an entropy bonus); documented there
}


@dataclass(slots=True)
class Term:
    """One site's contribution to L for one particle.

    Attributes
    ----------
    site : str
        Name of the sample site.
    kind : str
        One of :data:`TERM_SIGNS`; ``contribution = TERM_SIGNS[kind] * value``.
    contribution : torch.Tensor
        The signed contribution to L, element by element over the site's batch shape, with
        the site's scale and mask applied.  It may carry a gradient.
    pathwise : torch.Tensor or None
        The tensor whose gradient is this term's pathwise (reparameterization or analytic)
        gradient; usually ``contribution`` itself, ``None`` when the term's gradient is carried
        only by score-function terms.
    frames : frozenset of Frame
        The vectorized plates of the site.
    analytic : bool
        Whether the term was computed in closed form (analytic entropy or KL) rather than
        from the sample.
    weight : float or torch.Tensor
        The factor the term was multiplied by (:meth:`scaled`): 1 for a term of L itself.
    weight_label : str
        What the factor is called (e.g. ``"kl_weight"``), for ``decompose``'s notes.
    sampled : torch.Tensor or None
        For a closed-form term of a site whose sample carries a score function: the
        one-sample estimate of the same quantity at that sample (``-log q(z)`` for
        ``H[q(z)]``, ``log p(z) - log q(z)`` for ``-KL``), which the site's *own* score term
        meets in place of ``contribution``; the term's gradient through q's parameters is
        then carried by that score term (``pathwise`` leaves it out), since
        ``d/dphi E_q[s(z)] = E_q[s(z) d log q(z)/dphi]`` for ``s = log p - log q`` or
        ``s = -log q`` (whose expectations are the closed forms).  The site's reward then
        holds ``log p - log q``, constant at the posterior (the learning signal of NVIL,
        Mnih & Gregor 2014, arXiv:1402.0030), where the closed form would leave the level
        ``log p`` alone.  ``None``: the term meets every score term as ``contribution``.
    """

    site: str
    kind: str
    contribution: torch.Tensor
    pathwise: torch.Tensor | None
    frames: frozenset[Frame]
    analytic: bool = False
    weight: float | torch.Tensor = 1.0
    weight_label: str = ""
    sampled: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        """The term's quantity in the convention of its kind (e.g. KL >= 0)."""
        return self.contribution * TERM_SIGNS[self.kind]

    def scaled(self, weight: float | torch.Tensor, label: str = "weight") -> Term:
        """The term times ``weight``: its contribution and its pathwise part (a term whose
        gradient is carried by score terms alone keeps ``pathwise=None``).

        A constant weight of exactly 1 returns the term itself; a tensor weight (a schedule's
        value, a compiled graph's input) is always applied, so a graph never branches on it.
        ``decompose`` reports the objective as not L where a term's weight is not 1.
        """
        if not isinstance(weight, torch.Tensor) and weight == 1.0:
            return self
        contribution = weight * self.contribution
        if self.pathwise is None:
            pathwise = None
        elif self.pathwise is self.contribution:
            pathwise = contribution  # keeps the engine's "pathwise is contribution" sharing
        else:
            pathwise = weight * self.pathwise
        sampled = None if self.sampled is None else weight * self.sampled
        if self.weight_label:
            weight, label = self.weight * weight, f"{self.weight_label} x {label}"
        return Term(self.site, self.kind, contribution, pathwise, self.frames, self.analytic,
                    weight, label, sampled)


@dataclass(slots=True)
class ScoreSite:
    """A site whose sample carries a score-function gradient.

    Attributes
    ----------
    site : str
        The sample site.
    score_function : torch.Tensor
        Pyro's ``score_parts(...).score_function`` of the site (``log q(z)`` for a plain
        non-reparameterized distribution), shaped like the site's batch; unscaled (the reward
        it meets already carries the plate scale) and unmasked.
    frames : frozenset of Frame
        The vectorized plates of the site.
    learning_signal : bool
        Whether the loss's learning signal (baseline, reward transform, normalizer) replaces
        the plain reward for this site (hard-attention sites, sites with Pyro's per-site
        ``infer={"baseline": ...}``); otherwise the score meets the Rao-Blackwellized reward
        itself.
    downstream_sites : frozenset of str or None
        The sites any of whose terms the site's reward may hold (``None``: every site not
        separated from it by plates); a reward transform that adds per-site values reads it.
    """

    site: str
    score_function: torch.Tensor
    frames: frozenset[Frame]
    learning_signal: bool = False
    downstream_sites: frozenset[str] | None = None
    #: ``gradient_term(signal) -> Tensor``: the site's surrogate term from its (detached)
    #: signal, where its discrete estimator is not plain REINFORCE (leave-one-out, DisARM,
    #: RELAX: :mod:`.discrete_terms`); ``None``: ``sum(score_function * signal)``
    gradient_term: Callable[[torch.Tensor], torch.Tensor] | None = None


#: ``signal(score_site, reward) -> learning signal``: what the score function of a site marked
#: ``learning_signal`` meets instead of its detached, Rao-Blackwellized reward (e.g. the reward
#: minus a baseline); it must not depend on that site's sample for the estimate to stay
#: unbiased.
SignalFn = Callable[[ScoreSite, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class ParticleEstimate:
    """:func:`combine`'s result for one particle (or one vectorized batch of particles).

    ``total`` is the sum of the terms' contributions: L_hat summed over the batch's
    vectorized particles (not averaged); ``surrogate`` is the differentiable surrogate whose
    gradient estimates that sum's (``total`` itself, the same tensor, when every term's
    gradient is pathwise and no site has a score term); ``terms`` are the terms that were
    summed.
    """

    total: torch.Tensor
    surrogate: torch.Tensor
    terms: Sequence[Term]


def sum_to_frames(
    rewards: dict[frozenset[Frame], torch.Tensor], target: frozenset[Frame]
) -> torch.Tensor | float:
    """Rao-Blackwellized downstream reward for a site that lives in the plates ``target``.

    Each reward grouped under its plates is summed over the dimensions of the plates that
    ``target`` does not contain; the results are added with broadcasting.

    Parameters
    ----------
    rewards : dict
        Detached reward tensors keyed by the plates they live in.
    target : frozenset of Frame
        The plates of the score-function site.

    Returns
    -------
    torch.Tensor or float
        A tensor that broadcasts against the site's score, or ``0.0`` when there is no reward.
    """
    total: torch.Tensor | float = 0.0
    for frames, reward in rewards.items():
        for frame in frames - target:
            if reward.dim() >= -frame.dim and reward.shape[frame.dim] != 1:
                reward = reward.sum(frame.dim, keepdim=True)
        total = total + reward
    return total


def _by_frames(terms: Sequence[Term], values: Sequence[torch.Tensor],
               chosen: Sequence[int] | None) -> dict[frozenset[Frame], torch.Tensor]:
    """The detached ``values`` of the chosen terms (all where ``None``), summed by plates."""
    rewards: dict[frozenset[Frame], torch.Tensor] = {}
    for i in range(len(terms)) if chosen is None else chosen:
        frames, value = terms[i].frames, values[i]
        rewards[frames] = rewards[frames] + value if frames in rewards else value
    return rewards


def _own_samples(terms: Sequence[Term]) -> dict[str, list[int]]:
    """The indices of the terms with a ``sampled`` form, by site (usually none)."""
    own: dict[str, list[int]] = {}
    for i, term in enumerate(terms):
        if term.sampled is not None:
            own.setdefault(term.site, []).append(i)
    return own


def combine(
    terms: Sequence[Term],
    score_sites: Sequence[ScoreSite] = (),
    signal: SignalFn | None = None,
    downstream: Any = None,
) -> ParticleEstimate:
    """Sum the terms of one particle into L_hat and its gradient surrogate.

    Parameters
    ----------
    terms : sequence of Term
        Every contribution to L of this particle.
    score_sites : sequence of ScoreSite
        The sites that need a score-function term.  The reward each one meets is the sum of
        the term contributions that may depend on its sample (all of them where
        ``downstream`` is ``None``), detached and Rao-Blackwellized by plates
        (:func:`sum_to_frames`); a site's own closed-form terms enter as their ``sampled``
        form.
    signal : SignalFn, optional
        The learning signal of sites marked ``learning_signal`` (see :data:`SignalFn`).
    downstream : Downstream, optional
        The plan's decision of which terms each score site meets
        (:class:`~pyro_elbo_ext.elbos.downstream.Downstream`); ``None``: every term, by
        plates only.

    Returns
    -------
    ParticleEstimate

    Notes
    -----
    An empty model and guide give L = 0 (as Pyro's ELBOs do): the bound of an empty program.
    """
    elbo = surrogate = None
    totals = []
    shared = True  # every pathwise part is its contribution: the surrogate is L_hat itself
    for term in terms:
        total = term.contribution.sum()
        totals.append(total)
        elbo = total if elbo is None else elbo + total
        shared = shared and term.pathwise is term.contribution
    if elbo is None:
        elbo = torch.zeros(())
    elif shared:
        surrogate = elbo
    else:
        for term, total in zip(terms, totals):
            if term.pathwise is None:
                continue
            if term.pathwise is not term.contribution:
                total = term.pathwise.sum()
            surrogate = total if surrogate is None else surrogate + total
    if score_sites:
        values = [term.contribution.detach() for term in terms]
        selection = downstream.select(terms) if downstream is not None else {}
        grouped: dict = {}  # the chosen terms' rewards by plates, per choice of terms
        own = _own_samples(terms)
        for site in score_sites:
            chosen = selection.get(site.site)  # None: every term (the plate rule)
            rewards = grouped.get(chosen)
            if rewards is None:
                rewards = grouped[chosen] = _by_frames(terms, values, chosen)
            reward = sum_to_frames(rewards, site.frames)
            for i in own.get(site.site, ()):  # its own closed-form terms, as samples
                met = chosen is None or i in chosen
                reward = reward + (terms[i].sampled - terms[i].contribution if met
                                   else terms[i].sampled).detach()
            if signal is not None and site.learning_signal:
                reward = signal(site, reward)
            if site.gradient_term is not None:
                score_term = site.gradient_term(reward)
            else:
                score_term = (site.score_function * reward).sum()
            surrogate = score_term if surrogate is None else surrogate + score_term
    if surrogate is None:  # nothing differentiable at all
        surrogate = torch.zeros_like(elbo)
    return ParticleEstimate(total=elbo, surrogate=surrogate, terms=terms)


def expect_over_enumerated(
    terms: Sequence[Term], enumerated: Sequence[dict], max_plate_nesting: int, exact: bool
) -> list[Term]:
    r"""Each term's exact expectation over sites enumerated in parallel.

    With enumerated sites :math:`l_1, \dots, l_T` drawn from the model (``poutine.enum``, one
    dimension each, left of the plates), a term :math:`f` living in plates :math:`P` becomes

    .. math::

        \mathbb{E}_{p(l)}[f] = \sum_{l} \prod_{t:\ \mathrm{plates}(l_t) \subseteq P}
        p(l_t \mid l_{<t})\, f(l)

    (sites outside ``P`` sum to one and are left out); the enumeration dimensions are summed.
    ``exact`` marks the results analytic (no other Monte Carlo in the particle).
    """
    weights: dict[frozenset[Frame], torch.Tensor | float] = {}
    frames_of = [(site, plate_frames(site)) for site in enumerated]
    out = []
    for term in terms:
        weight = weights.get(term.frames)
        if weight is None:
            log_w = sum((log_density(site) for site, frames in frames_of
                         if frames <= term.frames), 0.0)
            weight = log_w.exp() if torch.is_tensor(log_w) else 1.0
            weights[term.frames] = weight
        value = _weighted_sum(term.contribution, weight, max_plate_nesting)
        pathwise = value
        if term.pathwise is not term.contribution:
            # d(w f) = f dw + w df, with df the term's own pathwise part
            pathwise = _weighted_sum(term.contribution.detach(), weight, max_plate_nesting)
            if term.pathwise is not None:
                pathwise = pathwise + _weighted_sum(
                    term.pathwise, _detached(weight), max_plate_nesting)
        sampled = None if term.sampled is None else _weighted_sum(
            term.sampled, weight, max_plate_nesting)
        out.append(Term(term.site, term.kind, value, pathwise, term.frames,
                        exact or term.analytic, term.weight, term.weight_label, sampled))
    return out


def _detached(weight):
    return weight.detach() if torch.is_tensor(weight) else weight


def _weighted_sum(tensor: torch.Tensor, weight, max_plate_nesting: int) -> torch.Tensor:
    """``tensor * weight`` summed over the enumeration dimensions (left of the plates)."""
    value = tensor * weight
    if torch.is_tensor(value) and value.dim() > max_plate_nesting:
        value = value.sum(tuple(range(value.dim() - max_plate_nesting)))
    return value
