r"""One site's gradient surrogate under each discrete estimator, from the engine's tensors.

The engine gives a score-function site :math:`j` its reward :math:`R_j` (the terms of the
estimate that the data flow says can depend on the site's sample, :mod:`.downstream`, summed
within shared plates, detached; after Pyro's per-site baseline on a ``"relax"`` site) and its score
:math:`\log q(b_j)`; plain REINFORCE adds :math:`\log q(b_j)\,\mathrm{sg}(R_j)`.  The functions
here give what replaces that term for the other estimators (:mod:`.discrete_estimators` holds
the mathematics and its references):

- :func:`loo_surrogate` -- :math:`\log q(b_{jk})\,\mathrm{sg}(R_{jk} - \bar R_{j,-k})` over
  the vectorized particles :math:`k`;
- :func:`disarm_surrogate` -- :math:`\alpha_{jk}\,\mathrm{sg}(\hat g_{j,\text{pair}(k)})` for
  both members of each antithetic pair, :math:`\alpha` the site's logits;
- :func:`relax_surrogate_terms` -- RELAX's score term and control-variate correction, on the
  relaxation rebuilt from the noise the sampler kept.

Each returns a tensor to *add* to the surrogate (summed over the site's elements); the loss
averages over particles, so both members of a pair carry the pair's estimate.
"""

from __future__ import annotations

import torch

from .discrete_estimators import (
    _base_distribution,
    conditional_gumbel,
    conditional_logistic,
    disarm_weight,
    gumbel_relaxation,
    leave_one_out_signal,
    logistic_relaxation,
    relax_surrogate,
)
from .discrete_sampling import DiscreteDraw


def _with_event_dims(reward: torch.Tensor, like: torch.Tensor, event_dim: int) -> torch.Tensor:
    """``reward`` (the site's batch shape) with ``event_dim`` trailing singleton dimensions."""
    return reward.reshape(reward.shape + (1,) * event_dim).expand(like.shape)


def loo_surrogate(score: torch.Tensor, reward: torch.Tensor, particle_dim: int,
                  site: str) -> torch.Tensor:
    r""":math:`\sum \log q(b_k)\,\mathrm{sg}(R_k - \frac{1}{K-1}\sum_{j \ne k} R_j)` over the
    particle dimension ``particle_dim`` (Kool, van Hoof & Welling 2019)."""
    if reward.dim() < -particle_dim or reward.shape[particle_dim] < 2:
        raise ValueError(
            f"discrete_estimator='loo' at site '{site}' needs the site's reward to vary over "
            f"the vectorized particles (dim {particle_dim}); it does not"
        )
    return (score * leave_one_out_signal(reward, particle_dim).detach()).sum()


def site_logits(fn) -> torch.Tensor:
    """The logits of the distribution that draws the site (wrappers looked through), attached
    to the graph: the tensor the DisARM and RELAX surrogates differentiate."""
    return _base_distribution(fn).logits


def disarm_surrogate(fn, value: torch.Tensor, reward: torch.Tensor, draw: DiscreteDraw,
                     event_dim: int, site: str) -> torch.Tensor:
    r"""DisARM over the antithetic pairs (particle :math:`k` and :math:`k + K/2`).

    With :math:`\hat g = \tfrac12 (R_k - R_{k+K/2})\,(-1)^{\tilde b} 1[b \ne \tilde b]\,
    \sigma(|\alpha|)` per element (:func:`~.discrete_estimators.disarm_weight`), the surrogate is
    :math:`\sum_k \alpha_k\, \mathrm{sg}(\hat g_{\text{pair}(k)})`: each member carries its pair's
    estimate (the estimate is symmetric in the two members), and the loss's mean over the
    :math:`K` particles makes it the mean over the :math:`K/2` pairs.

    ``reward`` is the site's downstream reward, not the whole of L: a term that does not read
    :math:`b_j` is a function of the other sites' noise only, independent of :math:`u_j`, and
    the weight's mean over :math:`u_j` is zero, so leaving it out keeps the estimate unbiased
    and removes its noise.

    Raises
    ------
    ValueError
        When the site's logits differ between the two members of a pair: they depend on
        other random draws of the guide, and the pair is not antithetic for one distribution.
    """
    if draw.particle_dim is None:
        raise ValueError(
            f"discrete_estimator='disarm' at site '{site}' needs vectorize_particles=True "
            "(each antithetic pair is two vectorized particles)"
        )
    dim = draw.particle_dim - event_dim  # in the value's dims (events on the right)
    logits = site_logits(fn).expand(value.shape)
    half = value.shape[dim] // 2
    first, second = logits.narrow(dim, 0, half), logits.narrow(dim, half, half)
    if not torch.equal(first.detach(), second.detach()):
        raise ValueError(
            f"discrete_estimator='disarm' at site '{site}': the site's logits differ between "
            "the two members of an antithetic pair (they depend on other random draws of the "
            "guide, e.g. an upstream latent), so the pair is not antithetic for one "
            "distribution; use 'loo' or 'reinforce' for this site"
        )
    rewards = _with_event_dims(reward.detach(), value, event_dim)
    r1, r2 = rewards.narrow(dim, 0, half), rewards.narrow(dim, half, half)
    b1, b2 = value.narrow(dim, 0, half).detach(), value.narrow(dim, half, half).detach()
    g = (r1 - r2) * disarm_weight(first, b1, b2)
    return (first * g).sum() + (second * g).sum()


def relax_surrogate_terms(fn, value: torch.Tensor, score: torch.Tensor, reward: torch.Tensor,
                          draw: DiscreteDraw, control, event_dim: int) -> torch.Tensor:
    r"""RELAX at one site: :func:`~.discrete_estimators.relax_surrogate` with the relaxation
    :math:`z` rebuilt from the sampler's noise (differentiable in the logits), a fresh
    :math:`\tilde z \sim p(z \mid b)`, and the control variate ``control`` (one value per
    element of the site's batch shape).

    Returns the elementwise surrogate (the site's batch shape); its gradient in the logits is
    the RELAX estimate.
    """
    logits = site_logits(fn)
    if draw.family == "bernoulli":
        full = logits.expand(value.shape)
        z = logistic_relaxation(full, draw.noise)
        v = torch.rand(value.shape, dtype=full.dtype, device=full.device)
        z_tilde = conditional_logistic(full, value.detach(), v)
    else:
        full = logits.expand(draw.noise.shape)
        index = value.detach() if draw.family == "categorical" else value.detach().argmax(-1)
        z = gumbel_relaxation(full, draw.noise)
        v = torch.rand(draw.noise.shape, dtype=full.dtype, device=full.device)
        z_tilde = conditional_gumbel(full, index, v)
    return relax_surrogate(score, reward, z, z_tilde, control)


__all__ = ["disarm_surrogate", "loo_surrogate", "relax_surrogate_terms", "site_logits"]
