"""``TraceGraph_ELBO``'s sample-order rule, as a reference estimator for the benchmarks.

Until Pyro 1.8.2, ``TraceGraph_ELBO`` Rao-Blackwellized a non-reparameterized guide site's
score term by the guide's *sample order*: its cost held every guide site after it in a dense
trace graph (within shared plates) and the model terms of those sites and of their model
children (Pyro's ``_compute_downstream_costs``, still in ``pyro/infer/tracegraph_elbo.py``
but no longer called: since 1.8.2 ``TraceGraph_ELBO`` tracks provenance, as the losses here
do).  :func:`sample_order_loss` calls that function of Pyro's to rebuild the old estimator,
so that the benchmarks can show what a sample-order rule costs where it overstates the data
flow (sites sampled one after another that do not read each other).
"""

from __future__ import annotations

import torch
from pyro.distributions.util import is_identically_zero
from pyro.infer.enum import get_importance_trace
from pyro.infer.tracegraph_elbo import _compute_downstream_costs


def sample_order_loss(model, guide, args: tuple = (), kwargs: dict | None = None,
                      max_plate_nesting: float = float("inf")) -> tuple[torch.Tensor,
                                                                        torch.Tensor]:
    """``(-L_hat, surrogate loss)`` of one particle under the sample-order rule.

    The surrogate is ``sum log p + sum(-entropy_term) + sum_j score_j * sg(cost_j)`` with
    ``cost_j`` from Pyro's ``_compute_downstream_costs`` (no baselines).
    """
    model_trace, guide_trace = get_importance_trace(
        "dense", max_plate_nesting, model, guide, args, kwargs or {})
    score_sites = {name for name, site in guide_trace.nodes.items()
                   if site["type"] == "sample"
                   and not is_identically_zero(site["score_parts"].score_function)}
    costs, _ = _compute_downstream_costs(model_trace, guide_trace, score_sites)
    elbo = surrogate = 0.0
    for site in model_trace.nodes.values():
        if site["type"] == "sample":
            elbo = elbo + site["log_prob_sum"]
            surrogate = surrogate + site["log_prob_sum"]
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample":
            continue
        elbo = elbo - site["log_prob_sum"]
        entropy = site["score_parts"].entropy_term
        if not is_identically_zero(entropy):
            surrogate = surrogate - entropy.sum()
        if name in score_sites:
            surrogate = surrogate + (site["score_parts"].score_function
                                     * costs[name].detach()).sum()
    return -elbo, -surrogate
