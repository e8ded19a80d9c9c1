r"""Exact references for ``decompose``: a hard-attention model's bound F and evidence by
enumeration.

For a model whose attention sites (latents the guide does not sample) have a finite support,
F = sum_l p(l | I, W) log p(y | l, I, W) is computed by enumerating them
(:class:`~pyro_elbo_ext.elbos.hard_attention.HardAttentionELBO` with ``estimator="enum"``)
and log p(y | I, W) = log sum_l p(l | I, W) p(y | l, I, W) by Pyro's ``TraceEnum_ELBO``; their
gap is KL[p(l | I, W) || p(l | y, I, W)] >= 0 (Ba, Mnih & Kavukcuoglu 2014,
arXiv:1412.7755).

Contents: :func:`enumeration_config`, :class:`AttentionReferences`,
:func:`attention_references`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import pyro.poutine as poutine
import torch
from pyro.infer.traceenum_elbo import TraceEnum_ELBO

from .decomposition import Decomposition, HardAttentionDecomposition
from .sites import is_subsample_site

#: the ``infer`` key where the enumeration keeps the user's own enumeration mark of a site
USER_MARK = "_enumerate_as_marked"


def enumeration_config(guide_names: set[str]) -> Callable[[dict], dict]:
    """``poutine.infer_config`` function: enumerate, in parallel, each latent the guide does
    not sample; refuse a site whose support is not finite, naming it."""

    def config(msg) -> dict:
        if (msg["type"] != "sample" or msg["is_observed"] or msg["name"] in guide_names
                or is_subsample_site(msg)):
            return {}
        fn = msg["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise ValueError(
                f"attention site '{msg['name']}' has a {type(fn).__name__} distribution, "
                "whose support cannot be enumerated; estimator='enum' needs a finite "
                "discrete support (Categorical, Bernoulli, OneHotCategorical, ...). Use "
                "estimator='reinforce' for this site, or sample it in the guide"
            )
        return {"enumerate": "parallel", USER_MARK: msg["infer"].get("enumerate")}

    return config


@dataclass(frozen=True)
class AttentionReferences:
    """F by enumeration, log p(y | I, W) by exact marginalization and their gap (each
    ``None`` where it cannot be computed)."""

    exact_bound: float | None = None
    log_evidence: float | None = None
    gap: float | None = None

    def refine(self, decomposition: Decomposition) -> HardAttentionDecomposition:
        """``decomposition`` with these values."""
        values = {f.name: getattr(decomposition, f.name) for f in fields(Decomposition)}
        values.update(log_evidence=self.log_evidence, gap=self.gap)
        return HardAttentionDecomposition(**values, exact_bound=self.exact_bound)


def attention_references(enumerating_loss, model, guide, args: tuple, kwargs: dict
                         ) -> AttentionReferences:
    """F and log p(y | I, W) of ``model`` by enumeration.

    ``enumerating_loss`` is a ``HardAttentionELBO(estimator="enum")`` for the model.  Every
    value is ``None`` when the attention sites cannot be enumerated (continuous, or more
    configurations than its ``max_enum_size``), or when the guide samples latents (the bound
    then also has a guide gap and is not computed exactly).  Each pass starts from the
    caller's random state (a subsampling plate draws the same minibatch in each).
    """
    with torch.random.fork_rng():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    if any(s["type"] == "sample" for s in guide_trace.nodes.values()):
        return AttentionReferences()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            bound = -enumerating_loss.loss(model, guide, *args, **kwargs)
    except ValueError as error:
        if "estimator='enum'" not in str(error):
            raise
        return AttentionReferences()
    enum_model = poutine.infer_config(model, enumeration_config(set()))
    with torch.no_grad(), torch.random.fork_rng():
        evidence = -TraceEnum_ELBO(max_plate_nesting=enumerating_loss.max_plate_nesting).loss(
            enum_model, guide, *args, **kwargs)
    return AttentionReferences(bound, evidence, evidence - bound)


__all__ = ["USER_MARK", "AttentionReferences", "attention_references", "enumeration_config"]
