r"""A benchmark-only ELBO: the least work any loss that runs model and guide through Pyro does.

:class:`LowerBoundELBO` is *not* a loss for users.  It measures the floor of loss-side work per
SVI step for a loss that, like ours and Pyro's, runs the guide and replays the model against it
through Pyro's effect handlers (:func:`record_guide_and_model`: ``poutine.trace`` and ``replay``),
and then does nothing more than the arithmetic every such estimator needs.  For one particle,
with :math:`s` a site's ``scale`` and :math:`m` its ``mask`` (applied by
:func:`pyro.distributions.util.scale_and_mask`):

.. math::

    L = \sum_{\text{model sites } x \in \text{obs} \cup \text{guide}} s\,m \log p(x)
        - \sum_{\text{guide sites } z} s\,m \log q(z),

    \tilde L = \sum_{x \in \text{obs} \cup \text{guide}} s\,m \log p(x)
        - \sum_{\text{reparameterized guide sites } z} s\,m \log q(z)
        + \sum_{\text{score sites } w} \big(s\,m \log r(w) \cdot \operatorname{stop\_grad}(L)\big),

where the score sites are the guide sites whose distribution has no ``rsample`` (then
:math:`r = q`) and the model's latent sites that the guide does not sample (then :math:`r = p`,
the model's own distribution is the proposal: the hard-attention case where the model draws
the attention location).  A model latent the guide does not sample is its own proposal, so its
``log p - log p = 0`` adds nothing to :math:`L`; only its score term remains (as in
:class:`~pyro_elbo_ext.elbos.hard_attention.HardAttentionELBO`).  A non-reparameterized guide
site enters :math:`L` but not :math:`\tilde L` directly (its pathwise term has mean zero; Pyro's
``score_parts`` drop it too).  With vectorized particles (``vectorize_particles=True``) every
site's term is reduced to the particle dimension, so that each particle's score meets its own
:math:`L` (the independence of the particles, nothing finer: no Rao-Blackwellization by plates
or dependency graph, no baseline, no shape or support checks, no validation warnings).

With ``entropy="sampled"`` (the default) every site's log-density is evaluated, as in
``Trace_ELBO``.  A loss that replaces :math:`-\log q(z)` of a reparameterized guide site by
the closed-form entropy :math:`H[q]` (or :math:`\log p(z) - \log q(z)` by
:math:`-\mathrm{KL}`) has a smaller autograd graph and comes in a few percent below that;
``entropy="analytic"`` is the bound for those losses: :math:`s\,m\,H[q(z)]` in place of
:math:`-s\,m \log q(z)` at every guide site where ``fn.entropy()`` has a closed form (a
non-reparameterized one keeps its score term, whose cost then includes :math:`H`): JensenELBO's
default estimator, draw for draw, where no site has a score term (JensenELBO's score costs hold
only the terms the site's sample reaches, which the bound does not work out).

``loss_and_grads`` backpropagates :math:`-\tilde L / P` (both summed over the ``P`` particles)
once and returns the float :math:`-L / P`.  Value and gradient equal Pyro's ``Trace_ELBO``'s
draw for draw (same seed, same draws) when the guide's sites are reparameterized or global,
and ``HardAttentionELBO(estimator="reinforce")``'s for a single model-drawn attention site
without plates (``tests/test_benchmarks.py``): the bound does the real work of a loss.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import torch_item
from pyro.poutine.util import prune_subsample_sites

from pyro_elbo_ext.elbos.densities import scaled_and_masked
from pyro_elbo_ext.elbos.treatments import analytic_entropy


def record_guide_and_model(model, guide, args, kwargs):
    """Pyro's tracing, as every loss here records it (``poutine.trace`` of the guide, the
    model replayed against it, subsample sites pruned), without any check."""
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs)
    return prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)

__all__ = ["LowerBoundELBO"]


def _log_prob(site: dict) -> torch.Tensor:
    return scaled_and_masked(site, site["fn"].log_prob(site["value"]))


def _entropy(site: dict) -> torch.Tensor | None:
    """The site's closed-form entropy over its batch shape, scaled and masked, or None."""
    entropy = analytic_entropy(site["fn"])  # a masked distribution: zero where masked
    if entropy is None:
        return None
    return scaled_and_masked(site, entropy.expand(site["fn"].batch_shape))


def _per_particle(log_prob: torch.Tensor, nesting: int) -> torch.Tensor:
    """Sum a batch-shaped log-prob to the particle dimension (``dim=-nesting``)."""
    if log_prob.dim() < nesting:  # no particle dimension: the same for every particle
        return log_prob.sum()
    axis = log_prob.dim() - nesting
    out = log_prob.reshape(log_prob.shape[: axis + 1] + (-1,)).sum(-1)
    return out.reshape(-1, out.shape[-1]).sum(0) if axis else out


class LowerBoundELBO(ELBO):
    """The floor of loss-side work of a loss run through Pyro's handlers (benchmarks only).

    See the module docstring for the estimator.  No checks, no validation, no jit.

    Parameters
    ----------
    num_particles : int
        Particles per step.
    vectorize_particles : bool
        Run all particles as one batch under an outermost ``pyro.plate`` (Pyro's
        ``_vectorized_num_particles``) instead of a Python loop.
    max_plate_nesting : int
        As for :class:`pyro.infer.elbo.ELBO` (guessed from one run when not given and the
        particles are vectorized).
    entropy : {"sampled", "analytic"}
        ``-log q(z)`` at every reparameterized guide site, or its closed-form entropy where
        the distribution has one.
    **kwargs
        The other arguments of :class:`pyro.infer.elbo.ELBO` (``retain_graph``, ...).
    """

    def __init__(self, *args, entropy: str = "sampled", **kwargs):
        super().__init__(*args, **kwargs)
        if entropy not in ("sampled", "analytic"):
            raise ValueError(f"entropy must be 'sampled' or 'analytic', got {entropy!r}")
        self.analytic_entropy = entropy == "analytic"

    def _traces(self, model, guide, args, kwargs):
        """``(model_trace, guide_trace, particle_nesting)`` for each (batch of) particle(s)."""
        if self.vectorize_particles:
            if self.max_plate_nesting == float("inf"):
                self._guess_max_plate_nesting(model, guide, args, kwargs)
            model_trace, guide_trace = record_guide_and_model(
                self._vectorized_num_particles(model), self._vectorized_num_particles(guide),
                args, kwargs,
            )
            yield model_trace, guide_trace, (
                int(self.max_plate_nesting) if self.num_particles > 1 else None)
        else:
            for _ in range(self.num_particles):
                model_trace, guide_trace = record_guide_and_model(model, guide, args, kwargs)
                yield model_trace, guide_trace, None

    def _get_trace(self, model, guide, args, kwargs):  # abstract in ELBO; unused here
        return record_guide_and_model(model, guide, args, kwargs)

    def _particle(self, model_trace, guide_trace, nesting: int | None):
        """``(L, surrogate)`` of one (batch of) particle(s), each a scalar tensor."""
        guide_nodes = guide_trace.nodes
        plus: list[torch.Tensor] = []  # in L and in the surrogate
        minus: list[torch.Tensor] = []  # subtracted from both
        minus_value: list[torch.Tensor] = []  # subtracted from L only (detached)
        scored: list[torch.Tensor] = []  # log r of the score sites
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"] or name in guide_nodes:
                plus.append(_log_prob(site))
            elif not site["fn"].has_rsample:
                scored.append(_log_prob(site))
        for site in guide_nodes.values():
            if site["type"] != "sample":
                continue
            entropy = _entropy(site) if self.analytic_entropy else None
            if site["fn"].has_rsample:
                if entropy is not None:
                    plus.append(entropy)
                else:
                    minus.append(_log_prob(site))
                continue
            log_q = _log_prob(site)
            scored.append(log_q)
            if entropy is not None:  # H[q] enters L and its gradient; the score meets L
                plus.append(entropy)
            else:
                minus_value.append(log_q.detach())
        if scored and nesting is not None:
            def reduce(t):
                return _per_particle(t, nesting)
        else:
            def reduce(t):
                return t.sum()
        surrogate = 0.0
        for t in plus:
            surrogate = surrogate + reduce(t)
        for t in minus:
            surrogate = surrogate - reduce(t)
        if not scored:
            return surrogate, surrogate
        elbo = surrogate
        for t in minus_value:
            elbo = elbo - reduce(t)
        weight = elbo.detach() if isinstance(elbo, torch.Tensor) else elbo
        for t in scored:
            surrogate = surrogate + reduce(t) * weight
        return elbo.sum() if isinstance(elbo, torch.Tensor) else elbo, surrogate.sum()

    def _estimate(self, model, guide, args, kwargs):
        elbo, surrogate = 0.0, 0.0
        for model_trace, guide_trace, nesting in self._traces(model, guide, args, kwargs):
            elbo_particle, surrogate_particle = self._particle(model_trace, guide_trace, nesting)
            elbo = elbo + elbo_particle
            surrogate = surrogate + surrogate_particle
        return elbo, surrogate

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The float -L (averaged over particles)."""
        with torch.no_grad():
            elbo, _ = self._estimate(model, guide, args, kwargs)
        return -torch_item(elbo) / self.num_particles

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """A tensor with the value of -L and the gradient of -surrogate (per particle)."""
        elbo, surrogate = self._estimate(model, guide, args, kwargs)
        loss = -torch.as_tensor(elbo).detach() / self.num_particles
        surrogate_loss = -surrogate / self.num_particles
        return loss + (surrogate_loss - surrogate_loss.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Backpropagate -surrogate / P once; return the float -L / P."""
        elbo, surrogate = self._estimate(model, guide, args, kwargs)
        if isinstance(surrogate, torch.Tensor) and surrogate.requires_grad:
            (-surrogate / self.num_particles).backward(retain_graph=self.retain_graph)
        return -torch_item(elbo) / self.num_particles

