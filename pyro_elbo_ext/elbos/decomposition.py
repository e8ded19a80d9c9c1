"""The per-term decomposition of L that every loss's ``decompose`` returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .engine import TERM_SIGNS, ParticleEstimate


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
        The quantity in its own convention (a KL is >= 0).
    contribution : float
        What it adds to L: ``value`` for every kind but ``kl``, ``-value`` for a KL.
    analytic : bool
        Closed form (analytic entropy or KL) rather than a Monte Carlo estimate.
    """

    site: str
    kind: str
    value: float
    contribution: float
    analytic: bool


@dataclass(frozen=True)
class Decomposition:
    """L and the terms it was summed from.

    ``elbo == sum(t.contribution for t in terms)`` up to rounding.  Use :meth:`by_kind` for the
    familiar split (expected log-likelihood, KL, entropy, ...), :meth:`by_site` for one site's
    terms, and :attr:`analytic_sites` for the sites that took a closed-form path.

    Attributes
    ----------
    elbo : float
        The estimate of L, averaged over ``num_particles``.
    terms : tuple of TermSummary
    num_particles : int
    notes : tuple of str
        Caveats, e.g. that a KL weight other than 1 makes L no longer a bound on log p(X).
    """

    elbo: float
    terms: tuple[TermSummary, ...]
    num_particles: int
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_estimates(
        cls, estimates: Sequence[ParticleEstimate], num_particles: int, notes=()
    ) -> Decomposition:
        """Average the terms of the particles' estimates (which sum over vectorized particles)."""
        totals: dict[tuple[str, str], float] = {}
        analytic: dict[tuple[str, str], bool] = {}
        elbo = 0.0
        for est in estimates:
            elbo += float(est.elbo)
            for term in est.terms:
                key = (term.site, term.kind)
                totals[key] = totals.get(key, 0.0) + float(term.contribution.sum())
                analytic[key] = analytic.get(key, True) and term.analytic
        terms = tuple(
            TermSummary(
                site=site,
                kind=kind,
                # "+ 0.0" turns a negated zero (a KL of exactly 0) into 0.0, not -0.0
                value=TERM_SIGNS[kind] * total / num_particles + 0.0,
                contribution=total / num_particles + 0.0,
                analytic=analytic[(site, kind)],
            )
            for (site, kind), total in totals.items()
        )
        return cls(elbo / num_particles, terms, num_particles, tuple(notes))

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

    def __str__(self) -> str:
        width = max([len(t.site) for t in self.terms] + [4])
        lines = [f"L = {self.elbo:.6g}  (mean of {self.num_particles} particle(s))"]
        lines += [f"  {'site':<{width}}  {'kind':<14} {'value':>14}  path"]
        for t in self.terms:
            path = "analytic" if t.analytic else "Monte Carlo"
            lines.append(f"  {t.site:<{width}}  {t.kind:<14} {t.value:>14.6g}  {path}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)
