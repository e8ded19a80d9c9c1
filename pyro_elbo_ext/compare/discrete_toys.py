r"""Toy objectives :math:`\mathbb{E}_{q_\alpha(b)}[f(b)]` and draws of the discrete estimators.

The literature's toy problems for gradient estimators of discrete variables, with exact answers
by enumeration (:mod:`.discrete_exact`), and the harness that draws the estimators of
:mod:`pyro_elbo_ext.elbos.discrete_estimators` on them without Pyro:

* :class:`Toy`, :data:`TOYS`, :func:`get_toy` -- the REBAR/RELAX toy
  :math:`f(b) = (b - t)^2`, :math:`b \sim \mathrm{Bernoulli}(\sigma(\alpha))` with
  :math:`t = 0.499` and :math:`t = 0.45` (Tucker et al. 2017, arXiv:1703.07370; Grathwohl et al.
  2018, arXiv:1711.00123), a three-site toy with a different target per site and an interaction,
  and a Categorical toy;
* :func:`estimate` -- one batch of gradient estimates of any estimator at a given number of
  evaluations of :math:`f`, as a differentiable function of a RELAX control variate when asked;
* :func:`gradient_draws` -- ``num_draws`` independent estimates (for means and variances).

Evaluations: ``"reinforce"``, ``"loo"``, ``"relax"`` (neural control variate) and
``"gumbel_st"`` take :math:`K = E` samples; ``"disarm"`` takes :math:`E/2` antithetic pairs;
``"rebar"`` (RELAX with REBAR's control variate :math:`\eta f(\sigma(z/\lambda))`) costs 3
evaluations per sample, so :math:`K = \lfloor E/3 \rfloor`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..elbos.discrete_estimators import (
    ControlVariate,
    antithetic_bernoulli,
    conditional_gumbel,
    conditional_logistic,
    disarm_logit_gradient,
    gumbel_relaxation,
    leave_one_out_signal,
    logistic_relaxation,
    relax_surrogate,
    score_function_surrogate,
    straight_through_bernoulli,
    straight_through_one_hot,
)

#: the estimators :func:`estimate` draws ("rebar" is RELAX with REBAR's control variate)
TOY_ESTIMATORS = ("reinforce", "loo", "disarm", "relax", "rebar", "gumbel_st")


@dataclass(frozen=True)
class Toy:
    r"""A toy objective :math:`\mathbb{E}_{q_\alpha(b)}[f(b)]` to minimize.

    Attributes
    ----------
    name, description : str
    family : {"bernoulli", "categorical"}
    logits : Tensor
        The starting logits: ``(n,)`` Bernoulli, ``(n, K)`` Categorical.
    f : callable
        ``f(b) -> (...)`` on ``(..., n)`` (Bernoulli) or ``(..., n, K)`` one-hot (Categorical)
        inputs; a polynomial, so it is defined on relaxed inputs too.
    """

    name: str
    description: str
    family: str
    logits: torch.Tensor
    f: Callable[[torch.Tensor], torch.Tensor]


def rebar_toy(target: float = 0.499, dtype: torch.dtype = torch.float64) -> Toy:
    r"""The REBAR/RELAX toy: minimize :math:`\mathbb{E}[(b - t)^2]`, :math:`b \sim
    \mathrm{Bernoulli}(\sigma(\alpha))`, starting at :math:`\alpha = 0`.

    The exact gradient is :math:`\sigma(\alpha)(1 - \sigma(\alpha))(1 - 2t)`: tiny next to
    :math:`f \approx 1/4` when :math:`t = 0.499`, which is what makes REINFORCE's signal
    vanish in its noise.
    """
    t = torch.tensor([target], dtype=dtype)

    def f(b):
        return ((b - t) ** 2).sum(-1)

    return Toy(f"rebar_t{target:g}", f"minimize E[(b - {target:g})^2], one Bernoulli",
               "bernoulli", torch.zeros(1, dtype=dtype), f)


def three_site_toy(
    targets: tuple[float, float, float] = (0.499, 0.45, 0.55),
    interaction: float = 0.1,
    dtype: torch.dtype = torch.float64,
) -> Toy:
    r"""Three Bernoulli sites with their own targets and one interaction:
    :math:`f(b) = \sum_i (b_i - t_i)^2 + c\, b_1 b_2`, starting at :math:`\alpha = 0`."""
    t = torch.tensor(targets, dtype=dtype)

    def f(b):
        return ((b - t) ** 2).sum(-1) + interaction * b[..., 0] * b[..., 1]

    return Toy("three_site", f"three Bernoulli sites, targets {targets}, interaction "
               f"{interaction:g} b1 b2", "bernoulli", torch.zeros(3, dtype=dtype), f)


def categorical_toy(dtype: torch.dtype = torch.float64) -> Toy:
    r"""Two Categorical(3) sites: :math:`f(B) = \sum_i w_i^\top B_i + B_1^\top M B_2` on
    one-hot :math:`B_i`, starting at zero logits."""
    w = torch.tensor([[0.30, 0.25, 0.20], [0.10, 0.40, 0.26]], dtype=dtype)
    m = torch.tensor([[0.0, 0.2, -0.1], [0.1, 0.0, 0.3], [-0.2, 0.1, 0.0]], dtype=dtype)

    def f(b):
        linear = (b * w).sum((-1, -2))
        pair = (b[..., 0, :].unsqueeze(-2) @ m @ b[..., 1, :].unsqueeze(-1)).squeeze(-1)
        return linear + pair.squeeze(-1)

    return Toy("categorical", "two Categorical(3) sites, linear terms and an interaction",
               "categorical", torch.zeros(2, 3, dtype=dtype), f)


#: toy name -> factory
TOYS: dict[str, Callable[[], Toy]] = {
    "rebar_t0.499": lambda: rebar_toy(0.499),
    "rebar_t0.45": lambda: rebar_toy(0.45),
    "three_site": three_site_toy,
    "categorical": categorical_toy,
}


def get_toy(name: str) -> Toy:
    """The toy ``name`` (a key of :data:`TOYS`)."""
    try:
        return TOYS[name]()
    except KeyError:
        raise KeyError(f"unknown toy {name!r}; toys: {', '.join(TOYS)}") from None


def samples_per_estimate(estimator: str, evaluations: int) -> int:
    """Independent samples (or DisARM pairs) that ``evaluations`` evaluations of f buy."""
    if estimator not in TOY_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {', '.join(TOY_ESTIMATORS)}")
    per = {"disarm": 2, "rebar": 3}.get(estimator, 1)
    count = evaluations // per
    minimum = 2 if estimator == "loo" else 1
    if count < minimum or evaluations % per:
        raise ValueError(
            f"{estimator!r} cannot use exactly {evaluations} evaluations of f (it costs {per} "
            f"per sample and needs at least {minimum} samples)"
        )
    return count


def _sample(logits, u, family):
    """Discrete samples from uniforms: Bernoulli 0/1 floats, or one-hot via Gumbel-max."""
    if family == "bernoulli":
        return (u < torch.sigmoid(logits.detach())).to(logits.dtype)
    z = gumbel_relaxation(logits.detach(), u)
    return torch.nn.functional.one_hot(z.argmax(-1), z.shape[-1]).to(logits.dtype)


def _log_prob(logits, b, family):
    if family == "bernoulli":
        return -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, b, reduction="none").sum(-1)
    return (b * torch.log_softmax(logits, -1)).sum((-1, -2))


def estimate(
    estimator: str,
    toy: Toy,
    logits: torch.Tensor,
    evaluations: int,
    control: ControlVariate | None = None,
    temperature: float = 0.5,
    create_graph: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One gradient estimate per row of ``logits``.

    Parameters
    ----------
    estimator : str
        One of :data:`TOY_ESTIMATORS`.
    toy : Toy
    logits : Tensor
        ``(N, *toy.logits.shape)``: N independent estimates, each at its own row (a leaf that
        requires grad, or a tensor to make one from).
    evaluations : int
        Evaluations of ``f`` per estimate (see :func:`samples_per_estimate`).
    control : ControlVariate, optional
        RELAX's :math:`c_\\phi` (required for ``"relax"`` and ``"rebar"``).
    temperature : float
        The straight-through relaxation's temperature.
    create_graph : bool
        Keep the estimate differentiable in the control variate's parameters (RELAX's variance
        objective).

    Returns
    -------
    Tensor
        ``(N, *toy.logits.shape)``.
    """
    k = samples_per_estimate(estimator, evaluations)
    if not logits.requires_grad:
        logits = logits.detach().clone().requires_grad_(True)
    family, f = toy.family, toy.f
    shape = logits.shape[1:]
    draw_shape = (logits.shape[0], k) + shape
    expanded = logits.unsqueeze(1).expand(draw_shape)

    def rand(shape=draw_shape):
        return torch.rand(shape, dtype=logits.dtype, generator=generator)

    if estimator == "disarm":
        if family != "bernoulli":
            raise ValueError("DisARM is defined for Bernoulli variables only")
        b, b_tilde = antithetic_bernoulli(expanded, rand())
        grad = disarm_logit_gradient(expanded, f(b), f(b_tilde), b, b_tilde,
                                     event_dim=1, pair_dim=1)
        return grad
    if estimator in ("reinforce", "loo"):
        b = _sample(expanded, rand(), family)
        values = f(b)
        signal = values if estimator == "reinforce" else leave_one_out_signal(values, dim=1)
        surrogate = score_function_surrogate(_log_prob(expanded, b, family), signal).mean(1)
    elif estimator == "gumbel_st":
        if family == "bernoulli":
            b = straight_through_bernoulli(expanded, rand(), temperature)
        else:
            b = straight_through_one_hot(expanded, rand(), temperature)
        surrogate = f(b).mean(1)
    else:  # relax, rebar
        if control is None:
            raise ValueError(f"{estimator!r} needs a control variate")
        if family == "bernoulli":
            z = logistic_relaxation(expanded, rand())
            b = (z.detach() > 0).to(logits.dtype)
            z_tilde = conditional_logistic(expanded, b, rand())
        else:
            z = gumbel_relaxation(expanded, rand())
            index = z.detach().argmax(-1)
            b = torch.nn.functional.one_hot(index, z.shape[-1]).to(logits.dtype)
            z_tilde = conditional_gumbel(expanded, index, rand())
        surrogate = relax_surrogate(_log_prob(expanded, b, family), f(b), z, z_tilde,
                                    control).mean(1)
    (grad,) = torch.autograd.grad(surrogate.sum(), logits, create_graph=create_graph)
    return grad


def gradient_draws(
    estimator: str,
    toy: Toy,
    evaluations: int,
    num_draws: int,
    logits: torch.Tensor | None = None,
    control: ControlVariate | None = None,
    temperature: float = 0.5,
    seed: int = 0,
    batch: int = 20_000,
) -> torch.Tensor:
    """``num_draws`` independent estimates at ``logits`` (default: the toy's start), detached.

    Returns
    -------
    Tensor
        ``(num_draws, *logits.shape)``.
    """
    logits = toy.logits if logits is None else logits
    generator = torch.Generator().manual_seed(seed)
    out = []
    done = 0
    while done < num_draws:
        size = min(batch, num_draws - done)
        rows = logits.detach().expand((size,) + logits.shape)
        out.append(estimate(estimator, toy, rows, evaluations, control, temperature,
                            generator=generator).detach())
        done += size
    return torch.cat(out)


__all__ = [
    "TOYS",
    "TOY_ESTIMATORS",
    "Toy",
    "categorical_toy",
    "estimate",
    "get_toy",
    "gradient_draws",
    "rebar_toy",
    "samples_per_estimate",
    "three_site_toy",
]
