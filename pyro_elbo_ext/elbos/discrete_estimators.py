r"""Gradient estimators for discrete latent variables, as small pure tensor functions.

The problem: the gradient of :math:`\mathbb{E}_{q_\alpha(b)}[f(b)]` with respect to the
parameters :math:`\alpha` of a discrete distribution (logits of independent Bernoulli variables,
or of a Categorical), where :math:`f` may be evaluated at discrete points only (the model's log
joint at the sampled latents) or, for the relaxation-based estimators, also at continuous
relaxations of them.  Every function here works on tensors (any leading batch shape), knows
nothing of Pyro, and is tested against exact gradients by enumeration
(``tests/test_discrete_estimators.py``); the losses wire them into their sites.

Names (:data:`ESTIMATORS`) and what each needs per gradient estimate, counting evaluations of
:math:`f` (a model evaluation):

``"reinforce"``
    :math:`\hat g = f(b)\, \nabla_\alpha \log q_\alpha(b)` (Williams 1992), averaged over
    :math:`K` independent samples; any baseline that does not depend on :math:`b` keeps it
    unbiased.  :math:`K` evaluations.
``"loo"``
    Leave-one-out baseline across :math:`K \ge 2` independent samples (Kool, van Hoof &
    Welling 2019, "Buy 4 REINFORCE samples, get a baseline for free!", ICLR workshop;
    Mnih & Rezende 2016, arXiv:1602.06725):
    :math:`\hat g = \frac1K \sum_k \bigl(f(b_k) - \frac1{K-1}\sum_{j\ne k} f(b_j)\bigr)
    \nabla_\alpha \log q_\alpha(b_k)`, unbiased because the baseline of sample :math:`k` is
    independent of it.  :func:`leave_one_out_signal`.  :math:`K` evaluations.
``"disarm"``
    DisARM (Dong, Mnih & Tucker 2020, arXiv:2006.10680), Bernoulli only: one antithetic pair
    :math:`b = 1[u < \sigma(\alpha)]`, :math:`\tilde b = 1[1 - u < \sigma(\alpha)]` from one
    uniform :math:`u` per dimension, and per dimension :math:`i`

    .. math::

        \hat g_i = \tfrac12 \bigl(f(b) - f(\tilde b)\bigr)\, (-1)^{\tilde b_i}\,
                   1[b_i \ne \tilde b_i]\, \sigma(|\alpha_i|),

    ARM (Yin & Zhou 2019, arXiv:1807.11143) with the augmenting uniform integrated out
    analytically, which can only lower the variance.  The multi-sample form for :math:`2m`
    evaluations averages :math:`m` independent pairs (:func:`disarm_logit_gradient` with a
    pair dimension).  A Categorical site has no DisARM here: its coupled extensions (Dong,
    Mnih & Tucker 2021, arXiv:2106.08056; ARSM, Yin, Yue & Zhou 2019, arXiv:1905.01413) are
    not implemented, and asking for one is an error naming the estimators that apply.
    2 evaluations per pair.
``"relax"``
    RELAX (Grathwohl et al. 2018, arXiv:1711.00123): with the relaxation :math:`z` of
    :math:`b = H(z)` (logistic noise for Bernoulli, :func:`logistic_relaxation`; Gumbel noise
    for Categorical, :func:`gumbel_relaxation`) and :math:`\tilde z \sim p(z \mid b)`
    (:func:`conditional_logistic`, :func:`conditional_gumbel`),

    .. math::

        \hat g = \bigl(f(b) - c_\phi(\tilde z)\bigr) \nabla_\alpha \log q_\alpha(b)
                 + \nabla_\alpha c_\phi(z) - \nabla_\alpha c_\phi(\tilde z),

    unbiased for any control variate :math:`c_\phi`; :math:`\phi` is trained to minimize the
    variance, whose gradient :math:`\nabla_\phi \mathbb{E}\|\hat g\|^2
    = \mathbb{E}[2 \hat g^\top \nabla_\phi \hat g]` needs the second derivative
    :math:`\nabla_\phi \nabla_\alpha c_\phi` (:func:`relax_surrogate` returns the pieces;
    :func:`variance_objective`).  REBAR (Tucker et al. 2017, arXiv:1703.07370) is the special
    case :math:`c_\phi(z) = \eta\, f(\sigma(z / \lambda))` (:class:`ControlVariate` with
    ``use_relaxed_f=True``), which evaluates :math:`f` at two relaxed points as well: 3
    evaluations per sample; a neural :math:`c_\phi` alone needs 1.
``"gumbel_st"``
    Straight-through Gumbel-softmax (Jang, Gu & Poole 2017, arXiv:1611.01144; Maddison, Mnih &
    Teh 2017, arXiv:1611.00712; Bengio, Léonard & Courville 2013, arXiv:1308.3432): the forward
    pass uses the discrete :math:`b = H(z)`, the backward pass the relaxed
    :math:`\sigma(z/\lambda)` (:func:`straight_through_bernoulli`,
    :func:`straight_through_one_hot`): :math:`\hat g = \nabla_b f(b)\,
    \partial \sigma(z/\lambda) / \partial\alpha`.  **Biased**: its mean is the gradient of
    neither :math:`\mathbb{E}[f(b)]` nor the relaxed objective (not even for a linear
    :math:`f`, where it is :math:`\nabla_\alpha \mathbb{E}[\sigma(z/\lambda)]`, not
    :math:`\nabla_\alpha \sigma(\alpha)`); it needs :math:`f` differentiable in a continuous
    :math:`b`, and its bias is measured (``benchmarks/discrete_toys.py``), not assumed small.
    1 evaluation per sample.

Bernoulli conventions: ``logits`` :math:`\alpha`, :math:`p = \sigma(\alpha)`, :math:`b \in
\{0, 1\}` as floats.  Categorical conventions: ``logits`` of shape ``(..., K)``, a sample is
an index (``Categorical``) or a one-hot vector (``OneHotCategorical``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

#: the estimator names a site may ask for, in the order of the docs
ESTIMATORS = ("reinforce", "loo", "disarm", "relax", "gumbel_st")

#: the estimators that are not unbiased (said in docstrings, ``decompose`` and the tables)
BIASED_ESTIMATORS = frozenset({"gumbel_st"})

#: model (f) evaluations one gradient sample of each estimator costs, for comparisons at
#: equal cost: a DisARM sample is a pair; REBAR's control variate adds two relaxed evaluations
EVALUATIONS_PER_SAMPLE = {"reinforce": 1, "loo": 1, "disarm": 2, "relax": 1, "rebar": 3,
                          "gumbel_st": 1}

#: the fewest samples (model evaluations) each estimator needs
MIN_EVALUATIONS = {"reinforce": 1, "loo": 2, "disarm": 2, "relax": 1, "gumbel_st": 1}


# ---------------------------------------------------------------------------- noise
def _open_unit(u: torch.Tensor) -> torch.Tensor:
    """``u`` clamped into the open interval (0, 1), so that logs and logits stay finite."""
    tiny = torch.finfo(u.dtype).tiny
    eps = torch.finfo(u.dtype).eps
    return u.clamp(tiny, 1.0 - eps)


def _logit(u: torch.Tensor) -> torch.Tensor:
    return torch.log(u) - torch.log1p(-u)


# ---------------------------------------------------------------------------- score function
def score_function_surrogate(log_prob: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
    r"""``log_prob * stop_grad(signal)``: its gradient is :math:`\text{signal}\,\nabla\log q(b)`.

    Parameters
    ----------
    log_prob : Tensor
        :math:`\log q_\alpha(b)` of the drawn sample, differentiable in :math:`\alpha`.
    signal : Tensor
        The learning signal: the reward :math:`f(b)` minus a baseline that does not depend on
        :math:`b` (REINFORCE), or :func:`leave_one_out_signal`; broadcast against
        ``log_prob``.  Detached here.

    Returns
    -------
    Tensor
        Elementwise surrogate (sum or average it as the estimate requires).
    """
    return log_prob * signal.detach()


def leave_one_out_signal(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    r"""Each sample's reward minus the mean of the *other* samples' rewards along ``dim``.

    .. math::

        s_k = f_k - \frac{1}{K-1} \sum_{j \ne k} f_j = \frac{K}{K-1}\,(f_k - \bar f)

    With :math:`K` independent samples, :math:`\frac1K \sum_k s_k \nabla \log q(b_k)` is an
    unbiased gradient of :math:`\mathbb{E}[f]` (the baseline of sample :math:`k` is
    independent of :math:`b_k`; Kool, van Hoof & Welling 2019).

    Raises
    ------
    ValueError
        When ``values`` has fewer than 2 samples along ``dim``.
    """
    k = values.shape[dim]
    if k < 2:
        raise ValueError(
            f"the leave-one-out baseline needs at least 2 samples along dim {dim}, got {k}"
        )
    return (values - values.mean(dim, keepdim=True)) * (k / (k - 1))


# ---------------------------------------------------------------------------- DisARM
def antithetic_bernoulli(
    logits: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The antithetic pair of ARM/DisARM from one uniform per dimension.

    :math:`b = 1[u < \sigma(\alpha)]` and :math:`\tilde b = 1[1 - u < \sigma(\alpha)]`: each is
    Bernoulli(:math:`\sigma(\alpha)`), and they are maximally negatively correlated
    (:math:`P(b=1, \tilde b=1) = \max(0, 2p-1)`, :math:`P(b \ne \tilde b) = 2\min(p, 1-p)`).

    Returns
    -------
    b, b_tilde : Tensor
        Floats in {0, 1}, of the broadcast shape of ``logits`` and ``u``.
    """
    probs = torch.sigmoid(logits.detach())
    u = u.to(probs)
    return (u < probs).to(probs.dtype), (1.0 - u < probs).to(probs.dtype)


def disarm_weight(
    logits: torch.Tensor, b: torch.Tensor, b_tilde: torch.Tensor
) -> torch.Tensor:
    r"""DisARM's per-dimension weight :math:`\tfrac12 (-1)^{\tilde b_i} 1[b_i \ne \tilde b_i]
    \sigma(|\alpha_i|)` (Dong, Mnih & Tucker 2020, eq. 5), detached.

    The DisARM gradient with respect to the logits is ``(f(b) - f(b_tilde)) * weight``.
    """
    logits = logits.detach()
    differs = (b != b_tilde).to(logits.dtype)
    return 0.5 * (1.0 - 2.0 * b_tilde.to(logits.dtype)) * differs * torch.sigmoid(logits.abs())


def disarm_logit_gradient(
    logits: torch.Tensor,
    f_b: torch.Tensor,
    f_b_tilde: torch.Tensor,
    b: torch.Tensor,
    b_tilde: torch.Tensor,
    event_dim: int = 0,
    pair_dim: int | None = None,
) -> torch.Tensor:
    r"""The DisARM estimate of :math:`\nabla_\alpha \mathbb{E}[f(b)]` (detached).

    .. math::

        \hat g_i = \tfrac12 \bigl(f(b) - f(\tilde b)\bigr) (-1)^{\tilde b_i}
                   1[b_i \ne \tilde b_i]\, \sigma(|\alpha_i|)

    Parameters
    ----------
    logits : Tensor
        :math:`\alpha`, shape ``batch + event``.
    f_b, f_b_tilde : Tensor
        :math:`f` at the two members of each antithetic pair, shape ``batch`` (the event
        dimensions of ``logits`` are summed into :math:`f`).
    b, b_tilde : Tensor
        The pair (:func:`antithetic_bernoulli`).
    event_dim : int
        How many rightmost dimensions of ``logits`` belong to one draw of :math:`b` (an
        ``Independent`` Bernoulli's event dimensions): ``f`` is broadcast over them.
    pair_dim : int, optional
        A batch dimension indexing :math:`m` independent pairs, averaged over (the
        multi-sample form: :math:`2m` evaluations, variance divided by :math:`m`).

    Returns
    -------
    Tensor
        Shape of ``logits`` (without ``pair_dim`` when given).
    """
    diff = (f_b - f_b_tilde).detach()
    diff = diff.reshape(diff.shape + (1,) * event_dim)
    grad = diff * disarm_weight(logits, b, b_tilde)
    return grad.mean(pair_dim) if pair_dim is not None else grad


def disarm_surrogate(logits: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
    r"""``logits * stop_grad(gradient)``: its gradient with respect to anything upstream of the
    logits (a network's weights) is the chain rule applied to the DisARM estimate
    :math:`\hat g` (:func:`disarm_logit_gradient`)."""
    return logits * gradient.detach()


# ---------------------------------------------------------------------------- relaxations
def logistic_relaxation(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""The logistic reparameterization :math:`z = \alpha + \log u - \log(1 - u)`.

    :math:`z \sim \mathrm{Logistic}(\alpha, 1)`, and :math:`b = H(z) = 1[z > 0]` is
    Bernoulli(:math:`\sigma(\alpha)`).  Differentiable in ``logits``.
    """
    return logits + _logit(_open_unit(u.to(logits)))


def conditional_logistic(logits: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\tilde z \sim p(z \mid b)` for the logistic relaxation, reparameterized by
    ``v`` ~ U(0, 1) (Tucker et al. 2017, appendix).

    Given :math:`b`, :math:`u` is uniform on :math:`(1 - p, 1)` (:math:`b = 1`) or
    :math:`(0, 1 - p)` (:math:`b = 0`); in closed form

    .. math::

        \tilde z = \log\Bigl(1 + \frac{v}{(1 - v)(1 - p)}\Bigr) \ (b = 1), \qquad
        \tilde z = -\log\Bigl(1 + \frac{1 - v}{v\, p}\Bigr) \ (b = 0).

    Differentiable in ``logits`` (with :math:`b` and :math:`v` held fixed).
    """
    v = _open_unit(v.to(logits))
    # log(1 - p) = -softplus(logits), log p = -softplus(-logits)
    log_one_minus_p = -nn.functional.softplus(logits)
    log_p = -nn.functional.softplus(-logits)
    # log(1 + e^x) as softplus: finite (and its gradient too) for any logits, float32 included
    positive = nn.functional.softplus(torch.log(v) - torch.log1p(-v) - log_one_minus_p)
    negative = -nn.functional.softplus(torch.log1p(-v) - torch.log(v) - log_p)
    return torch.where(b.bool(), positive, negative)


def gumbel_relaxation(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""The Gumbel-max reparameterization :math:`z_k = \log \pi_k - \log(-\log u_k)`.

    ``logits`` has the categories in the last dimension and is normalized here
    (:math:`\log\pi = \mathrm{log\_softmax}(\alpha)`); :math:`\arg\max_k z_k` is
    Categorical(:math:`\pi`) and :math:`\max_k z_k` is standard Gumbel, independent of it.
    """
    log_pi = torch.log_softmax(logits, -1)
    return log_pi - torch.log(-torch.log(_open_unit(u.to(log_pi))))


def conditional_gumbel(logits: torch.Tensor, b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r""":math:`\tilde z \sim p(z \mid \arg\max z = b)` for the Gumbel relaxation,
    reparameterized by ``v`` ~ U(0, 1)^K (Tucker et al. 2017, appendix; Grathwohl et al. 2018).

    With :math:`\log\pi` normalized, the maximum is standard Gumbel and the others are Gumbels
    truncated below it:

    .. math::

        \tilde z_b = -\log(-\log v_b), \qquad
        \tilde z_k = -\log\Bigl(-\frac{\log v_k}{\pi_k} - \log v_b\Bigr) \quad (k \ne b).

    Parameters
    ----------
    logits : Tensor
        Shape ``(..., K)``.
    b : Tensor
        The category index, shape ``(...)`` (integer).
    v : Tensor
        Uniforms of shape ``(..., K)``.
    """
    log_pi = torch.log_softmax(logits, -1)
    v = _open_unit(v.to(log_pi))
    log_v = torch.log(v)
    index = b.long().unsqueeze(-1)
    log_v_b = log_v.gather(-1, index.expand(log_v.shape[:-1] + (1,)))
    top = -torch.log(-log_v_b)
    # -log(-log v_k / pi_k - log v_b), as a logaddexp: finite for any logits
    others = -torch.logaddexp(torch.log(-log_v) - log_pi, torch.log(-log_v_b))
    is_b = torch.zeros_like(log_v, dtype=torch.bool).scatter(-1, index.expand(
        log_v.shape[:-1] + (1,)), True)
    return torch.where(is_b, top.expand_as(others), others)


def straight_through_bernoulli(
    logits: torch.Tensor, u: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""Straight-through Gumbel (logistic) sample: value :math:`H(z)`, gradient of
    :math:`\sigma(z/\lambda)`, with :math:`z` from :func:`logistic_relaxation`.

    ``hard + (soft - stop_grad(soft))``: forward it is exactly Bernoulli(:math:`\sigma(\alpha)`);
    :math:`\nabla_\alpha f` through it is the biased straight-through estimate.
    """
    z = logistic_relaxation(logits, u)
    soft = torch.sigmoid(z / temperature)
    hard = (z > 0).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly hard in value (no rounding of hard + soft)


def straight_through_one_hot(
    logits: torch.Tensor, u: torch.Tensor, temperature: float | torch.Tensor = 1.0
) -> torch.Tensor:
    r"""Straight-through Gumbel-softmax sample: value one-hot(:math:`\arg\max z`), gradient of
    :math:`\mathrm{softmax}(z/\lambda)`, with :math:`z` from :func:`gumbel_relaxation`.

    Forward it is exactly OneHotCategorical(logits); the gradient through it is biased.
    """
    z = gumbel_relaxation(logits, u)
    soft = torch.softmax(z / temperature, -1)
    hard = nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())


# ---------------------------------------------------------------------------- RELAX
class ControlVariate(nn.Module):
    r"""A RELAX control variate :math:`c_\phi(z)` on the relaxation :math:`z`.

    .. math::

        c_\phi(z) = \eta\, f(\sigma(z/\lambda)) + r_\rho(z)

    with :math:`\eta` and :math:`\log\lambda` learned scalars and :math:`r_\rho` a small MLP
    over the (flattened) relaxation (its output layer starts at zero, so that a neural control
    variate starts as plain REINFORCE), each part optional:

    * ``use_relaxed_f=True, hidden=0``: REBAR's control variate (Tucker et al. 2017);
    * ``use_relaxed_f=True, hidden>0``: RELAX as in Grathwohl et al. (2018), section 3.2;
    * ``use_relaxed_f=False``: a neural control variate that never evaluates :math:`f` (one
      model evaluation per sample).

    :math:`\sigma(z/\lambda)` is the sigmoid for Bernoulli relaxations and the softmax over the
    last dimension for Categorical ones (``categorical=True``).

    Parameters
    ----------
    event_shape : tuple of int
        The shape of one relaxation :math:`z` (the dimensions the network reads).
    f : callable, optional
        :math:`f` on relaxed inputs (required with ``use_relaxed_f``).
    hidden : int
        Width of :math:`r_\rho`'s hidden layer; 0 for no network.
    """

    def __init__(
        self,
        event_shape: tuple[int, ...],
        f: Callable[[torch.Tensor], torch.Tensor] | None = None,
        use_relaxed_f: bool = False,
        hidden: int = 16,
        categorical: bool = False,
        eta: float = 1.0,
        temperature: float = 0.5,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if use_relaxed_f and f is None:
            raise ValueError("use_relaxed_f=True needs f, the function on relaxed inputs")
        if not use_relaxed_f and hidden <= 0:
            raise ValueError("a control variate needs use_relaxed_f=True or hidden > 0")
        dtype = dtype or torch.get_default_dtype()
        self.event_shape = tuple(event_shape)
        self.f = f
        self.use_relaxed_f = use_relaxed_f
        self.categorical = categorical
        self.eta = nn.Parameter(torch.tensor(float(eta), dtype=dtype))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature), dtype=dtype))
        self.net = None
        if hidden > 0:
            width = math.prod(self.event_shape)
            self.net = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 1)).to(dtype)
            nn.init.zeros_(self.net[2].weight)  # r starts at 0: RELAX starts at REINFORCE
            nn.init.zeros_(self.net[2].bias)

    def relaxed(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma(z/\lambda)` (sigmoid, or softmax over the last dimension)."""
        scaled = z / self.log_temperature.exp()
        return torch.softmax(scaled, -1) if self.categorical else torch.sigmoid(scaled)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`c_\\phi(z)`, one value per draw (shape ``z.shape[:-len(event_shape)]``)."""
        batch = z.shape[: z.dim() - len(self.event_shape)]
        out = torch.zeros(batch, dtype=z.dtype, device=z.device)
        if self.use_relaxed_f:
            out = out + self.eta * self.f(self.relaxed(z))
        if self.net is not None:
            out = out + self.net(z.reshape(batch + (-1,))).squeeze(-1)
        return out


def relax_surrogate(
    log_prob: torch.Tensor,
    f_b: torch.Tensor,
    z: torch.Tensor,
    z_tilde: torch.Tensor,
    control: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    r"""A scalar-per-draw surrogate whose gradient in :math:`\alpha` is the RELAX estimate.

    .. math::

        s = \log q_\alpha(b)\, \bigl[f(b) - c_\phi(\bar z)\bigr] + c_\phi(z) - c_\phi(\tilde z),

    where :math:`\bar z` is :math:`\tilde z` with the gradient to :math:`\alpha` stopped (but
    not the gradient to :math:`\phi`; computed without a second evaluation of :math:`c_\phi`).
    So :math:`\nabla_\alpha s` is

    .. math::

        \hat g = \bigl(f(b) - c_\phi(\tilde z)\bigr) \nabla_\alpha \log q_\alpha(b)
                 + \nabla_\alpha c_\phi(z) - \nabla_\alpha c_\phi(\tilde z),

    unbiased for every :math:`\phi` (the last two terms have equal expectations, since
    :math:`\tilde z \mid b` and :math:`b` together have the law of :math:`z`; the first is
    REINFORCE with the baseline :math:`\mathbb{E}[c(\tilde z) \mid b]` accounted for), and
    ``torch.autograd.grad(s.sum(), alpha, create_graph=True)`` is :math:`\hat g` as a
    differentiable function of :math:`\phi`, for :func:`variance_objective`.

    Parameters
    ----------
    log_prob : Tensor
        :math:`\log q_\alpha(b)`, one value per draw (event dimensions summed).
    f_b : Tensor
        :math:`f(b)`, one value per draw (detached here).
    z, z_tilde : Tensor
        The relaxation (:func:`logistic_relaxation` / :func:`gumbel_relaxation`) and the
        conditional one (:func:`conditional_logistic` / :func:`conditional_gumbel`), both
        differentiable in :math:`\alpha`.
    control : callable
        :math:`c_\phi`, one value per draw.
    """
    c_z = control(z)
    c_z_tilde = control(z_tilde)
    # log q * (f - c_bar) with c_bar = c(z~) blocked to alpha only: (log q - stop(log q)) is zero
    # in value and log q in gradient, so -(log q - stop(log q)) * c(z~) contributes
    # -c(z~) grad log q and nothing through grad_alpha c(z~); one evaluation of c at z~
    return (log_prob * f_b.detach() - (log_prob - log_prob.detach()) * c_z_tilde
            + c_z - c_z_tilde)


def variance_objective(gradient_estimates: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    r"""The single-sample variance objective of RELAX: :math:`\sum_i \hat g_i^2`.

    Its expectation is the total variance of :math:`\hat g` plus :math:`\|\nabla\|^2`, which
    does not depend on :math:`\phi`; so its gradient in :math:`\phi` (through the
    ``create_graph=True`` estimate) is an unbiased gradient of the variance
    (Grathwohl et al. 2018, eq. 5).  Accepts a tensor or a list of them (one per parameter).
    """
    if isinstance(gradient_estimates, torch.Tensor):
        gradient_estimates = [gradient_estimates]
    return sum((g**2).sum() for g in gradient_estimates)


# ---------------------------------------------------------------------------- applicability
def _base_distribution(fn):
    """Unwrap Independent / masked / expanded wrappers to the distribution that samples."""
    seen = 0
    while seen < 16:
        seen += 1
        inner = getattr(fn, "base_dist", None)
        if inner is None or not isinstance(inner, torch.distributions.Distribution):
            return fn
        fn = inner
    return fn


def distribution_family(fn) -> str:
    """``"bernoulli"``, ``"categorical"``, ``"one_hot_categorical"`` or ``"other"``.

    Wrappers (``Independent`` from ``.to_event``, Pyro's masked and expanded distributions)
    are looked through.
    """
    base = _base_distribution(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        return "bernoulli"
    if isinstance(base, torch.distributions.OneHotCategorical):
        return "one_hot_categorical"
    if isinstance(base, torch.distributions.Categorical):
        return "categorical"
    return "other"


#: which estimators apply to which distribution family
_APPLICABLE = {
    "bernoulli": ESTIMATORS,
    "categorical": ("reinforce", "loo", "relax"),
    "one_hot_categorical": ("reinforce", "loo", "relax", "gumbel_st"),
    "other": ("reinforce", "loo"),
}

_WHY_NOT = {
    ("categorical", "disarm"): "DisARM is defined for Bernoulli sites (its categorical "
    "extensions are not implemented)",
    ("one_hot_categorical", "disarm"): "DisARM is defined for Bernoulli sites (its categorical "
    "extensions are not implemented)",
    ("categorical", "gumbel_st"): "a Categorical site's value is an index, through which no "
    "straight-through gradient can flow (use OneHotCategorical)",
}


def applicable_estimators(fn) -> tuple[str, ...]:
    """The estimator names that apply to a site with distribution ``fn``."""
    return _APPLICABLE[distribution_family(fn)]


def check_estimator(name: str, site: str, fn, num_particles: int) -> str:
    """``name`` if it applies to site ``site`` (distribution ``fn``) at ``num_particles``.

    Raises
    ------
    ValueError
        For an unknown name, a name that does not apply to the site's distribution, or too few
        particles, naming the site and the estimators that do apply.
    """
    usable = applicable_estimators(fn)
    family = distribution_family(fn)
    what = type(_base_distribution(fn)).__name__
    if name not in ESTIMATORS:
        raise ValueError(
            f"unknown discrete_estimator {name!r} for site '{site}'; the estimators are "
            f"{', '.join(ESTIMATORS)}, and those that apply to its {what} are "
            f"{', '.join(usable)}"
        )
    if name not in usable:
        why = _WHY_NOT.get((family, name), f"{name!r} needs a Bernoulli or Categorical site")
        raise ValueError(
            f"discrete_estimator={name!r} does not apply to site '{site}' ({what}): {why}; "
            f"use one of {', '.join(usable)}"
        )
    need = MIN_EVALUATIONS[name]
    if num_particles < need or (name == "disarm" and num_particles % 2):
        fewer = [n for n in usable if MIN_EVALUATIONS[n] <= num_particles
                 and not (n == "disarm" and num_particles % 2)]
        rule = ("an even num_particles (each antithetic pair is 2 model evaluations)"
                if name == "disarm" else f"num_particles >= {need}")
        raise ValueError(
            f"discrete_estimator={name!r} at site '{site}' needs {rule}, got "
            f"num_particles={num_particles}; raise num_particles, or use one of "
            f"{', '.join(fewer)}"
        )
    return name


__all__ = [
    "BIASED_ESTIMATORS",
    "ESTIMATORS",
    "EVALUATIONS_PER_SAMPLE",
    "MIN_EVALUATIONS",
    "ControlVariate",
    "antithetic_bernoulli",
    "applicable_estimators",
    "check_estimator",
    "conditional_gumbel",
    "conditional_logistic",
    "disarm_logit_gradient",
    "disarm_surrogate",
    "disarm_weight",
    "distribution_family",
    "gumbel_relaxation",
    "leave_one_out_signal",
    "logistic_relaxation",
    "relax_surrogate",
    "score_function_surrogate",
    "straight_through_bernoulli",
    "straight_through_one_hot",
    "variance_objective",
]
