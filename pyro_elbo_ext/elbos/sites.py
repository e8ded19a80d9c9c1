"""What a trace site is: the predicates every part of the engine asks, written once.

Functions
---------
is_subsample_site
    The bookkeeping site ``pyro.plate(..., subsample_size=...)`` records.
is_deterministic_site
    A ``pyro.deterministic`` site (recorded as an observed, masked ``Delta``).
is_latent_site
    A sample site that is neither observed nor subsample bookkeeping.
is_auxiliary_site
    A guide site marked ``infer={"is_auxiliary": True}``.
is_enumerated_site
    A site that ``poutine.enum`` enumerated (it has an enumeration dimension).
plate_frames
    The vectorized plates of a site as hashable :class:`Frame` s.
"""

from __future__ import annotations

from typing import NamedTuple

from pyro.poutine.subsample_messenger import _Subsample


class Frame(NamedTuple):
    """A vectorized plate a term lives in: its name and its (negative) batch dimension."""

    name: str
    dim: int


def is_subsample_site(site: dict) -> bool:
    """The bookkeeping sites that ``pyro.plate(..., subsample_size=...)`` records."""
    return isinstance(site["fn"], _Subsample)


def is_deterministic_site(site: dict) -> bool:
    """A ``pyro.deterministic`` site: an observed, fully masked ``Delta``; it holds no density."""
    return bool(site["infer"].get("_deterministic"))


def is_latent_site(site: dict) -> bool:
    """A sample site that is neither observed nor a plate's subsample bookkeeping."""
    return site["type"] == "sample" and not site["is_observed"] and not is_subsample_site(site)


def is_auxiliary_site(site: dict) -> bool:
    """A guide site marked ``infer={"is_auxiliary": True}`` (e.g. an AutoGuide's latent)."""
    return bool(site["infer"].get("is_auxiliary"))


def is_enumerated_site(site: dict) -> bool:
    """A site that ``poutine.enum`` enumerated in parallel."""
    return site["infer"].get("_enumerate_dim") is not None


_NO_FRAMES: frozenset[Frame] = frozenset()


def plate_frames(site: dict) -> frozenset[Frame]:
    """The vectorized plates of a trace site, as hashable :class:`Frame` s.

    Built directly each time: hashing Pyro's ``CondIndepStackFrame`` s (to memoize by the
    stack) rewards three times as much as building the set.
    """
    stack = site["cond_indep_stack"]
    if not stack:  # a global site
        return _NO_FRAMES
    return frozenset([Frame(f.name, f.dim) for f in stack if f.dim is not None])


__all__ = [
    "Frame",
    "is_auxiliary_site",
    "is_deterministic_site",
    "is_enumerated_site",
    "is_latent_site",
    "is_subsample_site",
    "plate_frames",
]
