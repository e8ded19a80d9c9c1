r"""ImportanceWeightedELBO: the importance-weighted bound L_K, with IWAE, DReG and VIMCO gradients.

The mathematics lives in small functions on tensors (the top half of this module); the loss
class at the bottom only runs the traces and hands their log-densities to them.

With K draws z_1..z_K from q and weights w_k = p(X, z_k) / q(z_k) (Burda, Grosse &
Salakhutdinov 2015, arXiv:1509.00519):

.. math::

    \log p(X) = \log \mathbb{E}\Big[\tfrac1K \sum_k w_k\Big]
    \;\ge\; L_K = \mathbb{E}\Big[\log \tfrac1K \sum_k w_k\Big] \;\ge\; L_1 = L,

L_K non-decreasing in K and L_K -> log p(X).  Where every latent site (of the model and the
guide) is inside a plate, the bound factorizes over the plate's elements i and the
log-mean-exp is taken per element: :math:`\hat L_K = \sum_i \log \frac1K \sum_k w_{ik}`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item
from pyro.poutine.messenger import Messenger
from pyro.poutine.trace_struct import Trace

from .densities import PATHWISE, estimator_kind, log_density, score_function
from .sites import is_subsample_site
from .tracing import trace_model_and_guide, validate_traces
from .treatments import depends_on, distribution_tensors, is_delta, stop_gradient
from .validation import check_positive_int

#: the name of the plate that vectorizes the K particles
PARTICLE_PLATE = "num_particles_vectorized"
#: the gradient estimators of ``ImportanceWeightedELBO(estimator=...)``
IW_ESTIMATORS = ("iwae", "dreg")


# ============================================================================ the mathematics
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


def score_surrogate(log_q: torch.Tensor, log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Per element, :math:`\sum_k \log q(z_k) \,\mathrm{sg}(\hat L_K - \hat L_{-k})`.

    ``log_q`` holds the log-densities of the non-reparameterized guide sites of each particle
    (same layout as ``log_w``).  Its gradient is VIMCO's score-function term; with the direct
    gradient of :func:`log_mean_exp` it is unbiased for dL_K, since
    :math:`\mathbb{E}[\nabla \log q(z_k)\, \hat L_{-k}] = 0`.
    """
    return (log_q * vimco_signal(log_w, dim)).sum(dim)


def iwae_surrogate(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""The IWAE surrogate per element: :math:`\log \frac1K \sum_k w_k` itself.

    Its gradient :math:`\sum_k \tilde w_k \nabla \log w_k` (through the reparameterized z_k and
    the parameters of p and q) is unbiased for dL_K (Burda et al. 2015).
    """
    return log_mean_exp(log_w, dim)


def dreg_surrogate(log_w_stopped: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The doubly-reparameterized surrogate (Tucker, Lawson, Gu & Maddison 2019,
    arXiv:1810.04152, eq. 5) per element, and the factor for the gradient through each z_k.

    ``log_w_stopped`` is log w_k with q's parameters detached at the reparameterized sites
    (:math:`\log p_\theta(X, z_k) - \log q_{\bar\phi}(z_k)`, z_k live).  The returned surrogate
    :math:`\sum_k \mathrm{sg}(\tilde w_k) \log w_k` gives the model's parameters
    :math:`\sum_k \tilde w_k \nabla_\theta \log p(X, z_k)` (the IWAE gradient), and the
    returned factor :math:`\mathrm{sg}(\tilde w_k)` is to be applied once more to the gradient
    arriving at z_k (a tensor hook), which makes the guide's
    :math:`\sum_k \tilde w_k^2 \,\partial \log w_k / \partial z_k \; dz_k/d\phi`.  At
    q = p(z | X), :math:`\partial \log w_k / \partial z_k = 0`: the guide's gradient is zero
    for every draw.
    """
    return log_mean_exp(log_w_stopped, dim), normalized_weights(log_w_stopped, dim)


def effective_sample_size(log_w: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Kish's effective sample size :math:`(\sum_k w_k)^2 / \sum_k w_k^2` along ``dim``."""
    a = log_w.detach()
    return torch.exp(2 * torch.logsumexp(a, dim) - torch.logsumexp(2 * a, dim))


# ============================================================================ traces -> tensors
@dataclass(frozen=True)
class WeightLayout:
    """Where the particles and the plate elements of the log-weights are.

    Attributes
    ----------
    particle_dim : int
        The (negative) dimension of the particle plate.
    local_dims : tuple of int
        Dimensions of the plates that hold every latent and observed site of model and guide:
        the bound is taken per element of these.  Empty: one joint weight per particle.
    local_plates : tuple of str
    local_factor : float
        The product of those plates' subsample scales N/B, applied outside the log-mean-exp.
    """

    particle_dim: int
    local_dims: tuple[int, ...]
    local_plates: tuple[str, ...]
    local_factor: float

    @property
    def kept_dims(self) -> frozenset[int]:
        return frozenset((self.particle_dim, *self.local_dims))


def _sample_sites(trace: Trace) -> Iterable[tuple[str, dict]]:
    return ((n, s) for n, s in trace.nodes.items()
            if s["type"] == "sample" and not is_subsample_site(s))


def _is_pathwise(site: dict) -> bool:
    """Reparameterized with no score function (Pyro's ``score_parts``: see
    :func:`~.densities.estimator_kind`)."""
    return estimator_kind(site["fn"]) == PATHWISE


def _is_subsampled(frame) -> bool:
    return frame.full_size is not None and frame.full_size != frame.size


def weight_layout(
    model_trace: Trace, guide_trace: Trace, particle_dim: int, num_particles: int
) -> WeightLayout:
    """The plates common to every sample site of both traces become per-element dims.

    Raises
    ------
    ValueError
        For a subsampled plate that some site is outside of, when ``num_particles > 1``: the
        log-mean-exp of a joint weight computed on a minibatch is not unbiased for L_K (it is
        biased upward, by Jensen's inequality on the convex log-sum-exp), so it is not a bound.
    """
    common: set | None = None
    frames: dict = {}
    for trace in (model_trace, guide_trace):
        for _, site in _sample_sites(trace):
            stack = {f for f in site["cond_indep_stack"] if f.name != PARTICLE_PLATE}
            for f in stack:
                frames.setdefault(f, f)
            common = stack if common is None else common & stack
    local = sorted((f for f in (common or ()) if f.dim is not None), key=lambda f: f.dim)
    if num_particles > 1:
        for f in frames:
            if _is_subsampled(f) and f not in local:
                raise ValueError(
                    f"ImportanceWeightedELBO: plate '{f.name}' is subsampled ({f.size} of "
                    f"{f.full_size}) but not every latent site is inside it, so the weight is "
                    "joint over the plate, and log-mean-exp of a minibatch-rescaled joint weight "
                    "is biased upward (Jensen on the convex log-sum-exp): it is not a lower "
                    "bound. Use the full plate, num_particles=1 (the ordinary ELBO), or a "
                    "model whose latents are all local to the subsampled plate"
                )
    factor = 1.0
    for f in local:
        if _is_subsampled(f):
            factor *= f.full_size / f.size
    return WeightLayout(particle_dim, tuple(f.dim for f in local),
                        tuple(f.name for f in local), factor)


def reduce_to_elements(tensor: torch.Tensor, layout: WeightLayout) -> torch.Tensor:
    """Sum a site's log-density over every batch dim but the particle and local plate dims."""
    kept = layout.kept_dims
    sum_dims = [d for d in range(-tensor.dim(), 0) if d not in kept]
    return tensor.sum(sum_dims, keepdim=True) if sum_dims else tensor


@dataclass
class LogWeights:
    """log w per particle and element, and the score of the non-reparameterized guide sites.

    ``log_w`` has the particle dim at ``layout.particle_dim`` and the local plates' dims (all
    other dims have size 1); ``log_q_score`` (same layout, or None) is the score function of
    the guide sites that have one in Pyro's ``score_parts`` (log q of a discrete site;
    rejection-sampled sites too), unscaled and unmasked.
    """

    log_w: torch.Tensor
    log_q_score: torch.Tensor | None
    layout: WeightLayout


def _site_log_density(site: dict, layout: WeightLayout, stopped: bool) -> tuple:
    """The site's log-density (raw) and its scaled, masked, reduced contribution to log w."""
    if stopped:
        raw = stop_gradient(site["fn"]).log_prob(site["value"], *site["args"], **site["kwargs"])
    else:
        raw = log_density(site)
    scale = site["scale"]
    if layout.local_factor != 1.0:
        scale = scale / layout.local_factor
    return raw, reduce_to_elements(scale_and_mask(raw, scale, site["mask"]), layout)


def log_weights(
    model_trace: Trace, guide_trace: Trace, layout: WeightLayout, stopped: Iterable[str] = ()
) -> LogWeights:
    r"""log w_k = sum of the model's log p (latent and observed) - sum of the guide's log q.

    Every site's log-density is scaled and masked (``poutine.scale``, masks) inside the
    weight, as in Pyro's ``RenyiELBO``, except the subsample scale of the local plates, which
    the caller applies outside the log-mean-exp (``layout.local_factor``).  Guide sites named
    in ``stopped`` use q with its parameters detached (DReG).  Auxiliary guide sites (in the
    guide only) contribute -log q like any other.
    """
    stopped = frozenset(stopped)
    total = None
    score = None
    for _, site in _sample_sites(model_trace):
        _, contribution = _site_log_density(site, layout, False)
        total = contribution if total is None else total + contribution
    for name, site in _sample_sites(guide_trace):
        _, contribution = _site_log_density(site, layout, name in stopped)
        total = -contribution if total is None else total - contribution
        function = score_function(site, estimator_kind(site["fn"]))
        if function is not None:  # Pyro's score_parts: discrete, or rejection-sampled
            part = reduce_to_elements(function, layout)
            score = part if score is None else score + part
    if total is None:  # an empty program: log w = 0 (L_K = 0, as Pyro's ELBOs give)
        total = torch.zeros(())
    nesting = -layout.particle_dim
    if total.dim() < nesting:
        total = total.reshape((1,) * (nesting - total.dim()) + total.shape)
    if total.dim() > nesting:  # dims left of the particle plate (invalid; summed)
        total = total.sum(list(range(total.dim() - nesting)))
    return LogWeights(total, score, layout)


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


def dreg_sites(guide_trace: Trace) -> tuple[tuple[str, ...] | None, str]:
    """The reparameterized guide sites whose q DReG detaches, or ``(None, reason)``.

    DReG needs the parameters of each site's q to be separable from its sample: every
    reparameterized site with parameters (and every score-function site) must have parameters
    that do not depend on another reparameterized sample of the guide; a ``Delta`` site (an
    AutoGuide's transformed value) may depend on parameters only through such samples.
    """
    upstream: list[torch.Tensor] = []
    upstream_nodes: set = set()
    base: list[str] = []
    for name, site in _sample_sites(guide_trace):
        fn = site["fn"]
        tensors = distribution_tensors(fn)
        if is_delta(fn):
            if _reaches_parameter(tensors, upstream_nodes):
                return None, (f"site '{name}' is a Delta whose value depends on parameters "
                              "other than through a reparameterized sample")
        elif depends_on(tensors, upstream):
            return None, (f"the parameters of q at site '{name}' depend on another "
                          "reparameterized sample (a hierarchical guide)")
        elif _is_pathwise(site):
            base.append(name)
        value = site["value"]
        if _is_pathwise(site) and torch.is_tensor(value) and value.grad_fn is not None:
            upstream.append(value)
            upstream_nodes.add(value.grad_fn)
    return tuple(base), ""


# ============================================================================ decomposition
@dataclass(frozen=True)
class ImportanceWeightedDecomposition:
    """One K-particle estimate of the importance-weighted bound, read several ways.

    Attributes
    ----------
    elbo : float
        The estimate of L_K (per-element log-mean-exp, summed, times the subsample scale).
    elbo_1 : float
        The estimate of L_1 = L from the same draws: the mean over particles of log w.
    ess : float
        Kish's effective sample size of the weights, (sum w)^2 / sum w^2, in [1, K]; the
        mean over plate elements where the bound is per element.
    ess_min : float
        The smallest per-element effective sample size (= ``ess`` for a joint weight).
    num_particles : int
    local_plates : tuple of str
        The plates the bound is taken per element of (empty: joint).
    log_evidence : float or None
        log p(X) where the caller knows it (e.g. a conjugate problem's closed form).
    gap : float or None
        ``log_evidence - elbo`` (>= 0 in expectation, shrinking as K grows).
    """

    elbo: float
    elbo_1: float
    ess: float
    ess_min: float
    num_particles: int
    local_plates: tuple[str, ...]
    log_evidence: float | None = None
    gap: float | None = None

    def __str__(self) -> str:
        where = f"per element of {list(self.local_plates)}" if self.local_plates else "joint"
        lines = [
            f"L_K = {self.elbo:.6g}  (K = {self.num_particles}, {where})",
            f"L_1 = {self.elbo_1:.6g}  (same draws)",
            f"ESS = {self.ess:.4g} of {self.num_particles}  (min {self.ess_min:.4g})",
        ]
        if self.log_evidence is not None:
            lines.append(f"log p(X) = {self.log_evidence:.6g}  gap = {self.gap:.6g}")
        return "\n".join(lines)


# ============================================================================ the loss
class ImportanceWeightedELBO(ELBO):
    r"""The importance-weighted bound L_K (IWAE) as a Pyro loss.

    .. math::

        L_K = \mathbb{E}_{z_{1:K} \sim q}\Big[\log \frac1K \sum_{k=1}^K
              \frac{p(X, z_k)}{q(z_k)}\Big] \le \log p(X)

    (Burda, Grosse & Salakhutdinov 2015, arXiv:1509.00519), estimated from K particles drawn
    in one vectorized pass (an outermost ``pyro.plate("num_particles_vectorized", K)`` at dim
    ``-(max_plate_nesting + 1)``).  Where every sample site of the model and the guide is
    inside a plate, the log-mean-exp is taken per element of the plate and summed (a tighter
    bound than the joint one); otherwise the weight is joint.

    Gradient estimators (``estimator``):

    ``"iwae"``
        :math:`\sum_k \tilde w_k \nabla \log w_k`, the normalized-weight gradient, through the
        reparameterized samples.  Unbiased for dL_K.
    ``"dreg"``
        Doubly reparameterized (Tucker, Lawson, Gu & Maddison 2019, arXiv:1810.04152): the
        guide's parameters get :math:`\sum_k \tilde w_k^2\, \partial \log w_k/\partial z_k\,
        dz_k/d\phi` (log q with its parameters detached), the model's parameters the IWAE
        gradient :math:`\sum_k \tilde w_k \nabla_\theta \log p(X, z_k)`.  Unbiased for dL_K,
        and the guide's gradient is exactly zero for every draw when q = p(z | X).  It needs
        each site's q parameters to be separable from its sample (see :func:`dreg_sites`):
        for a hierarchical guide (a reparameterized site whose q depends on another
        reparameterized sample) it warns once and uses ``"iwae"``.  It is implemented with a
        gradient hook on each such sample: a loss built from the same sample tensors
        elsewhere in the same backward pass would see its gradient rescaled too.

    Guide sites without ``rsample`` (discrete) get, under either estimator, the score-function
    gradient with VIMCO's leave-one-out control variates (Mnih & Rezende 2016,
    arXiv:1602.06725): :math:`\sum_k \nabla \log q(z_k)\,(\hat L_K - \hat L_{-k})`, plus the
    direct gradient of log q inside log w.  With K = 1 the signal has no baseline.

    Scales and masks: a site's ``poutine.scale`` factor and mask apply to its log-density
    *inside* the weight (as in Pyro's ``RenyiELBO``).  The subsample scale N/B of a plate
    that holds every site is applied *outside* the log-mean-exp: the sum over a minibatch of
    the per-element bounds, times N/B, is unbiased for the full data's L_K (Pyro's
    ``RenyiELBO`` puts it inside, which is not).  A subsampled plate that some site is
    outside of is refused when K > 1 (the minibatch's joint log-mean-exp is biased upward
    and is not a bound).

    Traces: the guide is run and the model replayed against it (sample sites only); a
    :class:`~pyro.infer.autoguide.GuideMessenger` guide (``AutoNormalMessenger``, ...) runs
    the model itself, as in Pyro's ``get_importance_trace``.  Auxiliary guide sites (guide
    only, e.g. an AutoGuide's ``_latent``) contribute -log q to log w and the ``Delta`` sites
    their ``log_density``, as in ``RenyiELBO``.  Under ``pyro.infer.util.is_validation_enabled()``
    the traces are checked as for every loss here (:func:`~.tracing.validate_traces`: Pyro's
    ``check_model_guide_match`` and ``check_site_shape``, and our stricter checks), and a
    non-finite estimate warns.  A model latent that the guide does not sample is always an
    error.  Which guide sites get the score-function (VIMCO) term comes from Pyro's
    ``score_parts``, as for the other losses: a rejection-sampled site gets one too.

    The VIMCO baseline is its own (a log-sum-exp with one weight replaced by the others'
    geometric mean), not :class:`~pyro_elbo_ext.elbos.baselines.LeaveOneOutBaseline`'s mean
    of the other particles' rewards: the signal it centres is the bound itself.

    Parameters
    ----------
    num_particles : int
        K >= 1 (K = 1 is the ordinary ELBO, and DReG is then the path-derivative estimator).
    estimator : {"iwae", "dreg"}
    max_plate_nesting : int
        The number of plates the model nests (without the particle plate); guessed from one
        run of model and guide when not given, as Pyro's ELBO does.
    jit : bool
        Compute :meth:`differentiable_loss` (and so :meth:`loss_and_grads`) with one compiled
        graph of the loss and its gradient (Inductor; see :mod:`pyro_elbo_ext.compiled`), as
        every loss here does.  ``estimator="iwae"`` only: DReG's gradient hook is not kept by
        a traced graph.
    **kwargs
        Forwarded to :class:`pyro.infer.elbo.ELBO` (``retain_graph``, ...).  The particles
        are always vectorized; ``vectorize_particles=False`` is refused.

    Examples
    --------
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}),
    ...                      loss=ImportanceWeightedELBO(num_particles=8, estimator="dreg"),
    ...                      )  # doctest: +SKIP
    """

    def __init__(
        self,
        num_particles: int = 5,
        estimator: str = "iwae",
        max_plate_nesting: float = float("inf"),
        jit: bool = False,
        vectorize_particles: bool = True,
        **kwargs,
    ):
        if estimator not in IW_ESTIMATORS:
            raise ValueError(f"estimator must be one of {IW_ESTIMATORS}, got {estimator!r}")
        if jit and estimator == "dreg":
            raise ValueError(
                "ImportanceWeightedELBO(estimator='dreg') cannot be compiled (jit=True): its "
                "gradient is rescaled by a tensor hook, which a traced graph does not keep; "
                "use jit=False, or estimator='iwae' with jit=True"
            )
        if not vectorize_particles:
            raise ValueError(
                "ImportanceWeightedELBO always vectorizes its particles (the log-mean-exp "
                "couples them); drop vectorize_particles=False"
            )
        super().__init__(
            num_particles=check_positive_int("num_particles", num_particles),
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=False,  # we add the particle plate ourselves, at every K
            **kwargs,
        )
        self.estimator = estimator
        self.jit = bool(jit)
        #: guide structure (site names) -> DReG's base sites, or None where DReG falls back
        self._dreg_plan: dict[tuple[str, ...], tuple[str, ...] | None] = {}

    # ------------------------------------------------------------------ traces
    @property
    def particle_dim(self) -> int:
        return -(int(self.max_plate_nesting) + 1)

    def _guess_nesting(self, model, guide, args, kwargs) -> None:
        """Set ``max_plate_nesting`` from one unvectorized run, as Pyro's ELBO does."""
        with poutine.block():
            traces = _run(model, guide, args, kwargs)
        dims = [f.dim for trace in traces for _, site in _sample_sites(trace)
                for f in site["cond_indep_stack"] if f.dim is not None]
        self.max_plate_nesting = -min(dims) if dims else 0

    def _get_trace(self, model, guide, args, kwargs):
        """One vectorized run of K particles: (model_trace, guide_trace), sample sites only."""
        if self.max_plate_nesting == float("inf"):
            self._guess_nesting(model, guide, args, kwargs)
        model_trace, guide_trace = _run(
            _vectorize(model, self.num_particles, self.particle_dim),
            _vectorize(guide, self.num_particles, self.particle_dim),
            args, kwargs, messenger=poutine.unwrap(guide),
        )
        if is_validation_enabled():  # Pyro's checks and ours, as for every loss here
            validate_traces(model_trace, guide_trace, -self.particle_dim)
        guide_nodes = guide_trace.nodes
        for name, site in _sample_sites(model_trace):
            if not site["is_observed"] and name not in guide_nodes:
                raise ValueError(
                    f"model latent site '{name}' is not sampled by the guide. "
                    f"ImportanceWeightedELBO needs q({name}) for every latent: add "
                    f"pyro.sample('{name}', ...) to the guide"
                )
        return model_trace, guide_trace

    def _log_weights(self, model, guide, args, kwargs) -> tuple[LogWeights, tuple[str, ...]]:
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs)
        layout = weight_layout(model_trace, guide_trace, self.particle_dim, self.num_particles)
        base = self._dreg_base(guide_trace) if self.estimator == "dreg" else ()
        weights = log_weights(model_trace, guide_trace, layout, stopped=base)
        hooked = tuple(guide_trace.nodes[name]["value"] for name in base)
        return weights, hooked

    def _dreg_base(self, guide_trace: Trace) -> tuple[str, ...]:
        """DReG's detached sites for this guide structure (decided once, with a graph)."""
        if not torch.is_grad_enabled():
            return ()
        key = tuple(name for name, _ in _sample_sites(guide_trace))
        if key not in self._dreg_plan:
            base, reason = dreg_sites(guide_trace)
            if base is None:
                warnings.warn(
                    f"ImportanceWeightedELBO(estimator='dreg'): {reason}; DReG does not apply "
                    "and the IWAE gradient is used for this guide",
                    stacklevel=4,
                )
            self._dreg_plan[key] = base
        return self._dreg_plan[key] or ()

    # ------------------------------------------------------------------ estimate and surrogate
    def _estimate_and_surrogate(self, model, guide, args, kwargs):
        weights, hooked = self._log_weights(model, guide, args, kwargs)
        dim = weights.layout.particle_dim
        factor = weights.layout.local_factor
        log_w = weights.log_w
        if hooked:
            surrogate, path_scale = dreg_surrogate(log_w, dim)
            for value in hooked:
                if value.requires_grad:
                    _scale_gradient(value, path_scale)
        else:
            surrogate = iwae_surrogate(log_w, dim)
        estimate = surrogate.detach().sum()
        if weights.log_q_score is not None:
            surrogate = surrogate + score_surrogate(weights.log_q_score, log_w, dim)
        surrogate = surrogate.sum()
        if factor != 1.0:
            estimate, surrogate = estimate * factor, surrogate * factor
        if is_validation_enabled() and not torch._C._get_tracing_state():
            _warn_if_nonfinite(estimate)
        return estimate, surrogate

    # ------------------------------------------------------------------ the ELBO interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -L_K (a float); no gradients."""
        with torch.no_grad():
            weights, _ = self._log_weights(model, guide, args, kwargs)
            estimate = log_mean_exp(weights.log_w, weights.layout.particle_dim).sum()
            value = torch_item(estimate) * weights.layout.local_factor
        if is_validation_enabled() and not math.isfinite(value):
            _warn_if_nonfinite(torch.tensor(value))
        return -value

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-L_K as a tensor: its value estimates -L_K, its gradient estimates -dL_K."""
        if self.jit:
            return self._compiled_loss(model, guide)(*args, **kwargs)
        return self._eager_differentiable_loss(model, guide, args, kwargs)

    def _eager_differentiable_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        estimate, surrogate = self._estimate_and_surrogate(model, guide, args, kwargs)
        return (surrogate.detach() - surrogate) - estimate

    def _compiled_loss(self, model, guide) -> Callable:
        """The compiled differentiable loss of this (model, guide) pair (see ``jit``)."""
        from ..compiled.jit import compiled_loss_for

        return compiled_loss_for(self, model, guide)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate -L_K and accumulate the gradient estimate into the parameters' ``.grad``."""
        if self.jit:  # the compiled gradient goes into .grad directly, without autograd
            return torch_item(self._compiled_loss(model, guide).loss_and_grads(*args, **kwargs))
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)

    def decompose(
        self, model, guide, *args, log_evidence: float | None = None, **kwargs
    ) -> ImportanceWeightedDecomposition:
        """L_K, L_1 of the same draws, the weights' effective sample size, and the gap.

        ``log_evidence`` (keyword, not passed to model and guide): log p(X) where known, e.g.
        ``problem.log_evidence`` of a conjugate problem; the gap is then log p(X) - L_K.
        """
        with torch.no_grad():
            weights, _ = self._log_weights(model, guide, args, kwargs)
        dim, factor = weights.layout.particle_dim, weights.layout.local_factor
        log_w = weights.log_w
        elbo = float(log_mean_exp(log_w, dim).sum()) * factor
        elbo_1 = float(log_w.mean(dim).sum()) * factor
        ess = effective_sample_size(log_w, dim)
        gap = None if log_evidence is None else float(log_evidence) - elbo
        return ImportanceWeightedDecomposition(
            elbo=elbo, elbo_1=elbo_1, ess=float(ess.mean()), ess_min=float(ess.min()),
            num_particles=self.num_particles, local_plates=weights.layout.local_plates,
            log_evidence=None if log_evidence is None else float(log_evidence), gap=gap,
        )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """No state: every estimate depends only on the current draws."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"ImportanceWeightedELBO has no state to restore, got {sorted(state)}")


# ============================================================================ helpers
def _run(model, guide, args, kwargs, messenger=None) -> tuple[Trace, Trace]:
    """(model_trace, guide_trace) of one run, recorded as every loss here records them
    (:func:`~.tracing.trace_model_and_guide`, Pyro's machinery).

    A :class:`~pyro.infer.autoguide.GuideMessenger` guide (``messenger``: the vectorizing
    wrapper hides it from :func:`pyro.poutine.unwrap`) runs the model inside itself.
    """
    messenger = poutine.unwrap(guide) if messenger is None else messenger
    if isinstance(messenger, Messenger):
        guide(*args, **kwargs)
        return messenger.get_traces()
    return trace_model_and_guide(model, guide, args, kwargs)


def _vectorize(fn: Callable, num_particles: int, dim: int) -> Callable:
    """``fn`` run inside the particle plate."""

    def vectorized(*args, **kwargs):
        with pyro.plate(PARTICLE_PLATE, num_particles, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def _scale_gradient(value: torch.Tensor, path_scale: torch.Tensor) -> None:
    """Multiply the gradient arriving at ``value`` by ``path_scale`` (broadcast over its event)."""
    extra = value.dim() - path_scale.dim()
    if extra > 0:
        path_scale = path_scale.reshape(path_scale.shape + (1,) * extra)
    value.register_hook(lambda grad: grad * path_scale)


def _warn_if_nonfinite(estimate: torch.Tensor) -> None:
    if not bool(torch.isfinite(estimate)):
        warnings.warn(
            "ImportanceWeightedELBO: the estimate of L_K is not finite (a weight of 0 or inf "
            "in every particle of some element: check the model's and guide's supports)",
            stacklevel=4,
        )


__all__ = [
    "IW_ESTIMATORS",
    "ImportanceWeightedDecomposition",
    "ImportanceWeightedELBO",
    "LogWeights",
    "WeightLayout",
    "dreg_sites",
    "dreg_surrogate",
    "effective_sample_size",
    "iwae_surrogate",
    "leave_one_out_bounds",
    "log_mean_exp",
    "log_weights",
    "normalized_weights",
    "score_surrogate",
    "vimco_signal",
    "weight_layout",
]
