"""Per-site log-densities and Pyro's estimator parts, computed once per site and memoized.

The memo keys are Pyro's own (``unscaled_log_prob``, ``log_prob``, ``score_parts``), so a site
that Pyro's ``Trace.compute_log_prob`` / ``compute_score_parts`` already visited (under
validation) is not evaluated twice, and the values are Pyro's.

Functions
---------
scaled_and_masked
    Apply a site's plate/poutine scale and its mask.
log_density
    ``fn.log_prob(value)``, unscaled.
score_parts
    Pyro's :class:`~pyro.distributions.score_parts.ScoreParts` of a site, scaled and masked as
    Pyro scales them (the score function is neither).
gradient_kind
    Pathwise, score function or mixed, from the distribution's ``score_parts``.
entropy_term, score_function
    The two gradient parts of a site's ``log q`` under that protocol.
"""

from __future__ import annotations

import torch
from pyro.distributions.score_parts import ScoreParts
from pyro.distributions.torch_distribution import (
    ExpandedDistribution,
    MaskedDistribution,
    TorchDistributionMixin,
)
from pyro.distributions.util import is_identically_zero, scale_and_mask
from torch.distributions import Independent


def scaled_and_masked(site: dict, tensor: torch.Tensor) -> torch.Tensor:
    """Apply the site's plate/poutine scale and its mask to an elementwise tensor."""
    return scale_and_mask(tensor, site["scale"], site["mask"])


def _evaluate(site: dict, method: str):
    """``fn.<method>(value, ...)`` of a site, with a ValueError that names the site."""
    try:
        return getattr(site["fn"], method)(site["value"], *site["args"], **site["kwargs"])
    except ValueError as error:
        what = "observed value" if site.get("is_observed") else "value"
        raise ValueError(
            f"site '{site['name']}' ({type(site['fn']).__name__}): cannot evaluate log_prob of "
            f"its {what}: {error}. Check the data (NaN, out of the distribution's support) or "
            "the distribution's parameters"
        ) from error


def log_density(site: dict) -> torch.Tensor:
    """``fn.log_prob(value)`` of a site, unscaled, computed once and memoized on the site."""
    cached = site.get("unscaled_log_prob")
    if cached is None:
        cached = site["unscaled_log_prob"] = _evaluate(site, "log_prob")
    return cached


def score_parts(site: dict) -> ScoreParts:
    """Pyro's estimator parts of a sampled site: ``(log_prob, score_function, entropy_term)``.

    From ``fn.score_parts(value)`` (Pyro's protocol; ``Trace_ELBO`` reads the same):
    ``log_prob`` and ``entropy_term`` scaled and masked, ``score_function`` neither.  A plain
    reparameterized distribution has ``(log q, 0, log q)``, a plain non-reparameterized one
    ``(log q, log q, 0)``; Pyro's ``Rejector`` family is reparameterized *and* carries a
    score function.  Memoized on the site.
    """
    parts = site.get("score_parts")
    if parts is None:
        raw = _evaluate(site, "score_parts")
        site.setdefault("unscaled_log_prob", raw.log_prob)
        parts = raw.scale_and_mask(site["scale"], site["mask"])
        site["score_parts"] = parts
    return parts


#: how a sampled site's gradient is estimated, from its distribution's ``score_parts``
PATHWISE, SCORE_FUNCTION, MIXED = "pathwise", "score_function", "mixed"

_WRAPPERS = (Independent, MaskedDistribution, ExpandedDistribution)


def gradient_kind(fn) -> str:
    """How Pyro's ``score_parts`` protocol estimates the gradient of a site drawn from ``fn``.

    ``PATHWISE``: the default protocol with ``has_rsample`` (parts ``(log q, 0, log q)``);
    ``SCORE_FUNCTION``: the default protocol without it (``(log q, log q, 0)``); ``MIXED``:
    the distribution (looked through ``Independent``, ``mask`` and ``expand``, which forward
    the protocol) overrides ``score_parts``, as Pyro's ``Rejector`` family does
    (reparameterized *and* a score function): its parts are then read from
    :func:`score_parts` at every step.  Decided once per trace structure (it depends only on
    the distribution's type).
    """
    while isinstance(fn, _WRAPPERS):
        fn = fn.base_dist
    if type(fn).score_parts is not TorchDistributionMixin.score_parts:
        return MIXED
    return PATHWISE if fn.has_rsample else SCORE_FUNCTION


def entropy_term(site: dict, kind: str) -> torch.Tensor | None:
    """The pathwise part of the site's scaled ``log q`` (``None`` where it is zero)."""
    if kind == PATHWISE:
        return scaled_and_masked(site, log_density(site))
    if kind == SCORE_FUNCTION:
        return None
    term = score_parts(site).entropy_term
    return None if is_identically_zero(term) else term


def score_function(site: dict, kind: str) -> torch.Tensor | None:
    """The site's score function, unscaled and unmasked (``None`` where it is zero)."""
    if kind == PATHWISE:
        return None
    if kind == SCORE_FUNCTION:
        return log_density(site)
    term = score_parts(site).score_function
    return None if is_identically_zero(term) else term


__all__ = ["MIXED", "PATHWISE", "SCORE_FUNCTION", "entropy_term", "gradient_kind",
           "log_density", "scaled_and_masked", "score_function", "score_parts"]
