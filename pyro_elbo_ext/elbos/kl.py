"""Closed-form KL divergences through the wrappers Pyro puts around distributions.

Contents: :func:`analytic_kl` (KL[q || p] element by element) and :func:`same_value` (are two
scales or masks equal).
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_distribution import ExpandedDistribution, MaskedDistribution
from torch.distributions import Independent, kl_divergence


def analytic_kl(q, p) -> torch.Tensor:
    """KL[q || p] element by element over the broadcast batch shape of ``q`` and ``p``.

    Looks through the wrappers Pyro puts around distributions before asking
    :func:`torch.distributions.kl_divergence` (which holds torch's and Pyro's registrations):

    - ``MaskedDistribution`` (``fn.mask(m)``): allowed only when both sides carry the same
      mask; the KL is zero where the mask is false (where both log-densities are zero);
    - ``ExpandedDistribution`` (``fn.expand(shape)``): the KL of the base, broadcast;
    - ``Independent`` (``fn.to_event(n)``) on both sides: the shared reinterpreted
      dimensions are summed, the rest handled recursively.

    Parameters
    ----------
    q, p : torch.distributions.Distribution
        The guide's and the model's distribution of one site.

    Returns
    -------
    torch.Tensor
        Shaped ``torch.broadcast_shapes(q.batch_shape, p.batch_shape)``.

    Raises
    ------
    NotImplementedError
        When no closed form is registered for the pair (or the masks differ).
    """
    shape = q.batch_shape
    if p.batch_shape != shape:  # torch.broadcast_shapes costs ~5 µs even for equal shapes
        shape = torch.broadcast_shapes(shape, p.batch_shape)
    q_masked, p_masked = isinstance(q, MaskedDistribution), isinstance(p, MaskedDistribution)
    if q_masked or p_masked:
        if not (q_masked and p_masked) or not same_value(q._mask, p._mask):
            raise NotImplementedError("guide and model distributions carry different masks")
        kl = analytic_kl(q.base_dist, p.base_dist)
        mask = q._mask
        if mask is False:
            kl = torch.zeros_like(kl)
        elif mask is not True:
            kl = torch.where(mask, kl, kl.new_zeros(()))
    elif isinstance(q, ExpandedDistribution):
        kl = analytic_kl(q.base_dist, p)
    elif isinstance(p, ExpandedDistribution):
        kl = analytic_kl(q, p.base_dist)
    elif isinstance(q, Independent) and isinstance(p, Independent):
        nq, np_ = q.reinterpreted_batch_ndims, p.reinterpreted_batch_ndims
        shared = min(nq, np_)
        q_inner = Independent(q.base_dist, nq - shared) if nq > shared else q.base_dist
        p_inner = Independent(p.base_dist, np_ - shared) if np_ > shared else p.base_dist
        kl = analytic_kl(q_inner, p_inner)
        if shared:
            kl = kl.sum(tuple(range(-shared, 0)))
    else:
        kl = kl_divergence(q, p)
        if not torch.is_tensor(kl):
            kl = torch.as_tensor(kl)
    return kl if kl.shape == shape else kl.expand(shape)


def same_value(a, b) -> bool:
    """Whether two scales or masks (numbers, bools, tensors or None) are equal.

    Evaluated at every step, not once per trace structure: a mask or scale is whatever tensor
    the model and guide compute on that call (a data-dependent ``poutine.mask``, a subsample's
    mask), so equal masks at one step say nothing about the next.  The identity check comes
    first, so the tensor comparison (and its device sync) only happens when the model and
    guide pass different tensor objects.
    """
    if a is b:
        return True
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool((a == b).all())
    if torch.is_tensor(a) or torch.is_tensor(b) or a is None or b is None:
        return False
    return a == b


__all__ = ["analytic_kl", "same_value"]
