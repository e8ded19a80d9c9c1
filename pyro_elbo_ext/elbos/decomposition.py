"""The per-term decomposition of L that every loss's ``decompose`` returns, and its notes.

Contents: :class:`TermSummary`, :class:`Decomposition` (and the richer ones of two losses:
:class:`HardAttentionDecomposition`, :class:`ImportanceWeightedDecomposition`),
:func:`term_notes` (the caveats that follow from the terms themselves: weighted terms, bonus
terms, an AutoGuide's split KL).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .engine import TERM_SIGNS, Term


@dataclass(frozen=True)
class TermSummary:
    """One term of L, averaged over particles.

    Attributes
    ----------
    site : str
        The sample site.
    kind : str
        ``log_likelihood``, ``log_prior``, ``entropy``, ``kl`` or ``bonus``.
    value : float
        The quantity in its own convention (a KL is >= 0), weight included.
    contribution : float
        What it adds to the estimate: ``value`` for every kind but ``kl``, ``-value`` for a KL.
    analytic : bool
        Closed form (analytic entropy or KL) rather than a Monte Carlo estimate.
    weight : float
        The factor the term carries (1 for a term of L itself; e.g. a KL weight).
    """

    site: str
    kind: str
    value: float
    contribution: float
    analytic: bool
    weight: float = 1.0


@dataclass(frozen=True)
class Decomposition:
    """L and the terms it was summed from.

    ``elbo == sum(t.contribution for t in terms)`` up to rounding (for the importance-weighted
    bound the terms are L_1's: see
    :class:`~pyro_elbo_ext.elbos.importance_weighted.ImportanceWeightedDecomposition`).  Use
    :meth:`by_kind` for the familiar split (expected log-likelihood, KL, entropy, ...),
    :meth:`by_site` for one site's terms, and :attr:`analytic_sites` for the sites that took a
    closed-form path.

    Attributes
    ----------
    elbo : float
        The estimate of L, averaged over ``num_particles``.
    terms : tuple of TermSummary
    num_particles : int
    notes : tuple of str
        Caveats, e.g. that a KL weight other than 1 makes L no longer a bound on log p(X).
    log_evidence : float or None
        log p(X) where the caller gave it (``decompose(..., log_evidence=...)``) or the loss
        computes it exactly.
    gap : float or None
        ``log_evidence - elbo``.
    """

    elbo: float
    terms: tuple[TermSummary, ...]
    num_particles: int
    notes: tuple[str, ...] = field(default=())
    log_evidence: float | None = None
    gap: float | None = None

    @classmethod
    def from_batches(cls, elbo: float, batches: Sequence[Any], num_particles: int,
                     notes: Sequence[str] = (), log_evidence: float | None = None,
                     **extra) -> Decomposition:
        """Average the terms of the batches (which sum over vectorized particles)."""
        totals: dict[tuple[str, str], float] = {}
        analytic: dict[tuple[str, str], bool] = {}
        weights: dict[tuple[str, str], float] = {}
        for batch in batches:
            for term in batch.terms:
                key = (term.site, term.kind)
                totals[key] = totals.get(key, 0.0) + float(term.contribution.sum())
                analytic[key] = analytic.get(key, True) and term.analytic
                weights[key] = float(term.weight)
        terms = tuple(
            TermSummary(
                site=site,
                kind=kind,
                # "+ 0.0" turns a negated zero (a KL of exactly 0) into 0.0, not -0.0
                value=TERM_SIGNS[kind] * total / num_particles + 0.0,
                contribution=total / num_particles + 0.0,
                analytic=analytic[(site, kind)],
                weight=weights[(site, kind)],
            )
            for (site, kind), total in totals.items()
        )
        gap = None if log_evidence is None else float(log_evidence) - elbo
        evidence = None if log_evidence is None else float(log_evidence)
        return cls(elbo, terms, num_particles, tuple(notes), evidence, gap, **extra)

    def by_kind(self) -> dict[str, float]:
        """Each kind's total value (e.g. ``{'log_likelihood': ..., 'kl': ...}``)."""
        out: dict[str, float] = {}
        for term in self.terms:
            out[term.kind] = out.get(term.kind, 0.0) + term.value
        return out

    def by_site(self) -> dict[str, dict[str, float]]:
        """Each site's terms, ``{site: {kind: value}}``."""
        out: dict[str, dict[str, float]] = {}
        for term in self.terms:
            out.setdefault(term.site, {})[term.kind] = term.value
        return out

    @property
    def analytic_sites(self) -> tuple[str, ...]:
        """Sites with at least one closed-form term."""
        return tuple(dict.fromkeys(t.site for t in self.terms if t.analytic))

    def _term_lines(self, header: str) -> list[str]:
        width = max([len(t.site) for t in self.terms] + [4])
        lines = [header, f"  {'site':<{width}}  {'kind':<14} {'value':>14}  path"]
        for t in self.terms:
            path = "analytic" if t.analytic else "Monte Carlo"
            lines.append(f"  {t.site:<{width}}  {t.kind:<14} {t.value:>14.6g}  {path}")
        return lines

    def _evidence_lines(self) -> list[str]:
        if self.log_evidence is None:
            return []
        return [f"  log p(X) = {self.log_evidence:.6g}  gap = {self.gap:.6g}"]

    def __str__(self) -> str:
        lines = self._term_lines(
            f"L = {self.elbo:.6g}  (mean of {self.num_particles} particle(s))")
        lines += self._evidence_lines()
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class HardAttentionDecomposition(Decomposition):
    """A :class:`Decomposition` with the exact bound F of a hard-attention model, its log
    evidence log p(y | I, W) and their gap (``None`` where the attention sites cannot be
    enumerated; see :func:`~.exact.attention_references`)."""

    exact_bound: float | None = None

    def __str__(self) -> str:
        lines = self._term_lines(
            f"L = {self.elbo:.6g}  (mean of {self.num_particles} particle(s))")
        lines += [f"  note: {note}" for note in self.notes]
        if self.exact_bound is not None:
            lines.append(f"  exact F = {self.exact_bound:.6g}")
        if self.log_evidence is not None:
            lines.append(f"  log p(y) = {self.log_evidence:.6g}  gap = KL[p(l)||p(l|y)] = "
                         f"{self.gap:.6g}")
        return "\n".join(lines)


@dataclass(frozen=True)
class ImportanceWeightedDecomposition(Decomposition):
    """One K-particle estimate of the importance-weighted bound, read several ways.

    Attributes
    ----------
    elbo : float
        The estimate of L_K (per-element log-mean-exp, summed, times the subsample scale).
    terms : tuple of TermSummary
        The terms of L_1 (each site's log-densities, averaged over the particles): they add
        up to ``elbo_1``, not to ``elbo``.
    elbo_1 : float
        The estimate of L_1 = L from the same draws: the mean over particles of log w.
    ess : float
        Kish's effective sample size of the weights, (sum w)^2 / sum w^2, in [1, K]; the
        mean over plate elements where the bound is per element.
    ess_min : float
        The smallest per-element effective sample size (= ``ess`` for a joint weight).
    local_plates : tuple of str
        The plates the bound is taken per element of (empty: joint).
    log_evidence : float or None
        log p(X) where the caller knows it (e.g. a conjugate problem's closed form).
    gap : float or None
        ``log_evidence - elbo`` (>= 0 in expectation, shrinking as K grows).
    """

    elbo_1: float = math.nan
    ess: float = math.nan
    ess_min: float = math.nan
    local_plates: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"per element of {list(self.local_plates)}" if self.local_plates else "joint"
        lines = [
            f"L_K = {self.elbo:.6g}  (K = {self.num_particles}, {where})",
            f"L_1 = {self.elbo_1:.6g}  (same draws)",
            f"ESS = {self.ess:.4g} of {self.num_particles}  (min {self.ess_min:.4g})",
        ]
        if self.log_evidence is not None:
            lines.append(f"log p(X) = {self.log_evidence:.6g}  gap = {self.gap:.6g}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


# ------------------------------------------------------------------------------ notes
def _weight_value(weight) -> float:
    return float(weight.detach()) if isinstance(weight, torch.Tensor) else float(weight)


def _sites(names) -> str:
    return ", ".join(repr(name) for name in dict.fromkeys(names))


def term_notes(terms: Sequence[Term], auxiliary: frozenset[str] = frozenset()
               ) -> tuple[str, ...]:
    """The caveats that follow from the terms themselves.

    - terms with a weight other than 1 (:meth:`Term.scaled <.engine.Term.scaled>`): the
      objective is then L plus (w - 1) times their sum, not L, with what that means for the
      bound (for KL terms: no longer a lower bound when w < 1, a looser one when w > 1);
    - terms of kind ``"bonus"``: the estimate is L plus the bonus;
    - the KL of an AutoGuide's latents split between its auxiliary sites' entropies and the
      latents' Monte Carlo ``"kl"`` terms (``auxiliary``: the auxiliary sites' names).
    """
    notes = []
    groups: dict[tuple[str, float], list[Term]] = {}
    for term in terms:
        if not term.weight_label:
            continue
        w = _weight_value(term.weight)
        if w != 1.0:
            groups.setdefault((term.weight_label, w), []).append(term)
    for (label, w), group in groups.items():
        kinds = sorted({t.kind for t in group})
        parts_of_kl = all(t.kind == "kl" or (t.kind == "entropy" and t.site in auxiliary)
                          for t in group)
        if parts_of_kl:
            bound = ("NOT a lower bound on log p(X) in general (it can exceed it)" if w < 1
                     else "a looser lower bound than L")
        else:
            bound = (f"a lower bound on log p(X) only where ({w:g} - 1) x their sum is "
                     "<= 0")
        notes.append(
            f"{label} = {w:g} multiplies the {'/'.join(map(repr, kinds))} terms of sites "
            f"{_sites(t.site for t in group)}: the value is L + ({w:g} - 1) x their sum, "
            f"not L; it is {bound}; the terms shown are weighted"
        )
    bonus = [t.site for t in terms if t.kind == "bonus"]
    if bonus:
        notes.append(
            f"L includes the bonus terms (kind 'bonus') of sites {_sites(bonus)}: L - bonus is "
            "the bound"
        )
    if auxiliary and any(t.kind == "kl" for t in terms):
        notes.append(
            f"the guide has auxiliary sites ({_sites(sorted(auxiliary))}; an AutoGuide's): "
            "the KL of the latents they feed is split between the 'entropy' term of each "
            "auxiliary site (analytic H[q_aux]) and the latents' 'kl' terms, which are Monte "
            "Carlo log q_Delta - log p (the Delta's log-density is the transform's "
            "log-Jacobian) and are not KLs themselves; the KL of those latents is sum('kl') - "
            "sum(auxiliary 'entropy')"
        )
    return tuple(notes)


__all__ = ["Decomposition", "HardAttentionDecomposition", "ImportanceWeightedDecomposition",
           "TermSummary", "term_notes"]
