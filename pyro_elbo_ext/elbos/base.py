"""The base class of every loss here: Pyro's ``ELBO`` interface over the shared engine.

:class:`SiteTreatmentELBO` owns the particle loop, trace recording (:mod:`.tracing`), the plan
per trace structure (:mod:`.plan`), combining (:mod:`.engine`), learning-signal updates and
``decompose``.  A loss implements one hook, :meth:`SiteTreatmentELBO._treat` (how a site
contributes to L), and may give per-call settings (:meth:`SiteTreatmentELBO._step_settings`),
a learning signal (:attr:`SiteTreatmentELBO.learning_signal`) and, for enumeration, a model
wrapper (:meth:`SiteTreatmentELBO._model_wrapper`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item

from .baselines import LearningSignal
from .decomposition import Decomposition
from .densities import PATHWISE, estimator_kind, score_function
from .downstream import downstream_rule
from .engine import ParticleEstimate, ScoreSite, combine, expect_over_enumerated
from .plan import (
    AUXILIARY,
    OBSERVED,
    UNGUIDED,
    Plan,
    PlanCache,
    Planning,
    SiteView,
    StepContext,
    Treatment,
    argument_signature,
    make_plan,
    site_views,
    structure_key,
)
from .site_baselines import site_baseline_plan
from .tracing import ModelWrapper, trace_model_and_guide, validate_traces
from .treatments import EntropyTreatment, Observed
from .validation import (
    check_positive_int,
    graph_leaves,
    missing_guide_site_error,
    warn_nonfinite,
    warn_nonfinite_gradient,
)

#: how many trace structures keep a plan
MAX_CACHED_PLANS = 32


class Call(NamedTuple):
    """One call of the loss: what it was called with and its settings (passed, not stored)."""

    model: Any
    guide: Any
    args: tuple
    kwargs: dict
    settings: Any
    training: bool
    key: tuple


class SiteTreatmentELBO(ELBO):
    """An :class:`~pyro.infer.elbo.ELBO` whose estimate is assembled site by site.

    Subclasses say how a site contributes (:meth:`_treat`); this class runs the traces with
    Pyro's machinery, plans each trace structure once, applies the treatments, adds
    score-function terms where Pyro's ``score_parts`` has one, and exposes the whole ELBO
    interface: :meth:`loss`, :meth:`differentiable_loss`, :meth:`loss_and_grads`, ``__call__``
    (an :class:`~pyro.infer.elbo.ELBOModule`) and :meth:`decompose`.

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
        super().__init__(num_particles=check_positive_int("num_particles", num_particles),
                         **kwargs)
        #: the loss's learning signal: its state (Pyro's per-site baselines of sites with
        #: ``infer={"baseline": ...}``; hard attention's loss-level baselines) and updates
        self.learning_signal = LearningSignal(None, None)
        self.jit = bool(jit)
        #: training calls taken (``differentiable_loss`` / ``loss_and_grads``)
        self.step_count = 0
        self._plans = PlanCache(MAX_CACHED_PLANS)
        self._leaf_cache: dict[tuple[int, int], tuple[int, list[torch.Tensor] | None]] = {}

    # ------------------------------------------------------------------ hooks for subclasses
    def _treat(self, site: SiteView, planning: Planning) -> Treatment:
        """How ``site`` contributes to L (asked once per trace structure).

        The defaults, which a loss's override falls back to for the roles it leaves alone:
        an observed site, its log-likelihood; an auxiliary guide site, its entropy (analytic
        where available); a model latent that the guide does not sample, an error naming it
        (only a loss that draws latents from the model accepts one).
        """
        if site.role == OBSERVED:
            return Observed()
        if site.role == AUXILIARY:
            return EntropyTreatment("analytic", estimator_kind(site.guide_site["fn"]),
                                    log_prior=False)
        if site.role == UNGUIDED:
            raise missing_guide_site_error(site.name, type(self).__name__)
        raise NotImplementedError(f"{type(self).__name__} does not treat {site.role} sites")

    def _step_settings(self, training: bool) -> Any:
        """The loss's settings for this call (e.g. a scheduled weight); none by default."""
        return None

    def step_inputs(self) -> tuple[torch.Tensor, ...]:
        """Tensors the loss reads that change from step to step (a scheduled weight).

        A compiled graph takes them as inputs (the same tensor objects, refreshed in place by
        :meth:`prepare_step_inputs` before every call), so a schedule is never frozen into it.
        None by default.
        """
        return ()

    def prepare_step_inputs(self) -> None:
        """Write this step's values into :meth:`step_inputs` (before a compiled call)."""

    def _model_wrapper(self) -> ModelWrapper | None:
        """A wrapper applied to the model before replay (enumeration); none by default."""
        return None

    def _decomposition_notes(self, settings: Any, plans: list[Plan]) -> tuple[str, ...]:
        """Caveats that ``decompose`` should print (e.g. a KL weight other than 1)."""
        return ()

    # ------------------------------------------------------------------ traces and plans
    def _as_traced(self, fn):
        """``fn`` as the traces were recorded from it: inside the vectorized particle plate
        when particles are vectorized (a replay must see the traces' shapes)."""
        return self._vectorized_num_particles(fn) if self.vectorize_particles else fn

    def _get_trace(self, model, guide, args, kwargs):
        """One particle's traces (Pyro's hook, called by ``ELBO._get_traces``)."""
        return trace_model_and_guide(model, guide, args, kwargs,
                                     wrap_model=self._model_wrapper())

    def _begin(self, model, guide, args, kwargs, training: bool) -> Call:
        key = (model, guide, argument_signature(args),
               argument_signature(kwargs) if kwargs else None)
        return Call(model, guide, args, kwargs, self._step_settings(training), training, key)

    def _plan_for(self, call: Call, model_trace, guide_trace) -> Plan:
        """The plan of this trace structure; a new structure is validated, then planned.

        Pyro's checks and ours depend only on what the key holds (names, types, shapes,
        plates), so under validation they run once per structure; the value checks (a
        non-finite L or gradient) run at every step.
        """
        key = (call.key, structure_key(model_trace, guide_trace))
        plan = self._plans.get(key)
        validating = is_validation_enabled()
        if plan is not None and (plan.validated or not validating):
            return plan
        if validating:
            validate_traces(model_trace, guide_trace, self.max_plate_nesting,
                            enumerated=self._model_wrapper() is not None)
        if plan is None:
            planning = Planning(call.model, call.guide, call.args, call.kwargs, model_trace,
                                guide_trace)
            plan = make_plan(site_views(model_trace, guide_trace), self._treat, planning)
            plan.downstream = downstream_rule(planning, plan, self._as_traced,
                                              type(self).__name__)
            plan.baselines = site_baseline_plan(plan, model_trace, guide_trace)
            if not planning.memo.get("provisional"):
                self._plans.put(key, plan)
        plan.validated = validating
        return plan

    # ------------------------------------------------------------------ the engine loop
    def _estimates(self, call: Call) -> Iterator[ParticleEstimate]:
        if self.max_plate_nesting == float("inf") and self._model_wrapper() is not None:
            # enumeration allocates dimensions left of the plates: it needs their number
            self._guess_max_plate_nesting(call.model, call.guide, call.args, call.kwargs)
        for model_trace, guide_trace in self._get_traces(call.model, call.guide, call.args,
                                                         call.kwargs):
            plan = self._plan_for(call, model_trace, guide_trace)
            ctx = StepContext(model_trace, guide_trace, plan, call.settings)
            yield self._estimate(ctx, call.training)

    def _estimate(self, ctx: StepContext, training: bool) -> ParticleEstimate:
        """Apply each site's treatment and combine the terms of one particle."""
        terms = []
        score_sites = []
        model_nodes, guide_nodes = ctx.model_trace.nodes, ctx.guide_trace.nodes
        downstream, own_baselines = ctx.plan.downstream, ctx.plan.baselines
        loss_signal = self.learning_signal is not None and self.learning_signal.needed
        for site in ctx.plan.sites:
            model_site = model_nodes.get(site.name)
            guide_site = guide_nodes.get(site.name)
            terms.extend(site.treatment.terms(ctx, model_site, guide_site))
            if site.estimator != PATHWISE:
                sampled = model_site if site.treatment.sampled_by == "model" else guide_site
                function = score_function(sampled, site.estimator)
                if function is not None:
                    met = None if downstream is None else downstream.sites_met(site.name)
                    marked = ((site.treatment.learning_signal and loss_signal)
                              or site.name in own_baselines)
                    score_sites.append(ScoreSite(site.name, function, site.frames, marked,
                                                 met))
        if ctx.plan.enumerated:
            enumerated = [model_nodes[name] for name in ctx.plan.enumerated]
            exact = not any(s["type"] == "sample" for s in guide_nodes.values())
            terms = expect_over_enumerated(terms, enumerated, self.max_plate_nesting, exact)
        signal = None
        if self.learning_signal is not None and any(s.learning_signal for s in score_sites):
            signal = self.learning_signal.bind(ctx, training, -self.max_plate_nesting)
        estimate = combine(terms, score_sites, signal, downstream)
        regression = None if signal is None else signal.surrogate_terms()
        if regression is not None:  # per-site baseline networks learn with the model
            estimate.surrogate = estimate.surrogate + regression
        estimate.plan = ctx.plan
        estimate.signal = signal
        return estimate

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

    @staticmethod
    def _update_signal(estimate: ParticleEstimate) -> None:
        """The learning signal's explicit state update, after this particle's gradient."""
        signal = getattr(estimate, "signal", None)
        if signal is not None:
            signal.update()

    # ------------------------------------------------------------------ the ELBO interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -L (a float) from ``num_particles`` samples; no gradients."""
        call = self._begin(model, guide, args, kwargs, training=False)
        total = 0.0
        with torch.no_grad():
            for est in self._estimates(call):
                value = torch_item(est.elbo)
                self._check_finite(est, value)
                total += value
        return -total / self.num_particles

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-L as a tensor whose value is the estimate of -L and whose gradient estimates -dL.

        One training step: a learning signal takes its state update once this particle's
        surrogate is built (its values are detached, so the gradient is unaffected).
        """
        if self.jit:
            self.prepare_step_inputs()
            loss = self._compiled_loss(model, guide)(*args, **kwargs)
        else:
            loss = self._eager_differentiable_loss(model, guide, args, kwargs)
        self.step_count += 1
        return loss

    def _eager_differentiable_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        """-L_hat with the surrogate's gradient, on the eager path (what ``jit`` compiles)."""
        call = self._begin(model, guide, args, kwargs, training=True)
        elbo = surrogate = None
        for est in self._estimates(call):
            self._check_finite(est)
            self._update_signal(est)
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
            value = self._compiled_loss_and_grads(model, guide, args, kwargs)
            if is_validation_enabled() and not math.isfinite(value):
                warnings.warn(
                    f"{type(self).__name__}(jit=True): the estimate of L is not finite; a "
                    "compiled loss cannot say which site made it so: run a step with "
                    "jit=False to have the site named",
                    stacklevel=2,
                )
            return value
        call = self._begin(model, guide, args, kwargs, training=True)
        loss = 0.0
        validating = is_validation_enabled()
        for est in self._estimates(call):
            value = torch_item(est.elbo)
            if validating:
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
            self._update_signal(est)
        self.step_count += 1
        return loss

    def _compiled_loss_and_grads(self, model, guide, args, kwargs) -> float:
        """``jit=True``: -L_hat from the compiled graph, its gradient added into ``.grad``
        directly (what ``differentiable_loss(...).backward()`` does, without autograd)."""
        self.prepare_step_inputs()
        value = self._compiled_loss(model, guide).loss_and_grads(*args, **kwargs)
        self.step_count += 1
        return torch_item(value)

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
        call = self._begin(model, guide, args, kwargs, training=False)
        with torch.no_grad():
            estimates = list(self._estimates(call))
        for est in estimates:
            self._check_finite(est)
        plans = [est.plan for est in estimates]
        return Decomposition.from_estimates(
            estimates, self.num_particles,
            notes=self._decomposition_notes(call.settings, plans),
        )

    # ------------------------------------------------------------------ carried state
    def carried_state(self) -> dict[tuple, torch.Tensor]:
        """The tensors this loss carries from step to step: its learning signal's state.

        Keyed ``(part, site, what, ...)`` (see
        :class:`~pyro_elbo_ext.elbos.baselines.LearningSignal`); empty for a stateless loss.
        Every update replaces these tensors rather than writing into them, so a compiled step
        takes them as graph inputs and hands back the new ones (:meth:`load_carried_state`).
        """
        signal = self.learning_signal
        return {} if signal is None else signal.carried_state()

    def load_carried_state(self, state: dict[tuple, torch.Tensor]) -> None:
        """Replace the carried tensors by ``state`` (what a compiled step returned)."""
        if state:
            self.learning_signal.load_carried_state(state)

    @contextmanager
    def state_updates_paused(self):
        """Training calls inside read (and create) the carried state but leave it unchanged:
        a compiled step's discovery run, which is not a step."""
        signal = self.learning_signal
        if signal is None:
            yield
            return
        previous, signal.paused = signal.paused, True
        try:
            yield
        finally:
            signal.paused = previous

    def report_carried_state(self) -> None:
        """After a compiled step: warn, naming the site, for each state update it skipped."""
        if self.learning_signal is not None:
            self.learning_signal.warn_skipped()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The estimator's own state (baselines, step counters); empty for a stateless loss.

        Losses with state override this and :meth:`load_state_dict`; the result survives
        ``torch.save`` / ``torch.load`` so a checkpoint can hold it beside the param store.
        Pyro's per-site decaying-average baselines, where any has state, are saved under
        ``"site_baselines"`` by every loss.
        """
        return self._with_site_baselines({})

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a stateless loss accepts only an empty state."""
        state = self._restore_site_baselines(state)
        if state:
            raise ValueError(
                f"{type(self).__name__} has no state to restore, got keys {sorted(state)}"
            )

    def _with_site_baselines(self, state: dict) -> dict:
        """``state`` with the per-site baselines' state added (when there is any)."""
        saved = self.learning_signal.sites.checkpoint()
        return {**state, "site_baselines": saved} if saved else state

    def _restore_site_baselines(self, state):
        """Load the per-site baselines' state from ``state``; the rest of ``state``."""
        if isinstance(state, dict) and "site_baselines" in state:
            state = dict(state)
            self.learning_signal.sites.restore(state.pop("site_baselines"))
        return state
