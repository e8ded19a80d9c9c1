"""Reward transforms of the hard-attention learning signal.

Contents: :func:`zero_one_shift`, which turns the log-likelihood reward into the 0/1
correct-label reward of Ba, Mnih & Kavukcuoglu (2014, arXiv:1412.7755).
"""

from __future__ import annotations

import torch

from .densities import log_density, scaled_and_masked
from .sites import Frame, is_deterministic_site, plate_frames


def zero_one_shift(model_trace) -> dict[str, tuple[frozenset[Frame], torch.Tensor]]:
    """Per observed site: its plates and ``R - log p(y | l)``, scaled and masked.

    ``R = 1`` where the observed value is a most probable value of its distribution, else 0;
    adding this to the engine's reward (for the observed sites the reward holds: see
    :func:`shift_for`) turns the log-likelihood reward into the 0/1 reward.
    """
    shift: dict[str, tuple[frozenset[Frame], torch.Tensor]] = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        if is_deterministic_site(site):  # pyro.deterministic: not a label
            continue
        fn = site["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise ValueError(
                f"reward='zero_one' needs observed site '{name}' to have a finite support (a "
                f"class label), but its distribution is {type(fn).__name__}; use "
                "reward='log_likelihood'"
            )
        # outside no_grad: log_density memoizes, and the observed term reuses this tensor
        log_p = log_density(site).detach()
        with torch.no_grad():
            support = fn.enumerate_support(expand=False)
            best = fn.log_prob(support).max(0).values
            correct = (log_p >= best - 1e-6).to(log_p.dtype)
            value = scaled_and_masked(site, correct - log_p)
        shift[name] = (plate_frames(site), value)
    return shift


def shift_for(shift: dict[str, tuple[frozenset[Frame], torch.Tensor]],
              sites: frozenset[str] | None) -> dict[frozenset[Frame], torch.Tensor]:
    """The shift of the observed ``sites`` a score site's reward holds (``None``: all),
    summed by plates (for :func:`~.engine.sum_to_frames`)."""
    out: dict[frozenset[Frame], torch.Tensor] = {}
    for name, (frames, value) in shift.items():
        if sites is None or name in sites:
            out[frames] = out[frames] + value if frames in out else value
    return out


__all__ = ["shift_for", "zero_one_shift"]
