r"""Drawing discrete sites from noise the estimator keeps: the sampler messenger.

Three of the discrete estimators (:mod:`.discrete_estimators`) need to control how a site's
value is drawn, not only how its gradient is formed:

- ``"disarm"``: the two members of an antithetic pair come from one uniform :math:`u` per
  element: :math:`b = 1[u < p]`, :math:`\tilde b = 1[1 - u < p]`.  With ``num_particles = 2m``
  vectorized particles, particle :math:`k < m` takes :math:`u_k` and particle :math:`k + m`
  takes :math:`1 - u_k`; with sequential particles, particle :math:`2i + 1` takes
  :math:`1 - u` of particle :math:`2i`.  Each member alone is an exact draw of the site's
  distribution.
- ``"relax"``: the value is :math:`b = H(z)` with the relaxation :math:`z` drawn from uniforms
  that are kept (logistic noise for Bernoulli, Gumbel noise for Categorical), so that the
  estimator can rebuild :math:`z` as a differentiable function of the logits.
- ``"gumbel_st"``: the value is the straight-through sample ``hard + (soft - stop(soft))``:
  exactly the discrete draw, with the gradient of the relaxed one (biased).

:class:`DiscreteSampler` is a Pyro messenger that does this for every unobserved,
not-enumerated, not-yet-valued sample site whose estimator (``infer={"discrete_estimator":
name}``, else the sampler's default) is one of these three, and records what it drew as a
:class:`DiscreteDraw` in the site's ``infer`` dict (key :data:`DRAW_KEY`), where the loss reads
it back from the trace.  It must sit *below* Pyro's particle plate on the stack (enter it
before the traces are taken), so that each site's distribution is already broadcast over the
particles and the model's plates when it draws.  Any other site is left to Pyro.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.poutine.messenger import Messenger

from .discrete_estimators import (
    _base_distribution,
    check_estimator,
    distribution_family,
    gumbel_relaxation,
    logistic_relaxation,
)

#: the ``infer`` key under which the sampler records a site's :class:`DiscreteDraw`
DRAW_KEY = "_discrete_draw"
#: the ``infer`` key of a site's straight-through temperature (default
#: :data:`DEFAULT_TEMPERATURE`)
TEMPERATURE_KEY = "gumbel_temperature"
DEFAULT_TEMPERATURE = 0.5
#: the estimators whose draws the sampler makes
SAMPLED_ESTIMATORS = frozenset({"disarm", "relax", "gumbel_st"})
#: the name of Pyro's vectorized particle plate (``ELBO._vectorized_num_particles``)
PARTICLE_PLATE = "num_particles_vectorized"


@dataclass
class DiscreteDraw:
    """What the sampler drew at one site, for the loss to rebuild its estimator.

    Attributes
    ----------
    estimator : str
        ``"disarm"``, ``"relax"`` or ``"gumbel_st"``.
    family : str
        ``"bernoulli"``, ``"categorical"`` or ``"one_hot_categorical"``.
    noise : Tensor
        The uniforms the value came from: shaped like the value for Bernoulli, with the
        categories as a last dimension for Categorical.
    logits : Tensor
        The distribution's logits, broadcast to the noise's shape (detached).
    particle_dim : int or None
        The batch dimension of the vectorized particles, counted from the right of the batch
        shape as Pyro's plates count (DisARM: the pair of particle ``k`` is ``k + K/2`` along
        it); ``None`` for sequential particles.
    pair_member : int or None
        Sequential DisARM particles: 0 for the first member of a pair, 1 for the second.
    temperature : float
        The straight-through relaxation's temperature.
    """

    estimator: str
    family: str
    noise: torch.Tensor
    logits: torch.Tensor
    particle_dim: int | None = None
    pair_member: int | None = None
    temperature: float = DEFAULT_TEMPERATURE


def site_estimator(msg: dict, default: str) -> str:
    """The estimator a site asked for (``infer={"discrete_estimator": ...}``) or ``default``."""
    return msg["infer"].get("discrete_estimator", default)


def _full_logits(fn, family: str) -> torch.Tensor:
    """The logits of ``fn``'s base distribution broadcast to one draw of ``fn`` (categories
    last for Categorical)."""
    base = _base_distribution(fn)
    shape = fn.batch_shape + fn.event_shape
    if family == "bernoulli":
        return base.logits.expand(shape)
    if family == "one_hot_categorical":
        return base.logits.expand(shape)
    return base.logits.expand(shape + base.logits.shape[-1:])


class DiscreteSampler(Messenger):
    """Draw the sites that ``"disarm"``, ``"relax"`` or ``"gumbel_st"`` estimate (see the
    module docstring), recording each draw in the site's ``infer`` dict.

    Parameters
    ----------
    default : str
        The loss's ``discrete_estimator`` (sites may override it).
    num_particles : int
        The loss's particle count (checked per site with
        :func:`~.discrete_estimators.check_estimator`).
    vectorized : bool
        Whether the particles are one vectorized batch (pairs along the particle plate) or
        sequential calls (pairs in consecutive calls).
    """

    def __init__(self, default: str, num_particles: int, vectorized: bool):
        super().__init__()
        self.default = default
        self.num_particles = num_particles
        self.vectorized = vectorized
        #: sequential DisARM: the first member's uniforms, by site name, until its partner
        self.pending: dict[str, torch.Tensor] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if (msg["is_observed"] or msg["value"] is not None or msg["done"]
                or msg["infer"].get("enumerate") or msg["infer"].get("_do_not_trace")):
            return
        estimator = site_estimator(msg, self.default)
        if estimator not in SAMPLED_ESTIMATORS:
            return
        fn = msg["fn"]
        family = distribution_family(fn)
        if family == "other" and "discrete_estimator" not in msg["infer"]:
            return  # the loss's default is for discrete sites (a plate's subsample site...)
        check_estimator(estimator, msg["name"], fn, self.num_particles)
        logits = _full_logits(fn, family)
        particle_dim = self._particle_dim(msg)
        # the particle plate's dim counts batch dims; the noise has the event dims (and a
        # Categorical's categories) on its right
        offset = len(fn.event_shape) + (1 if family == "categorical" else 0)
        noise_dim = None if particle_dim is None else particle_dim - offset
        with torch.no_grad():
            noise, member = self._noise(msg["name"], estimator, logits, family, noise_dim)
        temperature = float(msg["infer"].get(TEMPERATURE_KEY, DEFAULT_TEMPERATURE))
        msg["value"] = _value(estimator, family, logits, noise, temperature)
        msg["infer"] = dict(msg["infer"])  # the site's own dict (a user's may be shared)
        msg["infer"][DRAW_KEY] = DiscreteDraw(
            estimator, family, noise, logits.detach(),
            particle_dim if self.vectorized else None, member, temperature)

    def _particle_dim(self, msg: dict) -> int | None:
        for frame in msg["cond_indep_stack"]:
            if frame.name == PARTICLE_PLATE:
                return frame.dim
        return None

    def _noise(self, name, estimator, logits, family, particle_dim):
        shape = logits.shape
        if estimator != "disarm":
            return torch.rand(shape, dtype=logits.dtype, device=logits.device), None
        if self.vectorized and self.num_particles > 1:
            if particle_dim is None:
                raise ValueError(
                    f"DisARM at site '{name}' needs the site inside the particle plate; it was "
                    "drawn outside it"
                )
            half = list(shape)
            half[particle_dim] = shape[particle_dim] // 2
            u = torch.rand(half, dtype=logits.dtype, device=logits.device)
            return torch.cat([u, 1.0 - u], dim=particle_dim), None
        if name in self.pending:
            return 1.0 - self.pending.pop(name), 1
        u = torch.rand(shape, dtype=logits.dtype, device=logits.device)
        self.pending[name] = u
        return u, 0


def _value(estimator, family, logits, noise, temperature):
    """The site's value from its noise (straight-through: differentiable in the logits)."""
    if family == "bernoulli":
        if estimator == "disarm":
            return (noise < torch.sigmoid(logits.detach())).to(logits.dtype)
        z = logistic_relaxation(logits if estimator == "gumbel_st" else logits.detach(), noise)
        hard = (z.detach() > 0).to(logits.dtype)
        if estimator == "gumbel_st":
            soft = torch.sigmoid(z / temperature)
            return hard + (soft - soft.detach())
        return hard
    z = gumbel_relaxation(logits if estimator == "gumbel_st" else logits.detach(), noise)
    index = z.detach().argmax(-1)
    if family == "categorical":
        return index
    hard = torch.nn.functional.one_hot(index, z.shape[-1]).to(logits.dtype)
    if estimator == "gumbel_st":
        soft = torch.softmax(z / temperature, -1)
        return hard + (soft - soft.detach())
    return hard


__all__ = [
    "DEFAULT_TEMPERATURE",
    "DRAW_KEY",
    "PARTICLE_PLATE",
    "SAMPLED_ESTIMATORS",
    "TEMPERATURE_KEY",
    "DiscreteDraw",
    "DiscreteSampler",
    "site_estimator",
]
