"""The base class of every loss here: Pyro's ``ELBO`` interface over the shared engine."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item

from .decomposition import Decomposition
from .engine import BaselineFn, ParticleEstimate, ScoreSite, Term, combine
from .tracing import record_guide_and_model
from .treatments import (
    ENTROPY_ESTIMATORS,
    analytic_entropy_term,
    is_reparameterized,
    observed_term,
    sampled_entropy_term,
    score_site,
)
from .validation import (
    check_guide_sites,
    check_plate_shapes,
    check_positive_int,
    graph_leaves,
    missing_guide_site_error,
    warn_nonfinite,
    warn_nonfinite_gradient,
)


class SiteTreatmentELBO(ELBO):
    """An :class:`~pyro.infer.elbo.ELBO` whose estimate is assembled site by site.

    Subclasses say how a latent site contributes (:meth:`_latent_terms`, and
    :meth:`_unguided_latent_terms` for latents the guide does not sample); this class runs the
    traces, applies the treatments, adds score-function terms for non-reparameterized guide
    sites and exposes the whole ELBO interface: :meth:`loss`, :meth:`differentiable_loss`,
    :meth:`loss_and_grads`, ``__call__`` (an :class:`~pyro.infer.elbo.ELBOModule`) and
    :meth:`decompose`.

    Parameters
    ----------
    num_particles : int
        Number of samples per estimate (>= 1).
    jit : bool
        Compute :meth:`differentiable_loss` (and so :meth:`loss_and_grads`) with one compiled
        graph of the loss and its gradient, parameters as explicit inputs (Inductor;
        see :mod:`pyro_elbo_ext.compiled`).  One graph per (model, guide, argument structure):
        shapes, dtypes and non-tensor arguments are baked in (a new one compiles anew, in a
        bounded cache); Python control flow on tensor values is guarded and retraced when the
        values change.  The compiled loss draws its own random numbers (Inductor's), so it
        agrees with the eager one in distribution, not draw for draw; its gradient is
        first-order only.
    **kwargs
        Forwarded to :class:`pyro.infer.elbo.ELBO` (``max_plate_nesting``,
        ``vectorize_particles``, ``retain_graph``, ``ignore_jit_warnings``, ``jit_options``).
    """

    def __init__(self, num_particles: int = 1, jit: bool = False, **kwargs):
        super().__init__(num_particles=check_positive_int("num_particles", num_particles), **kwargs)
        self.jit = bool(jit)
        self._compiled: dict[tuple[int, int], object] = {}
        self._leaf_cache: dict[tuple[int, int], tuple[int, list[torch.Tensor] | None]] = {}

    # ------------------------------------------------------------------ hooks for subclasses
    def _latent_terms(self, name: str, model_site: dict, guide_site: dict) -> list[Term]:
        """Terms of a latent site that the guide samples (its treatment)."""
        raise NotImplementedError

    def _unguided_latent_terms(
        self, name: str, model_site: dict
    ) -> tuple[list[Term], list[ScoreSite]]:
        """Terms of a model latent that the guide does not sample; an error by default."""
        raise missing_guide_site_error(name, type(self).__name__)

    def _auxiliary_terms(self, name: str, guide_site: dict) -> list[Term]:
        """An auxiliary guide site contributes its entropy, analytic where available."""
        term = analytic_entropy_term(name, guide_site)
        return [term if term is not None else sampled_entropy_term(name, guide_site)]

    def _baseline(self, update_state: bool) -> BaselineFn | None:
        """Variance-reduction hook for score-function terms; none by default."""
        return None

    # ------------------------------------------------------------------ traces
    def _get_trace(self, model, guide, args, kwargs):
        """Run the guide, replay the model against it (sample sites only), validate."""
        model_trace, guide_trace = record_guide_and_model(model, guide, args, kwargs)
        if is_validation_enabled():
            check_guide_sites(model_trace, guide_trace, type(self).__name__)
            check_plate_shapes(model_trace, self.max_plate_nesting)
            check_plate_shapes(guide_trace, self.max_plate_nesting)
        return model_trace, guide_trace

    def _particle(self, model_trace, guide_trace, update_state: bool = True) -> ParticleEstimate:
        """Apply each site's treatment and combine the terms of one particle."""
        terms: list[Term] = []
        score_sites: list[ScoreSite] = []
        guide_nodes = guide_trace.nodes
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if site["is_observed"]:
                terms.append(observed_term(name, site))
                continue
            guide_site = guide_nodes.get(name)
            if guide_site is None or guide_site["type"] != "sample":
                extra_terms, extra_scores = self._unguided_latent_terms(name, site)
                terms.extend(extra_terms)
                score_sites.extend(extra_scores)
                continue
            terms.extend(self._latent_terms(name, site, guide_site))
            if not is_reparameterized(guide_site):
                score_sites.append(score_site(name, guide_site))
        model_nodes = model_trace.nodes
        for name, site in guide_nodes.items():
            if site["type"] == "sample" and name not in model_nodes:
                terms.extend(self._auxiliary_terms(name, site))
                if not is_reparameterized(site):
                    score_sites.append(score_site(name, site))
        return combine(terms, score_sites, self._baseline(update_state))

    def _estimates(
        self, model, guide, args, kwargs, update_state: bool = True
    ) -> Iterator[ParticleEstimate]:
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            yield self._particle(model_trace, guide_trace, update_state)

    def _check_finite(self, estimate: ParticleEstimate, value: float | None = None) -> None:
        """Under validation, warn naming the first non-finite term when L_hat is not finite.

        ``value`` is L_hat as a float where the caller has it already (no second sync).
        """
        if not is_validation_enabled():
            return
        if value is None:
            if torch._C._get_tracing_state():
                return
            value = torch_item(estimate.elbo.detach())
        if not math.isfinite(value):
            warn_nonfinite(estimate.terms, type(self).__name__)

    # ------------------------------------------------------------------ the ELBO interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -L (a float) from ``num_particles`` samples; no gradients."""
        total = 0.0
        with torch.no_grad():
            for est in self._estimates(model, guide, args, kwargs, update_state=False):
                value = torch_item(est.elbo)
                self._check_finite(est, value)
                total += value
        return -total / self.num_particles

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-L as a tensor whose value is the estimate of -L and whose gradient estimates -dL."""
        if self.jit:
            return self._compiled_loss(model, guide)(*args, **kwargs)
        return self._eager_differentiable_loss(model, guide, args, kwargs)

    def _eager_differentiable_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        elbo = surrogate = None
        for est in self._estimates(model, guide, args, kwargs):
            self._check_finite(est)
            value = est.elbo.detach()
            elbo = value if elbo is None else elbo + value
            surrogate = est.surrogate if surrogate is None else surrogate + est.surrogate
        if self.num_particles != 1:
            elbo = elbo / self.num_particles
            surrogate = surrogate / self.num_particles
        # value exactly -L (the bracket is exactly zero), gradient -d(surrogate)
        return (surrogate.detach() - surrogate) - elbo

    def _compiled_loss(self, model, guide):
        """The compiled differentiable loss of this (model, guide) pair (torch.compile)."""
        from ..compiled.jit import compiled_loss_for

        return compiled_loss_for(self, model, guide)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate -L and accumulate the gradient estimate into the parameters' ``.grad``.

        Under validation a non-finite gradient is traced back to the first term (site) whose
        gradient is not finite, with a warning.
        """
        if self.jit:
            loss = self.differentiable_loss(model, guide, *args, **kwargs)
            loss.backward(retain_graph=self.retain_graph)
            value = torch_item(loss)
            if is_validation_enabled() and not math.isfinite(value):
                warnings.warn(
                    f"{type(self).__name__}(jit=True): the estimate of L is not finite; a "
                    "compiled loss cannot say which site made it so: run a step with "
                    "jit=False to have the site named",
                    stacklevel=2,
                )
            return value
        loss = 0.0
        validating = is_validation_enabled()
        for est in self._estimates(model, guide, args, kwargs):
            value = torch_item(est.elbo)
            self._check_finite(est, value)
            loss -= value / self.num_particles
            surrogate_loss = -est.surrogate
            if self.num_particles != 1:
                surrogate_loss = surrogate_loss / self.num_particles
            if surrogate_loss.requires_grad:
                surrogate_loss.backward(retain_graph=self.retain_graph or validating)
                if validating:
                    leaves = self._parameter_leaves(model, guide, surrogate_loss)
                    warn_nonfinite_gradient(est, leaves, type(self).__name__)
        return loss

    def _parameter_leaves(self, model, guide, surrogate: torch.Tensor) -> list[torch.Tensor]:
        """The parameters behind ``surrogate``, found by an autograd walk every 64th call.

        Parameters persist from step to step, so the walk is cached per (model, guide) pair;
        the periodic refresh picks up parameters that a dynamic model creates later.
        """
        key = (id(model), id(guide))
        calls, leaves = self._leaf_cache.get(key, (0, None))
        if leaves is None or calls % 64 == 0:
            leaves = graph_leaves(surrogate)
        self._leaf_cache[key] = (calls + 1, leaves)
        return leaves

    def decompose(self, model, guide, *args, **kwargs) -> Decomposition:
        """The terms of L at the current parameters, averaged over ``num_particles``.

        Returns
        -------
        Decomposition
            L and its terms per site and per kind, with the analytic/Monte Carlo flag of each.
        """
        with torch.no_grad():
            estimates = list(self._estimates(model, guide, args, kwargs, update_state=False))
        for est in estimates:
            self._check_finite(est)
        return Decomposition.from_estimates(
            estimates, self.num_particles, notes=self._decomposition_notes()
        )

    def _decomposition_notes(self) -> tuple[str, ...]:
        """Caveats that ``decompose`` should print (e.g. a KL weight other than 1)."""
        return ()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The estimator's own state (baselines, step counters); empty for a stateless loss.

        Losses with state override this and :meth:`load_state_dict`; the result survives
        ``torch.save`` / ``torch.load`` so a checkpoint can hold it beside the param store.
        """
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a stateless loss accepts only an empty state."""
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state to restore, got keys {sorted(state)}"
            )


def check_entropy_estimator(entropy: str) -> str:
    """The ``entropy=`` option, or a ValueError listing the valid ones."""
    if entropy not in ENTROPY_ESTIMATORS:
        raise ValueError(f"entropy must be one of {ENTROPY_ESTIMATORS}, got {entropy!r}")
    return entropy
