"""How the compiled path talks to a loss: the one module that knows what a loss offers.

:class:`~pyro_elbo_ext.CompiledSVI` takes every loss :class:`pyro.infer.SVI` takes.
:func:`adapt` says, once per loss, how its step is computed:

* **a loss of this package** (:class:`~pyro_elbo_ext.SiteTreatmentELBO`,
  :class:`~pyro_elbo_ext.ImportanceWeightedELBO`): its eager differentiable loss is traced;
  ``ImportanceWeightedELBO(estimator="dreg")`` runs eagerly (its gradient hook is not kept by a
  traced graph), and so does a guide with a rejection sampler (Pyro's ``Rejector`` family,
  whose accept loop reads its draws into Python);
* **Pyro's ELBOs whose estimator is one of ours**: the loss of ours that computes the same
  estimator, built with the ELBO's settings (``num_particles``, ``vectorize_particles``,
  ``max_plate_nesting``, ``strict_enumeration_warning``, ``retain_graph``), is traced:

  ======================================================  =========================================
  Pyro's ELBO                                             traced as
  ======================================================  =========================================
  ``Trace_ELBO``, ``JitTrace_ELBO``                       ``JensenELBO(entropy="sampled")``: the
                                                          same L_hat and surrogate, draw for draw
                                                          on a reparameterized guide; a guide
                                                          with a score-function site runs eagerly
                                                          (Trace_ELBO's score terms meet every
                                                          term in their plates, ours only the
                                                          terms downstream of them)
  ``TraceMeanField_ELBO``, ``JitTraceMeanField_ELBO``     ``AnalyticKLELBO()``: the same closed-form
                                                          KL per site, draw for draw where the
                                                          guide is mean-field (elsewhere ours uses
                                                          Monte Carlo for the site and warns); a
                                                          guide with a score-function site runs
                                                          eagerly (Pyro gives it no score term)
  ``TraceGraph_ELBO``, ``JitTraceGraph_ELBO``             ``JensenELBO(entropy="sampled")``: the
                                                          same estimator draw for draw (score
                                                          costs Rao-Blackwellized by dependency,
                                                          Pyro's per-site baselines); a guide
                                                          site that is reparameterized with a
                                                          score-function part (a Rejector) runs
                                                          eagerly (Pyro gives it no score term)
  ``RenyiELBO(alpha=0)``                                  ``ImportanceWeightedELBO(estimator=
                                                          "iwae")``: the same estimator, draw for
                                                          draw; a subsampled (scaled) site or a
                                                          non-reparameterized guide site runs
                                                          eagerly (the two differ there)
  ======================================================  =========================================

* **Pyro's** ``TraceEnum_ELBO`` / ``JitTraceEnum_ELBO``: Pyro's own
  ``TraceEnum_ELBO.differentiable_loss`` (its enumeration and tensor contraction) is traced,
  with the two value reads taken out of the traced path (:mod:`.pyro_losses`); a guide with a
  rejection sampler (Pyro's ``Rejector`` family) runs eagerly;
* **anything else** (``Trace_MMD``, ``ReweightedWakeSleep``, ``TraceTailAdaptive_ELBO``,
  ``RenyiELBO`` with ``alpha != 0``, ``TraceTMC_ELBO``, a user's own subclass of an ELBO): the
  step runs eagerly, exactly as :class:`pyro.infer.SVI` runs it, with one
  :class:`EagerFallbackWarning` naming the loss and the reason.

Every call the compiled path makes on a loss goes through this module too, through
:class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss` only (:func:`is_compilable`,
:func:`eager_loss_fn`, :func:`state_carrier`, :func:`step_inputs`,
:func:`prepare_step_inputs`, :func:`advance_step`, :func:`compile_refusal`): the protocol is
the one surface between them.  A loss without it (one of Pyro's own ELBOs run eagerly) is
driven by its public ``differentiable_loss`` alone: no carried state, no step inputs, no step
counter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro.infer as infer
import pyro.poutine as poutine
import torch

from ..elbos import AnalyticKLELBO, ImportanceWeightedELBO, JensenELBO
from ..elbos.densities import MIXED, PATHWISE, gradient_kind
from ..elbos.protocol import is_compilable as _has_protocol
from ..elbos.sites import is_subsample_site


class EagerFallbackWarning(UserWarning):
    """CompiledSVI runs a loss (or one argument structure) eagerly, as ``pyro.infer.SVI``
    would, because it cannot compile it faithfully; the message says which and why."""


# ============================================================================ the protocol
#: per loss type: whether it implements the protocol (asked once per type: this is on the path
#: of every compiled step)
_COMPILABLE: dict[type, bool] = {}


def is_compilable(loss) -> bool:
    """Whether ``loss`` implements :class:`~pyro_elbo_ext.elbos.protocol.CompilableLoss` (the
    losses of this package, :class:`~.pyro_losses.PyroEnumLoss`; not Pyro's own ELBOs)."""
    kind = type(loss)
    known = _COMPILABLE.get(kind)
    if known is None:
        known = _COMPILABLE[kind] = _has_protocol(loss)
    return known


def eager_loss_fn(loss) -> Callable:
    """``(model, guide, args, kwargs) -> -L_hat`` on the eager path of ``loss`` (what a
    compiled path traces)."""
    if is_compilable(loss):
        return loss.eager_differentiable_loss
    return lambda model, guide, args, kwargs: loss.differentiable_loss(
        model, guide, *args, **kwargs
    )


def state_carrier(loss):
    """``loss`` where it carries state through a compiled step (the protocol), else ``None``."""
    return loss if is_compilable(loss) else None


def step_inputs(loss) -> tuple[torch.Tensor, ...]:
    """The loss's per-step input tensors (``()`` for a loss without the protocol)."""
    return loss.step_inputs() if is_compilable(loss) else ()


def prepare_step_inputs(loss) -> None:
    """Refresh the loss's per-step inputs, where it has any."""
    if is_compilable(loss):
        loss.prepare_step_inputs()


def advance_step(loss) -> None:
    """One training step was taken: the loss's counter moves (a schedule's position)."""
    if is_compilable(loss):
        loss.advance_step()


def compile_refusal(loss, model, guide) -> str | None:
    """Why ``loss`` cannot be compiled faithfully for ``(model, guide)``, or ``None``."""
    return loss.compile_refusal(model, guide) if is_compilable(loss) else None


# ============================================================================ adapting a loss
#: why a check of the traces says a structure runs eagerly: ``(model, guide, args, kwargs)
#: -> reason or None``
StructureCheck = Callable[[Callable, Callable, tuple, dict], "str | None"]


@dataclass
class Adapted:
    """How :class:`~pyro_elbo_ext.CompiledSVI` computes the steps of one loss.

    Attributes
    ----------
    loss : object
        The user's loss: what :class:`pyro.infer.SVI` would run (eager steps, ``evaluate_loss``).
    traced : object or None
        The loss whose eager differentiable loss is traced (the user's, one of ours with the
        same estimator, or :class:`~.pyro_losses.PyroEnumLoss`); ``None``: every step is eager.
    reason : str or None
        Why every step is eager (``traced is None``).
    description : str
        What is traced, for messages (``"Trace_ELBO as JensenELBO(entropy='sampled')"``).
    structure_check : callable or None
        Asked once per argument structure: a reason to run that structure eagerly, or None.
    """

    loss: object
    traced: object | None
    reason: str | None = None
    description: str = ""
    structure_check: StructureCheck | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return type(self.loss).__name__


def _settings(loss) -> dict:
    """The ELBO settings that carry over to the loss of ours that replaces ``loss`` (Pyro's
    ``ELBO`` stores ``max_plate_nesting`` plus one for the particle plate when particles are
    vectorized; the user's value is given on, and ours adds the plate itself)."""
    nesting = loss.max_plate_nesting
    if loss.vectorize_particles and loss.num_particles > 1:
        nesting -= 1
    return {
        "num_particles": loss.num_particles,
        "max_plate_nesting": nesting,
        "vectorize_particles": loss.vectorize_particles,
        "strict_enumeration_warning": loss.strict_enumeration_warning,
        "retain_graph": loss.retain_graph,
    }


def _guide_sites(model, guide, args, kwargs) -> list[dict]:
    """The guide's sample sites of one run (nothing recorded in the param store's order is
    changed: parameters already exist after the discovery run)."""
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    return [site for site in trace.nodes.values()
            if site["type"] == "sample" and not site["is_observed"]
            and not is_subsample_site(site)]


def _score_sites(sites: list[dict]) -> list[str]:
    """Names of the guide sites whose gradient has a score-function part."""
    return [site["name"] for site in sites if gradient_kind(site["fn"]) != PATHWISE]


def _plate_rule_check(model, guide, args, kwargs) -> str | None:
    """``Trace_ELBO`` and ``TraceMeanField_ELBO`` on a guide with a score-function site."""
    names = _score_sites(_guide_sites(model, guide, args, kwargs))
    if names:
        return (f"the guide samples sites with a score-function gradient ({', '.join(names)}), "
                "whose score term meets every term not separated from it by plates here "
                "(TraceMeanField_ELBO: none), while the compiled estimators Rao-Blackwellize it "
                "by the data flow (TraceGraph_ELBO's estimator): the same expectation, not the "
                "same draws; TraceGraph_ELBO or JensenELBO(entropy='sampled') compile it")
    return None


def _rejector_check(why: str) -> StructureCheck:
    """A check that runs a structure eagerly where the guide has a reparameterized site with a
    score-function part (Pyro's ``Rejector`` family), saying ``why``."""
    def check(model, guide, args, kwargs) -> str | None:
        names = [site["name"] for site in _guide_sites(model, guide, args, kwargs)
                 if gradient_kind(site["fn"]) == MIXED]
        if names:
            return (f"the guide samples sites ({', '.join(names)}) that are reparameterized "
                    f"and have a score-function part (Pyro's Rejector family): {why}")
        return None
    return check


#: ``TraceGraph_ELBO`` on a guide with a rejection sampler
_tracegraph_check = _rejector_check(
    "TraceGraph_ELBO gives them no score term and JensenELBO(entropy='sampled') does: not the "
    "same estimator")
#: ``TraceEnum_ELBO`` and this package's losses on a guide with a rejection sampler (a graph
#: would only find out at its first call, its guard on the loop's read failing: a wasted build)
_rejection_check = _rejector_check(
    "their samplers draw until they accept, a number of draws read into Python that a graph "
    "cannot fix")


def _renyi_check(model, guide, args, kwargs) -> str | None:
    sites = _guide_sites(model, guide, args, kwargs)
    names = _score_sites(sites)
    if names:
        return (f"the guide samples non-reparameterized sites ({', '.join(names)}), which "
                "RenyiELBO gives no score-function gradient and ImportanceWeightedELBO gives "
                "VIMCO's: not the same estimator")
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(poutine.replay(model, trace=poutine.trace(guide).get_trace(
            *args, **kwargs))).get_trace(*args, **kwargs)
    scaled = [name for name, site in trace.nodes.items()
              if site["type"] == "sample" and not _unit_scale(site["scale"])]
    if scaled:
        return (f"sites {', '.join(scaled)} are scaled (subsampling): RenyiELBO scales the "
                "log-weights inside its log-mean-exp, ImportanceWeightedELBO outside (its "
                "unbiased form): not the same estimator")
    return None


def _unit_scale(scale) -> bool:
    if isinstance(scale, torch.Tensor):
        return bool((scale == 1).all())
    return scale == 1


def _mapped(loss, ours, description: str, check: StructureCheck | None = None) -> Adapted:
    return Adapted(loss, ours, description=f"{type(loss).__name__} as {description}",
                   structure_check=check)


def adapt(loss) -> Adapted:
    """How CompiledSVI computes the steps of ``loss`` (see the module docstring)."""
    kind = type(loss)
    if is_compilable(loss):
        return Adapted(loss, loss, description=kind.__name__, structure_check=_rejection_check)
    if kind in (infer.Trace_ELBO, infer.JitTrace_ELBO):
        return _mapped(loss, JensenELBO(entropy="sampled", **_settings(loss)),
                       "JensenELBO(entropy='sampled')", _plate_rule_check)
    if kind in (infer.TraceMeanField_ELBO, infer.JitTraceMeanField_ELBO):
        return _mapped(loss, AnalyticKLELBO(**_settings(loss)), "AnalyticKLELBO()",
                       _plate_rule_check)
    if kind in (infer.TraceGraph_ELBO, infer.JitTraceGraph_ELBO):
        return _mapped(loss, JensenELBO(entropy="sampled", **_settings(loss)),
                       "JensenELBO(entropy='sampled')", _tracegraph_check)
    if kind is infer.RenyiELBO:
        if loss.alpha != 0:
            return Adapted(loss, None, reason=(
                f"RenyiELBO(alpha={loss.alpha}) has no counterpart among the compiled "
                "estimators (only alpha=0, the importance-weighted bound, has)"))
        return _mapped(loss, ImportanceWeightedELBO(estimator="iwae", **_settings(loss)),
                       "ImportanceWeightedELBO(estimator='iwae')", _renyi_check)
    if kind in (infer.TraceEnum_ELBO, infer.JitTraceEnum_ELBO):
        from .pyro_losses import PyroEnumLoss

        return Adapted(loss, PyroEnumLoss(loss),
                       description=f"{kind.__name__} (Pyro's enumeration, traced)",
                       structure_check=_rejection_check)
    if isinstance(loss, infer.ELBO) and kind.__module__.startswith("pyro."):
        reason = (f"{kind.__name__} is not among the losses CompiledSVI compiles (Trace_ELBO, "
                  "TraceMeanField_ELBO, TraceGraph_ELBO, RenyiELBO(alpha=0), TraceEnum_ELBO, "
                  "their Jit* forms, and this package's losses)")
    elif isinstance(loss, infer.ELBO):
        reason = (f"{kind.__name__} is a user-defined ELBO: CompiledSVI cannot tell whether "
                  "its computation can be traced faithfully")
    else:
        reason = (f"{kind.__name__} is not a pyro.infer.elbo.ELBO: CompiledSVI traces only "
                  "ELBO losses")
    return Adapted(loss, None, reason=reason)


def warn_eager(name: str, reason: str, what: str = "every step", stacklevel: int = 3) -> None:
    """The one warning CompiledSVI gives when it runs ``name`` eagerly."""
    warnings.warn(
        f"CompiledSVI runs {what} of {name} eagerly, as pyro.infer.SVI would: {reason}",
        EagerFallbackWarning,
        stacklevel=stacklevel + 1,
    )


__all__ = [
    "Adapted",
    "EagerFallbackWarning",
    "adapt",
    "advance_step",
    "compile_refusal",
    "eager_loss_fn",
    "is_compilable",
    "state_carrier",
    "prepare_step_inputs",
    "step_inputs",
    "warn_eager",
]
