"""Recording one particle's (model trace, guide trace) pair with Pyro's own machinery.

:func:`trace_model_and_guide` does what Pyro's ``get_importance_trace`` does, so that every
model and guide Pyro's ELBOs accept is traced the same way: an effect-based guide
(:class:`pyro.poutine.GuideMessenger`, e.g. ``AutoNormalMessenger``) runs once and hands back
both traces; any other guide is traced with ``poutine.trace`` and the model replayed against it
with ``poutine.replay``.  :func:`validate_traces` runs Pyro's checks
(``check_model_guide_match``, ``check_if_enumerated``, ``check_site_shape``) after the checks by
which we are deliberately stricter than Pyro (:mod:`.validation`).  Unlike
``get_importance_trace``, log-densities are computed lazily: a site whose treatment does not
need ``log q`` (an analytic entropy) never evaluates it, and the structural checks run once per
trace structure rather than at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.poutine as poutine
import torch
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_if_enumerated, check_model_guide_match, check_site_shape

from .sites import is_deterministic_site, is_enumerated_site, is_latent_site
from .validation import check_batch_dims, check_guide_sites

#: ``wrap_model(model, guide_trace) -> model``: e.g. enumerate the sites the guide does not sample
ModelWrapper = Callable[[Callable, Trace], Callable]


def trace_model_and_guide(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    wrap_model: ModelWrapper | None = None,
) -> tuple[Trace, Trace]:
    """One particle's traces, recorded as Pyro's ``get_importance_trace`` records them.

    Subsample sites are kept (the plan skips them; :func:`validate_traces` needs them).

    Parameters
    ----------
    model, guide : callable
        The user's model and guide (``guide`` may be a ``GuideMessenger``).
    args, kwargs
        Their arguments.
    wrap_model : callable, optional
        ``wrap_model(model, guide_trace)`` returns the model to replay (e.g. with the sites the
        guide does not sample enumerated); not applicable to a ``GuideMessenger``, whose model
        runs inside the guide.

    Returns
    -------
    (model_trace, guide_trace)
    """
    unwrapped = poutine.unwrap(guide)
    if isinstance(unwrapped, poutine.messenger.Messenger):
        guide(*args, **kwargs)
        return unwrapped.get_traces()
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    if wrap_model is not None:
        model = wrap_model(model, guide_trace)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
        *args, **kwargs
    )
    return model_trace, guide_trace


def validate_traces(model_trace: Trace, guide_trace: Trace, max_plate_nesting: float,
                    enumerated: bool = False) -> None:
    """Pyro's validation of a trace pair, after the checks by which we are stricter.

    Pyro's ``check_model_guide_match``, ``check_if_enumerated``, and ``check_site_shape`` of
    every sample site (with the log-densities Pyro's ``compute_log_prob`` /
    ``compute_score_parts`` memoize on the sites, and its warnings on NaN), then our
    :func:`~.validation.check_batch_dims`.  Everything checked depends only on the trace
    structure (site names, distribution types, shapes, plates), so a loss runs it when it
    plans a new structure (:mod:`.plan`'s key holds all of these).

    Parameters
    ----------
    enumerated : bool
        Sites were enumerated in parallel (their dimensions lie left of the plates).
    """
    check_guide_sites(model_trace, guide_trace)
    check_model_guide_match(_guided_view(model_trace, guide_trace), _sampled_view(guide_trace),
                            max_plate_nesting)
    check_if_enumerated(guide_trace)
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(
        guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_score_parts()
    for trace in (model_trace, guide_trace):
        for site in trace.nodes.values():
            if site["type"] == "sample":
                check_site_shape(site, max_plate_nesting)
    check_batch_dims(guide_trace, max_plate_nesting)
    if not enumerated:  # enumerated sites add dimensions left of the plates
        check_batch_dims(model_trace, max_plate_nesting)


def _sampled_view(guide_trace: Trace) -> Trace:
    """The guide trace without ``pyro.deterministic`` sites, which hold no density: Pyro's
    check would report them as guide sites missing from the model."""
    return _without(guide_trace, [name for name, site in guide_trace.nodes.items()
                                  if site["type"] == "sample" and is_deterministic_site(site)])


def _guided_view(model_trace: Trace, guide_trace: Trace) -> Trace:
    """The model trace without the latents the guide does not sample.

    Pyro's ``check_model_guide_match`` warns about every model latent the guide does not
    sample; a hard-attention site is one by design, and a missing site of any other loss is an
    error of ours that names it, so the check is shown the guided sites only.
    """
    guide_nodes = guide_trace.nodes
    return _without(model_trace, [
        name for name, site in model_trace.nodes.items()
        if is_latent_site(site) and name not in guide_nodes
        and not is_enumerated_site(site)
    ])


def _without(trace: Trace, names: list[str]) -> Trace:
    """``trace`` itself, or a shallow copy without the nodes ``names``."""
    if not names:
        return trace
    view = trace.copy()
    for name in names:
        view.remove_node(name)
    return view


__all__ = ["ModelWrapper", "trace_model_and_guide", "validate_traces"]


def graph_tracing() -> bool:
    """Whether a graph is being traced (``make_fx``, or TorchScript's tracer): Python reads of
    tensor values would then be frozen into the graph."""
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    return get_proxy_mode() is not None or torch._C._get_tracing_state() is not None
