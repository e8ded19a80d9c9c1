"""Which latent sites a site's distribution is computed from, by provenance tracking.

The model (or guide) is replayed once against a guide trace with latent samples wrapped in
:class:`pyro.ops.provenance.ProvenanceTensor` s, so every tensor computed from a sample carries
its site's name (Wingate et al. 2011, "Nonstandard interpretations of probabilistic programs").

Contents: :func:`model_parents` (each model latent's parents), :func:`auxiliary_children`
(the guide sites each auxiliary site feeds), :func:`preceding_latents` (the conservative
fallback: every earlier latent), and the whole-trace facts built on them:
:func:`late_parents` (the latents whose model parents the guide samples later) and
:func:`auxiliary_feeds` (which latents each auxiliary guide site feeds).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import pyro
import pyro.poutine as poutine
import torch
from pyro.ops.provenance import ProvenanceTensor, detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger

from .graphs import distribution_tensors
from .sites import is_latent_site, is_subsample_site


class _TagLatentSamples(Messenger):
    """Makes every latent sample a ProvenanceTensor tagged with its own site name."""

    def _pyro_post_sample(self, msg):
        if msg["is_observed"] or is_subsample_site(msg):
            return
        msg["value"] = ProvenanceTensor(detach_provenance(msg["value"]), frozenset({msg["name"]}))


class _TagNamedSamples(Messenger):
    """Makes the samples of the named sites ProvenanceTensors tagged with their own names."""

    def __init__(self, names: frozenset[str]):
        super().__init__()
        self.names = names

    def _pyro_post_sample(self, msg):
        if msg["name"] in self.names:
            msg["value"] = ProvenanceTensor(
                detach_provenance(msg["value"]), frozenset({msg["name"]})
            )


def auxiliary_children(
    guide, guide_trace, auxiliary: Iterable[str], args, kwargs
) -> dict[str, frozenset[str]]:
    """For each auxiliary guide site, the other guide sample sites computed from its sample.

    An AutoGuide (``AutoNormal``, ``AutoDiagonalNormal``, ``AutoMultivariateNormal``, ...)
    samples auxiliary latents (``infer={"is_auxiliary": True}``) and gives each model latent a
    ``Delta`` site whose value is a transform of them; this finds which.  The guide is replayed
    once against ``guide_trace`` with the auxiliary samples tracked by provenance (as in
    :func:`model_parents`: no gradients, validation off, random state restored), and a site
    depends on an auxiliary sample when its distribution's tensors (a Delta's value and
    log-density) or its log-density carry that sample's name.
    """
    auxiliary = frozenset(auxiliary)
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        with _TagNamedSamples(auxiliary):
            trace = poutine.trace(poutine.replay(guide, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    children: dict[str, set[str]] = {name: set() for name in auxiliary}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in auxiliary or is_subsample_site(site):
            continue
        provenance = frozenset()
        for tensor in distribution_tensors(site["fn"]):
            provenance |= get_provenance(tensor)
        try:
            value = detach_provenance(site["value"])
            provenance |= get_provenance(site["fn"].log_prob(value))
        except Exception:  # noqa: BLE001 - the tensors above are then all we know
            pass
        for aux in provenance & auxiliary:
            children[aux].add(name)
    return {name: frozenset(sites) for name, sites in children.items()}


def model_parents(model, guide_trace, args, kwargs) -> dict[str, frozenset[str]]:
    """For each model latent, the latent sites its distribution's parameters are computed from.

    The model is replayed once against ``guide_trace`` with each latent sample wrapped in a
    :class:`pyro.ops.provenance.ProvenanceTensor` (provenance tracking: Wingate et al. 2011,
    "Nonstandard interpretations of probabilistic programs"), so that every tensor computed
    from a sample carries that sample's name.  Runs without gradients, with validation off and
    with the random state restored afterwards (it consumes no randomness of the caller).

    Dependencies through Python control flow or ``.item()`` are not seen.
    """
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        with _TagLatentSamples():
            trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
    parents: dict[str, frozenset[str]] = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or is_subsample_site(site):
            continue
        provenance = frozenset()
        for tensor in distribution_tensors(site["fn"]):
            provenance |= get_provenance(tensor)
        try:  # parameters a distribution computes lazily show up in its log-density
            value = detach_provenance(site["value"])
            provenance |= get_provenance(site["fn"].log_prob(value))
        except Exception:  # noqa: BLE001 - the tensors above are then all we know
            pass
        parents[name] = provenance - {name}
    return parents


def preceding_latents(model_trace) -> dict[str, frozenset[str]]:
    """The conservative parent sets: every latent that precedes a site in the model."""
    seen: list[str] = []
    out: dict[str, frozenset[str]] = {}
    for name, site in model_trace.nodes.items():
        if is_latent_site(site):
            out[name] = frozenset(seen)
            seen.append(name)
    return out


def late_parents(model, model_trace, guide_trace, args, kwargs,
                 who: str) -> dict[str, tuple[str, ...]]:
    """The latents whose model distribution depends on a latent the guide samples later.

    ``{site: (late parents...)}`` from :func:`model_parents` (``model`` as the traces were
    recorded from it); where the provenance replay fails, every latent that precedes a site
    in the model is taken as its parent (conservative), with a warning naming ``who``.
    """
    try:
        parents = model_parents(model, guide_trace, args, kwargs)
    except Exception as error:  # noqa: BLE001 - any failure: the conservative rule
        parents = preceding_latents(model_trace)
        warnings.warn(
            f"{who}: could not trace the model's dependencies ({type(error).__name__}: "
            f"{error}); treating every latent that precedes a site in the model as its parent",
            stacklevel=4,
        )
    order = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"]
    position = {name: i for i, name in enumerate(order)}
    late: dict[str, tuple[str, ...]] = {}
    for name, site in model_trace.nodes.items():
        if not is_latent_site(site) or name not in position:
            continue
        found = tuple(sorted(p for p in parents.get(name, ())
                             if position.get(p, -1) > position[name]))
        if found:
            late[name] = found
    return late


def auxiliary_feeds(guide: Callable, model_trace, guide_trace, args, kwargs,
                    who: str) -> dict[str, frozenset[str]]:
    """For each auxiliary guide site (a guide sample site the model does not have), the
    model latents it feeds (:func:`auxiliary_children`, ``guide`` as the traces were recorded
    from it); where the replay fails, every latent, with a warning naming ``who``."""
    auxiliary = [name for name, site in guide_trace.nodes.items()
                 if site["type"] == "sample" and name not in model_trace.nodes]
    latents = frozenset(name for name, site in model_trace.nodes.items()
                        if is_latent_site(site) and name in guide_trace.nodes)
    try:
        children = auxiliary_children(guide, guide_trace, auxiliary, args, kwargs)
    except Exception as error:  # noqa: BLE001 - conservative: it may feed every latent
        children = {name: latents for name in auxiliary}
        warnings.warn(
            f"{who}: could not trace which sites the guide's auxiliary sites feed "
            f"({type(error).__name__}: {error}); assuming each feeds every latent",
            stacklevel=4,
        )
    return {name: children.get(name, frozenset()) & latents for name in auxiliary}


__all__ = ["auxiliary_children", "auxiliary_feeds", "late_parents", "model_parents",
           "preceding_latents"]
