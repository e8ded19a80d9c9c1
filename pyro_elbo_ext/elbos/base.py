"""The base class of every loss here: Pyro's ``ELBO`` interface over the shared engine.

:class:`SiteTreatmentELBO` owns the particle loop, trace recording (:mod:`.tracing`), the plan
per trace structure (:mod:`.plan`), applying the treatments, learning-signal updates,
``decompose`` and the compile protocol (:mod:`.protocol`).  A loss implements the public hooks:

- :meth:`SiteTreatmentELBO.treat` (required): how a site contributes to the estimate;
- :attr:`SiteTreatmentELBO.combination`: how the particles' terms become the estimate (the
  mean over particles, :data:`~.combination.MEAN`, unless the loss says otherwise);

and, where it needs them, :meth:`~SiteTreatmentELBO.step_settings` (per-call settings, e.g. a
scheduled weight), :attr:`~SiteTreatmentELBO.learning_signal` (baselines),
:meth:`~SiteTreatmentELBO.model_wrapper` (enumeration) and
:meth:`~SiteTreatmentELBO.exact_references` (exact values for ``decompose``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, NamedTuple

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from pyro.infer.util import is_validation_enabled, torch_item

from .combination import MEAN, Combination, Estimate, ParticleBatch
from .decomposition import Decomposition, term_notes
from .densities import PATHWISE, gradient_kind, score_function
from .discrete_estimators import BIASED_ESTIMATORS, ESTIMATORS
from .discrete_plan import (
    DISCRETE_ESTIMATORS,
    apply_choices,
    check_default,
    check_site_baselines,
    choose_estimators,
)
from .discrete_sampling import DRAW_KEY, DiscreteSampler
from .discrete_terms import disarm_surrogate, loo_surrogate
from .downstream import DOWNSTREAM, downstream_rule
from .engine import ScoreSite, expect_over_enumerated
from .keys import argument_signature, trace_structure_key
from .plan import (
    AUXILIARY,
    LEAF_REFRESH,
    OBSERVED,
    UNGUIDED,
    Plan,
    PlanCache,
    Planning,
    SiteView,
    StepContext,
    Treatment,
    make_plan,
    site_views,
)
from .protocol import jit_backend
from .relax_control import RelaxControls
from .signals import SITE_BASELINES, LearningSignal
from .site_baselines import SiteBaselines, site_baseline_plan
from .state import warn_skipped
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
_NO_SETTINGS: Mapping = MappingProxyType({})
#: the key of the RELAX control variates' state in ``carried_state`` and ``state_dict``
RELAX = "relax"
#: the errors a vectorized particle plate causes in code that does not broadcast (torch's shape
#: errors, Pyro's plate shape mismatches)
_SHAPE_ERRORS = (RuntimeError, IndexError, ValueError)


class Call(NamedTuple):
    """One call of the loss: what it was called with and its settings (passed, not stored).

    ``key`` is ``None`` when an argument cannot be summarized (its plan is then not kept).
    """

    model: Any
    guide: Any
    args: tuple
    kwargs: dict
    settings: Mapping
    training: bool
    key: tuple | None


class SiteTreatmentELBO(ELBO):
    """An :class:`~pyro.infer.elbo.ELBO` whose estimate is assembled site by site.

    Subclasses say how a site contributes (:meth:`treat`) and, if the estimate is not a mean
    over particles, how the particles' terms combine (:attr:`combination`); this class runs the
    traces with Pyro's machinery, plans each trace structure once, applies the treatments,
    adds score-function terms where Pyro's ``score_parts`` has one, and exposes the whole
    ELBO interface: :meth:`loss`, :meth:`differentiable_loss`, :meth:`loss_and_grads`,
    ``__call__`` (an :class:`~pyro.infer.elbo.ELBOModule`) and :meth:`decompose`, and the
    compile protocol (:class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss`).

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

    #: the loss's learning signal (:class:`~.signals.LearningSignal`: baselines,
    #: normalizer, ...), or ``None`` for the plain reward
    learning_signal = None
    #: how the particles' terms become the estimate (the combine hook)
    combination: Combination = MEAN

    def __init__(self, num_particles: int = 1, jit: bool = False,
                 discrete_estimator: str = "reinforce", **kwargs):
        super().__init__(num_particles=check_positive_int("num_particles", num_particles),
                         **kwargs)
        self.jit = bool(jit)
        #: the estimator of every site with a score function that does not choose its own
        #: (``infer={"discrete_estimator": name}``): :mod:`.discrete_estimators`
        self.discrete_estimator = discrete_estimator
        self.discrete_estimator = check_default(discrete_estimator,
                                                *self._discrete_support())
        #: the control variates of the ``"relax"`` sites (state, trained after each step)
        self.relax_controls = RelaxControls()
        #: training steps taken (:meth:`advance_step`: one per ``differentiable_loss`` /
        #: ``loss_and_grads`` call, or per compiled step)
        self.step_count = 0
        self._plans = PlanCache(MAX_CACHED_PLANS)
        #: ``jit=True``'s compiled losses (from the registered jit backend, built on first use)
        self._compiled = None

    # ------------------------------------------------------------------ the public hooks
    def treat(self, site: SiteView, planning: Planning) -> Treatment:
        """How ``site`` contributes to the estimate (asked once per trace structure).

        The defaults, which a loss's override falls back to for the roles it leaves alone:
        an observed site, its log-likelihood; an auxiliary guide site, its entropy (analytic
        where available); a model latent that the guide does not sample, an error naming it
        (only a loss that draws latents from the model accepts one).
        """
        if site.role == OBSERVED:
            return Observed()
        if site.role == AUXILIARY:
            return EntropyTreatment("analytic", gradient_kind(site.guide_site["fn"]))
        if site.role == UNGUIDED:
            raise missing_guide_site_error(site.name, type(self).__name__)
        raise NotImplementedError(f"{type(self).__name__} does not treat {site.role} sites")

    def _discrete_support(self) -> tuple[tuple[str, ...], str, str]:
        """The discrete estimators this loss's estimate admits, its name and why not more
        (all of them by default)."""
        return ESTIMATORS, type(self).__name__, ""

    def step_settings(self, training: bool) -> Mapping:
        """The loss's settings for this call by name (e.g. ``{"kl_weight": w}``, a scheduled
        weight), read by treatments as ``ctx.settings``; none by default."""
        return _NO_SETTINGS

    def model_wrapper(self) -> ModelWrapper | None:
        """A wrapper applied to the model before replay (enumeration); none by default."""
        return None

    def exact_references(self, model, guide, args: tuple, kwargs: dict):
        """Exact values ``decompose`` adds where the loss can compute them (e.g. the bound by
        enumeration): an object whose ``refine(decomposition)`` returns the decomposition with
        them, or ``None`` (the default).  Called before the estimate, from the same random
        state, so that both see the same minibatch."""
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

    # ------------------------------------------------------------------ traces and plans
    def _get_trace(self, model, guide, args, kwargs):
        """One particle's traces (Pyro's hook, called by ``ELBO._get_traces``)."""
        return trace_model_and_guide(model, guide, args, kwargs,
                                     wrap_model=self.model_wrapper())

    def _begin(self, model, guide, args, kwargs, training: bool) -> Call:
        signature = argument_signature(args)
        if kwargs:
            extra = argument_signature(kwargs)
            signature = None if extra is None or signature is None else (signature, extra)
        key = None if signature is None else (model, guide, signature)
        return Call(model, guide, args, kwargs, self.step_settings(training), training, key)

    def _plan_for(self, call: Call, model_trace, guide_trace) -> Plan:
        """The plan of this trace structure; a new structure is validated, then planned.

        Pyro's checks and ours depend only on what the key holds (names, types, shapes,
        plates), so under validation they run once per structure; the value checks (a
        non-finite L or gradient) run at every step.
        """
        key = None if call.key is None else (
            call.key, trace_structure_key(model_trace, guide_trace))
        plan = None if key is None else self._plans.get(key)
        validating = is_validation_enabled()
        if plan is not None and (plan.validated or not validating):
            return plan
        if validating:
            validate_traces(model_trace, guide_trace, self.max_plate_nesting,
                            enumerated=self.model_wrapper() is not None)
        if plan is None:
            planning = Planning(call.model, call.guide, call.args, call.kwargs, model_trace,
                                guide_trace)
            plan = make_plan(site_views(model_trace, guide_trace), self.treat, planning)
            plan = apply_choices(plan, choose_estimators(
                plan, model_trace, guide_trace, self.discrete_estimator, self.num_particles,
                self._particle_dim is not None, *self._discrete_support()))
            check_site_baselines(plan, model_trace, guide_trace)
            self._plan_score_sites(planning, plan)
            if key is not None and not planning.provisional:
                self._plans.put(key, plan)
        plan.validated = validating
        return plan

    def _plan_score_sites(self, planning: Planning, plan: Plan) -> None:
        """Once per plan: the terms each score-function site meets (the data flow,
        :mod:`.downstream`) and Pyro's per-site baselines (:mod:`.site_baselines`), where the
        loss's combination is a sum of terms (:attr:`~.combination.Combination.sums_terms`)."""
        sums_terms = self.combination.sums_terms
        if sums_terms:
            plan.facts[DOWNSTREAM] = downstream_rule(planning, plan, self._as_traced,
                                                     type(self).__name__)
        options = site_baseline_plan(plan, planning.model_trace, planning.guide_trace)
        if not options:
            return
        if not sums_terms:
            warnings.warn(
                f"{type(self).__name__} does not use Pyro's per-site baselines: "
                f"infer['baseline'] of {', '.join(map(repr, options))} is ignored (its own "
                "learning signal centres the score terms)",
                stacklevel=4,
            )
            return
        plan.facts[SITE_BASELINES] = options
        if self.learning_signal is None:
            self.learning_signal = LearningSignal()
            # created inside state_updates_paused (a compiled step's discovery run): paused
            self.learning_signal.paused = self.__dict__.get("_updates_paused", False)
        if self.learning_signal.site_baselines is None:
            self.learning_signal.site_baselines = SiteBaselines()

    def _as_traced(self, fn):
        """``fn`` as the traces were recorded from it: inside the vectorized particle plate
        when particles are vectorized (a replay must see the traces' shapes)."""
        return self._vectorized_num_particles(fn) if self.vectorize_particles else fn

    @property
    def _particle_dim(self) -> int | None:
        """Where vectorized particles are (Pyro's outermost plate), or ``None``."""
        if self.vectorize_particles and self.num_particles > 1:
            return -self.max_plate_nesting
        return None

    # ------------------------------------------------------------------ the engine loop
    def _batches(self, call: Call) -> Iterator[ParticleBatch]:
        """The particles' trace pairs (Pyro's ``_get_traces``), each treated into a batch; an
        error that names the particle plate where vectorizing the particles broke the model
        or guide."""
        if self.max_plate_nesting == float("inf") and self.model_wrapper() is not None:
            # enumeration allocates dimensions left of the plates: it needs their number
            self._guess_max_plate_nesting(call.model, call.guide, call.args, call.kwargs)
        traces = iter(self._get_traces(call.model, call.guide, call.args, call.kwargs))
        # each trace is taken under the DiscreteSampler, entered before Pyro's particle plate
        # (so below it on the stack: it sees every site's distribution broadcast) and left
        # between traces (nothing else meets it)
        sampler = DiscreteSampler(self.discrete_estimator, self.num_particles,
                                  self.vectorize_particles and self.num_particles > 1)
        while True:
            try:
                with sampler:
                    model_trace, guide_trace = next(traces)
            except StopIteration:
                return
            except _SHAPE_ERRORS as error:
                if self._particle_dim is None or type(error) not in _SHAPE_ERRORS:
                    raise
                blamed = self._vectorization_error(call, error, self._particle_dim)
                if blamed is error:
                    raise
                raise blamed from error
            particle_dim = self._particle_dim  # after Pyro's first trace: its nesting guess
            plan = self._plan_for(call, model_trace, guide_trace)
            ctx = StepContext(model_trace, guide_trace, plan, call.settings)
            yield self._batch(ctx, call.training, particle_dim)

    def _vectorization_error(self, call: Call, error: Exception, particle_dim: int):
        """``error`` itself, or, where one particle runs without the particle plate, the
        same error saying that vectorizing the particles broke the model or guide."""
        if not self._runs_unvectorized(call):
            return error
        return type(error)(
            f"{type(self).__name__}: the model or guide fails with its "
            f"{self.num_particles} particles vectorized (vectorize_particles=True: one "
            f"pyro.plate of size {self.num_particles} at dim {particle_dim}, left of the "
            f"model's plates), and runs without: {error}. Code that does not broadcast over "
            "a leading batch dimension (a network applied to sampled weights, e.g. nn.Linear "
            "with a PyroSample weight; a sampled tensor indexed by another sample, e.g. "
            "locs[assignment]) cannot run vectorized: pass vectorize_particles=False "
            "(sequential particles), or make that code broadcast"
        )

    def _runs_unvectorized(self, call: Call) -> bool:
        """Whether one particle of the call runs without the particle plate (asked only when
        the vectorized run failed: its random draws and effects are not kept)."""
        try:
            with torch.random.fork_rng(), torch.no_grad(), poutine.block():
                self._get_trace(call.model, call.guide, call.args, call.kwargs)
        except Exception:  # noqa: BLE001 - any failure: the error is not vectorization's
            return False
        return True

    def _batch(self, ctx: StepContext, training: bool,
               particle_dim: int | None) -> ParticleBatch:
        """Apply each site's treatment to one trace pair."""
        terms = []
        score_sites = []
        model_nodes, guide_nodes = ctx.model_trace.nodes, ctx.guide_trace.nodes
        downstream = ctx.plan.fact(DOWNSTREAM)
        own_baselines = ctx.plan.fact(SITE_BASELINES, _NO_SETTINGS)
        for site in ctx.plan.sites:
            model_site = model_nodes.get(site.name)
            guide_site = guide_nodes.get(site.name)
            terms.extend(site.treatment.terms(ctx, model_site, guide_site))
            if site.gradient != PATHWISE:
                sampled = model_site if site.treatment.sampled_by == "model" else guide_site
                function = score_function(sampled, site.gradient)
                if function is not None:
                    met = None if downstream is None else downstream.sites_met(site.name)
                    marked = (site.treatment.uses_learning_signal
                              or site.name in own_baselines)
                    score_sites.append(ScoreSite(
                        site.name, function, site.frames, marked, downstream_sites=met,
                        gradient_term=self._gradient_term(ctx, site.name, sampled, function,
                                                          training)))
        if ctx.plan.enumerated:
            enumerated = [model_nodes[name] for name in ctx.plan.enumerated]
            exact = not any(s["type"] == "sample" for s in guide_nodes.values())
            terms = expect_over_enumerated(terms, enumerated, self.max_plate_nesting, exact)
        signal = None
        if self.learning_signal is not None and score_sites:
            signal = self.learning_signal.bind(ctx, training, particle_dim)
        size = 1 if particle_dim is None else self.num_particles
        return ParticleBatch(terms, score_sites, signal, ctx, size, particle_dim)

    def _gradient_term(self, ctx: StepContext, name: str, sampled: dict,
                       function: torch.Tensor, training: bool):
        """The site's surrogate as a function of its signal, where its discrete estimator is
        not REINFORCE (:mod:`.discrete_terms`); ``None`` for REINFORCE."""
        estimator = ctx.plan.fact(DISCRETE_ESTIMATORS, {}).get(name)
        if estimator is None:
            return None
        if estimator == "loo":
            dim = self._particle_dim
            return lambda signal: loo_surrogate(function, signal, dim, name)
        draw = sampled["infer"].get(DRAW_KEY)
        if draw is None or draw.estimator != estimator:
            raise ValueError(
                f"discrete_estimator={estimator!r} at site '{name}': the site's value was not "
                "drawn by the estimator (it was given by a condition, a replay or an earlier "
                "trace); the estimator needs its own draw"
            )
        fn, value = sampled["fn"], sampled["value"]
        event_dim = len(fn.event_shape)
        if estimator == "disarm":
            return lambda signal: disarm_surrogate(fn, value, signal, draw, event_dim, name)
        controls = self.relax_controls
        return lambda signal: controls.surrogate(name, fn, value, function, signal, draw,
                                                 event_dim, training)

    def _estimates(self, call: Call) -> Iterator[Estimate]:
        """The estimate, in parts that add up to it: one per batch where the combination
        allows it (each then takes its gradient and signal update in turn), else one."""
        combination = self.combination
        if combination.by_batch:
            estimate, num_particles = combination.estimate, self.num_particles
            for batch in self._batches(call):
                yield estimate((batch,), num_particles)
        else:
            yield combination.estimate(list(self._batches(call)), self.num_particles)

    def _check_finite(self, estimate: Estimate, value: float | None = None) -> None:
        """Under validation, warn naming the first non-finite term when the estimate is not
        finite.  ``value`` is the estimate as a float where the caller has it already."""
        if not is_validation_enabled():
            return
        if value is None:
            if torch._C._get_tracing_state():
                return
            value = torch_item(estimate.value) / estimate.divisor
        if not math.isfinite(value):
            warn_nonfinite(estimate.terms, type(self).__name__, self.combination.quantity)

    def _update_signals(self, estimate: Estimate) -> None:
        """The learning signal's explicit state update, after this part's gradient (and the
        RELAX control variates')."""
        for batch in estimate.batches:
            if batch.signal is not None:
                batch.signal.update()
        if self.relax_controls.pending:
            self.relax_controls.update()

    # ------------------------------------------------------------------ the ELBO interface
    def loss(self, model, guide, *args, **kwargs) -> float:
        """An estimate of -L (a float) from ``num_particles`` samples; no gradients."""
        call = self._begin(model, guide, args, kwargs, training=False)
        total = 0.0
        with torch.no_grad():
            for estimate in self._estimates(call):
                value = torch_item(estimate.value) / estimate.divisor
                self._check_finite(estimate, value)
                total += value
        return -total

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """-L as a tensor whose value is the estimate of -L and whose gradient estimates -dL.

        One training step: a learning signal takes its state update once this particle's
        surrogate is built (its values are detached, so the gradient is unaffected).
        """
        if self.jit:
            self.prepare_step_inputs()
            loss = self._compiled_loss(model, guide, args, kwargs)
        else:
            loss = self.eager_differentiable_loss(model, guide, args, kwargs)
        self.advance_step()
        return loss

    def eager_differentiable_loss(self, model, guide, args: tuple, kwargs: dict
                                  ) -> torch.Tensor:
        """-L_hat with the surrogate's gradient, on the eager path (what ``jit`` compiles).

        A training call (the learning signal updates) that does not advance the step count.
        """
        call = self._begin(model, guide, args, kwargs, training=True)
        value = surrogate = None
        divisor = 1
        for estimate in self._estimates(call):
            self._check_finite(estimate)
            self._update_signals(estimate)
            part = estimate.value.detach()
            value = part if value is None else value + part
            surrogate = (estimate.surrogate if surrogate is None
                         else surrogate + estimate.surrogate)
            divisor = estimate.divisor
        if divisor != 1:
            value, surrogate = value / divisor, surrogate / divisor
        # value exactly -L (the bracket is exactly zero), gradient -d(surrogate)
        return (surrogate.detach() - surrogate) - value

    def _compiled_loss(self, model, guide, args, kwargs) -> torch.Tensor:
        """``jit=True``: -L_hat from the compiled graph of this (model, guide) pair."""
        return self._jit().differentiable_loss(model, guide, args, kwargs)

    def _compiled_loss_and_grads(self, model, guide, args, kwargs) -> float:
        """``jit=True``: -L_hat from the compiled graph, its gradient added into ``.grad``
        directly (what ``differentiable_loss(...).backward()`` does, without autograd)."""
        self.prepare_step_inputs()
        value = self._jit().loss_and_grads(model, guide, args, kwargs)
        self.advance_step()
        return torch_item(value)

    def _jit(self):
        """The loss's compiled losses, from the jit backend the compiled path registered."""
        if self._compiled is None:
            self._compiled = jit_backend()(self)
        return self._compiled

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """Estimate -L and accumulate the gradient estimate into the parameters' ``.grad``.

        Under validation a non-finite gradient is traced back to the first term (site) whose
        gradient is not finite, with a warning.
        """
        if self.jit:
            value = self._compiled_loss_and_grads(model, guide, args, kwargs)
            if is_validation_enabled() and not math.isfinite(value):
                warnings.warn(
                    f"{type(self).__name__}(jit=True): the estimate of "
                    f"{self.combination.quantity} is not finite; a compiled loss cannot say "
                    "which site made it so: run a step with jit=False to have the site named",
                    stacklevel=2,
                )
            return value
        call = self._begin(model, guide, args, kwargs, training=True)
        loss = 0.0
        validating = is_validation_enabled()
        for estimate in self._estimates(call):
            value = torch_item(estimate.value) / estimate.divisor
            if validating:
                self._check_finite(estimate, value)
            loss -= value
            surrogate_loss = -estimate.surrogate
            if estimate.divisor != 1:
                surrogate_loss = surrogate_loss / estimate.divisor
            if surrogate_loss.requires_grad:
                surrogate_loss.backward(retain_graph=self.retain_graph or validating)
                if validating:
                    leaves = self._parameter_leaves(estimate, surrogate_loss)
                    warn_nonfinite_gradient(estimate, leaves, type(self).__name__)
            self._update_signals(estimate)
        self.advance_step()
        return loss

    @staticmethod
    def _parameter_leaves(estimate: Estimate, surrogate: torch.Tensor) -> list[torch.Tensor]:
        """The parameters behind ``surrogate``, found by an autograd walk every
        :data:`~.plan.LEAF_REFRESH` calls of a plan (parameters persist from step to step; the
        refresh picks up those a dynamic model creates later).  Kept on the plan, so bounded
        with the plans and never shared between two (model, guide) pairs."""
        plan = estimate.batches[0].plan
        if plan.parameter_leaves is None or plan.leaf_calls % LEAF_REFRESH == 0:
            plan.parameter_leaves = graph_leaves(surrogate)
        plan.leaf_calls += 1
        return plan.parameter_leaves

    def decompose(self, model, guide, *args, log_evidence: float | None = None,
                  **kwargs) -> Decomposition:
        """The terms of the estimate at the current parameters, averaged over particles.

        ``log_evidence`` (keyword, not passed to model and guide): log p(X) where known, e.g.
        ``problem.log_evidence`` of a conjugate problem; the result's ``gap`` is then
        ``log p(X) - estimate``.

        Returns
        -------
        Decomposition
            The estimate and its terms per site and per kind, with the analytic/Monte Carlo
            flag of each, and notes (weighted terms, bonuses, learning signals that change
            the objective); what else the loss's combination and exact references add.
        """
        with torch.random.fork_rng(), torch.no_grad():  # the same random state as below
            references = self.exact_references(model, guide, args, kwargs)
        call = self._begin(model, guide, args, kwargs, training=False)
        with torch.no_grad():
            batches = list(self._batches(call))
            estimate = self.combination.estimate(batches, self.num_particles)
        self._check_finite(estimate)
        result = self.combination.decomposition(estimate, self.num_particles,
                                                self._notes(batches), log_evidence)
        return result if references is None else references.refine(result)

    def _notes(self, batches: list[ParticleBatch]) -> tuple[str, ...]:
        terms = [term for batch in batches for term in batch.terms]
        auxiliary = frozenset(site.name for batch in batches[:1] for site in batch.plan.sites
                              if site.role == AUXILIARY)
        notes = term_notes(terms, auxiliary)
        if self.learning_signal is not None:
            notes += self.learning_signal.notes()
        chosen = batches[0].plan.fact(DISCRETE_ESTIMATORS, {}) if batches else {}
        biased = sorted(name for name, est in chosen.items() if est in BIASED_ESTIMATORS)
        if biased:
            notes += (f"site(s) {', '.join(repr(n) for n in biased)} use the straight-through "
                      "estimator (discrete_estimator='gumbel_st'): the value is L's, the "
                      "gradient is biased, not that of L",)
        return notes

    # ------------------------------------------------------------------ the compile protocol
    def carried_state(self) -> dict[tuple, torch.Tensor]:
        """The tensors this loss carries from step to step: its learning signal's state.

        Keyed ``(part, site, what, ...)`` (see :class:`~.signals.LearningSignal`); empty for
        a stateless loss.  Every update replaces these tensors rather than writing into them,
        so a compiled step takes them as graph inputs and hands back the new ones
        (:meth:`load_carried_state`).
        """
        signal = self.learning_signal
        state = {} if signal is None else signal.carried_state()
        state.update({(RELAX,) + key: value
                      for key, value in self.relax_controls.slots.items()})
        return state

    def load_carried_state(self, state: dict[tuple, torch.Tensor]) -> None:
        """Replace the carried tensors by ``state`` (what a compiled step returned)."""
        relax = {key[1:]: value for key, value in state.items() if key[0] == RELAX}
        self.relax_controls.slots.update(relax)
        rest = {key: value for key, value in state.items() if key[0] != RELAX}
        if rest:
            self.learning_signal.load_carried_state(rest)

    @contextmanager
    def state_updates_paused(self):
        """Training calls inside read (and create) the carried state but leave it unchanged:
        a compiled step's discovery run, which is not a step."""
        owners = [self.relax_controls]
        if self.learning_signal is not None:
            owners.append(self.learning_signal)
        previous = [owner.paused for owner in owners]
        was_paused = self.__dict__.get("_updates_paused", False)
        self._updates_paused = True  # a signal the plan creates inside starts paused
        for owner in owners:
            owner.paused = True
        try:
            yield
        finally:
            self._updates_paused = was_paused
            for owner, flag in zip(owners, previous):
                owner.paused = flag
            signal = self.learning_signal
            if signal is not None and not any(signal is owner for owner in owners):
                signal.paused = was_paused  # created inside: as before the context

    def report_carried_state(self) -> None:
        """After a compiled step: warn, naming the site, for each state update it skipped."""
        if self.learning_signal is not None:
            self.learning_signal.warn_skipped()
        for site in self.relax_controls.skipped_sites():
            warn_skipped(self.relax_controls.what, site)

    def advance_step(self) -> None:
        """One training step was taken: :attr:`step_count` moves by one."""
        self.step_count += 1

    def compile_refusal(self, model, guide) -> str | None:
        """Why this loss cannot be compiled faithfully (``None``: it can)."""
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """The estimator's own state (its learning signal's, with each part's kind and
        settings, and the RELAX control variates' under ``"relax"``); empty for a loss without
        one.  It survives ``torch.save`` / ``torch.load``, so a checkpoint can hold it beside
        the param store."""
        state = {} if self.learning_signal is None else dict(self.learning_signal.state_dict())
        if self.relax_controls.slots:
            state[RELAX] = self.relax_controls.get_extra_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; a checkpoint of another baseline kind or setting is
        refused naming both values, and a loss without state accepts only an empty one."""
        state = dict(state)
        relax = state.pop(RELAX, None)
        if relax is not None:
            self.relax_controls.set_extra_state(relax)
        if self.learning_signal is None and "site_baselines._extra_state" in state:
            self.learning_signal = LearningSignal()  # Pyro's per-site baselines only
        if self.learning_signal is not None:
            self.learning_signal.load_state_dict(state)
        elif state:
            raise ValueError(
                f"{type(self).__name__} has no state to restore, got keys {sorted(state)}"
            )


__all__ = ["MAX_CACHED_PLANS", "Call", "SiteTreatmentELBO"]
