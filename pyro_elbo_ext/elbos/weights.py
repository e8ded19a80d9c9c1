r"""Importance weights: their layout over particles and plates, and the estimators' formulas.

With K draws z_1..z_K from q and weights w_k = p(X, z_k) / q(z_k) (Burda, Grosse &
Salakhutdinov 2015, arXiv:1509.00519), the importance-weighted bound's estimate is
:math:`\hat L_K = \log \frac1K \sum_k w_k`, taken per element of the plates that hold every
site (:class:`WeightLayout`).  The formulas here are small functions on tensors:
:func:`log_mean_exp` (whose autograd gradient is the IWAE estimator),
:func:`normalized_weights` (DReG's factor), :func:`leave_one_out_bounds` and
:func:`vimco_signal` (VIMCO's control variates), :func:`effective_sample_size`; and, on traces,
:func:`weight_layout`, :func:`reduce_to_elements` and :func:`dreg_sites` (which guide sites
DReG's stopped q applies to).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .densities import PATHWISE, gradient_kind
from .graphs import depends_on, distribution_tensors, is_delta
from .sites import is_subsample_site

#: the name of the plate that vectorizes the particles (Pyro's)
PARTICLE_PLATE = "num_particles_vectorized"


# ============================================================================ the formulas
def log_mean_exp(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r""":math:`\log \frac1K \sum_k e^{a_k}` along ``dim`` (the per-element estimate of L_K).

    Its autograd gradient is :math:`\sum_k \tilde w_k \nabla a_k` with the normalized weights
    :math:`\tilde w_k = w_k / \sum_j w_j`: the IWAE gradient estimator.
    """
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def normalized_weights(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r""":math:`\tilde w_k = w_k / \sum_j w_j` along ``dim``, detached (a stop-gradient weight)."""
    return torch.softmax(log_w.detach(), dim)


def leave_one_out_bounds(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""VIMCO's baselines :math:`\hat L_{-k}` (Mnih & Rezende 2016, arXiv:1602.06725, eq. 9).

    .. math::

        \hat L_{-k} = \log \frac1K \Big( \sum_{j \ne k} w_j
            + \exp\Big( \frac{1}{K-1} \sum_{j \ne k} \log w_j \Big) \Big)

    the bound with particle k's weight replaced by the geometric mean of the others'.  It does
    not depend on z_k, so it is a valid control variate for particle k's score.  Computed by a
    log-sum-exp over a K x K matrix (no cancellation); needs K >= 2.  Detached.
    """
    a = log_w.detach().movedim(dim, -1)  # (..., K)
    num = a.shape[-1]
    if num < 2:
        raise ValueError("leave-one-out bounds need at least 2 particles")
    others_mean = (a.sum(-1, keepdim=True) - a) / (num - 1)  # (..., K)
    matrix = a.unsqueeze(-2).expand(*a.shape[:-1], num, num)  # row k: all K log-weights
    eye = torch.eye(num, dtype=torch.bool, device=a.device)
    matrix = torch.where(eye, others_mean.unsqueeze(-1), matrix)  # diagonal replaced
    return (torch.logsumexp(matrix, -1) - math.log(num)).movedim(-1, dim)


def vimco_signal(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""The learning signal of particle k's score, :math:`\hat L_K - \hat L_{-k}` (detached).

    With K = 1 there is no other particle to lean on, and the signal is :math:`\hat L_1` itself
    (plain REINFORCE, still unbiased).
    """
    estimate = log_mean_exp(log_w.detach(), dim).unsqueeze(dim)
    if log_w.shape[dim] < 2:
        return estimate
    return estimate - leave_one_out_bounds(log_w, dim)


def effective_sample_size(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Kish's effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2` along ``dim``."""
    a = log_w.detach()
    return torch.exp(2 * torch.logsumexp(a, dim) - torch.logsumexp(2 * a, dim))


# ============================================================================ the layout
@dataclass(frozen=True)
class WeightLayout:
    """Which plates the bound is taken per element of.

    Attributes
    ----------
    local_dims : tuple of int
        Dimensions of the plates that hold every latent and observed site of model and guide:
        the bound is taken per element of these.  Empty: one joint weight per particle.
    local_plates : tuple of str
    local_factor : float
        The product of those plates' subsample scales N/B, applied outside the log-mean-exp.
    """

    local_dims: tuple[int, ...] = ()
    local_plates: tuple[str, ...] = ()
    local_factor: float = 1.0


def _is_subsampled(frame) -> bool:
    return frame.full_size is not None and frame.full_size != frame.size


def weight_layout(model_trace, guide_trace, num_particles: int,
                  sequential: bool) -> WeightLayout:
    """The plates common to every sample site of both traces (the particle plate aside).

    Raises
    ------
    ValueError
        When ``num_particles > 1`` and a subsampled plate is not common to every site: the
        log-mean-exp of a joint weight computed on a minibatch is not unbiased for L_K (it is
        biased upward, by Jensen's inequality on the convex log-sum-exp), so it is not a
        bound; and, for ``sequential`` particles (each drawing its own minibatch), for any
        subsampled plate.
    """
    common: set | None = None
    frames: dict = {}
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] != "sample" or is_subsample_site(site):
                continue
            stack = {f for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE}
            for f in stack:
                frames.setdefault(f, f)
            common = stack if common is None else common & stack
    local = sorted((f for f in (common or ()) if f.dim is not None), key=lambda f: f.dim)
    if num_particles > 1:
        for f in frames:
            if not _is_subsampled(f):
                continue
            if sequential:
                raise ValueError(
                    f"ImportanceWeightedELBO: plate '{f.name}' is subsampled ({f.size} of "
                    f"{f.full_size}) and the particles are sequential "
                    "(vectorize_particles=False), so each particle draws its own minibatch "
                    "and no element's weights can be averaged over particles. Use "
                    "vectorize_particles=True (the particles share one minibatch), the full "
                    "plate, or num_particles=1"
                )
            if f not in local:
                raise ValueError(
                    f"ImportanceWeightedELBO: plate '{f.name}' is subsampled ({f.size} of "
                    f"{f.full_size}) but not every latent site is inside it, so the weight is "
                    "joint over the plate, and log-mean-exp of a minibatch-rescaled joint "
                    "weight is biased upward (Jensen on the convex log-sum-exp): it is not a "
                    "lower bound. Use the full plate, num_particles=1 (the ordinary ELBO), or "
                    "a model whose latents are all local to the subsampled plate"
                )
    factor = 1.0
    for f in local:
        if _is_subsampled(f):
            factor *= f.full_size / f.size
    return WeightLayout(tuple(f.dim for f in local), tuple(f.name for f in local), factor)


def reduce_to_elements(tensor: torch.Tensor, kept: Iterable[int]) -> torch.Tensor:
    """Sum a tensor over every dimension but ``kept`` (negative dims), keeping the dims."""
    kept = frozenset(kept)
    sum_dims = [d for d in range(-tensor.dim(), 0) if d not in kept]
    return tensor.sum(sum_dims, keepdim=True) if sum_dims else tensor


# ============================================================================ DReG's sites
def _reaches_parameter(tensors: Iterable[torch.Tensor], through: set) -> bool:
    """Whether any of ``tensors`` depends on a leaf (parameter) other than via ``through``."""
    stack = []
    for t in tensors:
        if not torch.is_tensor(t) or not t.requires_grad:
            continue
        if t.grad_fn is None:
            return True  # the tensor is itself a parameter
        stack.append(t.grad_fn)
    seen: set = set()
    while stack:
        node = stack.pop()
        if node in seen or node in through:
            continue
        seen.add(node)
        if getattr(node, "variable", None) is not None:
            return True
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return False


def dreg_sites(guide_trace) -> tuple[tuple[str, ...] | None, str]:
    """The reparameterized guide sites whose q DReG detaches, or ``(None, reason)``.

    DReG needs the parameters of each site's q to be separable from its sample: every
    reparameterized site with parameters (and every score-function site) must have parameters
    that do not depend on another reparameterized sample of the guide; a ``Delta`` site (an
    AutoGuide's transformed value) may depend on parameters only through such samples.  An
    autograd walk: it needs the traces' gradient graph.
    """
    upstream: list[torch.Tensor] = []
    upstream_nodes: set = set()
    base: list[str] = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or is_subsample_site(site):
            continue
        fn = site["fn"]
        pathwise = gradient_kind(fn) == PATHWISE
        tensors = distribution_tensors(fn)
        if is_delta(fn):
            if _reaches_parameter(tensors, upstream_nodes):
                return None, (f"site '{name}' is a Delta whose value depends on parameters "
                              "other than through a reparameterized sample")
        elif depends_on(tensors, upstream):
            return None, (f"the parameters of q at site '{name}' depend on another "
                          "reparameterized sample (a hierarchical guide)")
        elif pathwise:
            base.append(name)
        value = site["value"]
        if pathwise and torch.is_tensor(value) and value.grad_fn is not None:
            upstream.append(value)
            upstream_nodes.add(value.grad_fn)
    return tuple(base), ""


def scale_gradient(value: torch.Tensor, factor: torch.Tensor, event_dim: int) -> None:
    """Multiply the gradient arriving at a site's ``value`` by ``factor`` (per particle and
    element; broadcast over the site's event, and over the plates it is not in)."""
    batch_dim = value.dim() - event_dim
    while factor.dim() > batch_dim and factor.shape[0] == 1:
        factor = factor.squeeze(0)
    factor = factor.reshape(factor.shape + (1,) * event_dim)
    value.register_hook(lambda grad: grad * factor)


__all__ = [
    "PARTICLE_PLATE",
    "WeightLayout",
    "dreg_sites",
    "effective_sample_size",
    "leave_one_out_bounds",
    "log_mean_exp",
    "normalized_weights",
    "reduce_to_elements",
    "scale_gradient",
    "vimco_signal",
    "weight_layout",
]
