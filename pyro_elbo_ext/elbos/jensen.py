"""JensenELBO: L = E_q[log p(X, Z)] + H[q(Z)], with an analytic or path-derivative entropy."""

from __future__ import annotations

import torch

from .base import SiteTreatmentELBO
from .densities import gradient_kind
from .graphs import depends_on, distribution_tensors, is_delta
from .plan import AUXILIARY, GUIDED, Planning, SiteView, Treatment
from .treatments import ENTROPY_ESTIMATORS, EntropyTreatment, JensenTreatment
from .validation import check_choice


class JensenELBO(SiteTreatmentELBO):
    r"""The evidence lower bound in its Jensen form.

    .. math::

        \log p(X) \ge L = \mathbb{E}_{q(Z)}[\log p(X, Z)] + H[q(Z)]

    (Jensen's inequality on the concave log).  Each latent site z_i contributes
    ``log p(z_i | parents)`` at the guide's sample plus an estimate of the conditional entropy
    ``H[q(z_i | guide parents)]``; by the chain rule of entropy these add up to H[q(Z)].

    The entropy estimator is chosen by ``entropy``:

    ``"analytic"`` (default)
        ``fn.entropy()`` with the plate scale and mask applied, where the distribution has a
        closed form; otherwise ``-log q(z_i)``.  Unbiased for L and dL.
    ``"sampled"``
        ``-log q(z_i)`` everywhere: the estimator of Pyro's ``Trace_ELBO``.
    ``"path"``
        The path-derivative, "sticking the landing" estimator (Roeder, Wu & Duvenaud 2017,
        arXiv:1703.09194): ``-log q(z_i)`` with q's parameters detached, so the gradient flows
        only through the reparameterized sample.  Unbiased for dL, and its gradient is zero
        for every draw when q equals the posterior.  It applies to reparameterized sites whose
        distribution parameters do not depend on other reparameterized latents of the guide;
        for the others (detected once per site from the autograd graph) it falls back to
        ``"sampled"``, which keeps the estimator unbiased; non-reparameterized sites keep
        their score-function term.

    Each guide site's gradient parts come from Pyro's ``score_parts`` protocol, as in
    ``Trace_ELBO``: a site whose distribution has a score function (a discrete site; Pyro's
    ``Rejector`` family, which is reparameterized *and* has one) gets the term
    ``score_function(z_j) * stop_grad(reward_j)``, with the reward holding only the terms of
    L that the real data flow says may depend on :math:`z_j` (:mod:`.downstream`: provenance
    tracking, as ``TraceGraph_ELBO``'s; Ranganath, Gerrish & Blei 2014, arXiv:1401.0118;
    Naesseth et al. 2017, arXiv:1610.05683, for rejection samplers).  A closed-form entropy
    of such a site meets its own score as ``-log q(z_j)``, so that ``JensenELBO`` with any
    ``entropy`` gives ``TraceGraph_ELBO``'s score terms on mean-field guides; Pyro's per-site
    baselines (``infer={"baseline": {...}}``) apply (:mod:`.site_baselines`).  The plan
    (each site's estimator, the terms each score meets) is made once per trace structure.

    Parameters
    ----------
    num_particles : int
        Samples per estimate.
    entropy : {"analytic", "sampled", "path"}
        The entropy estimator.
    **kwargs
        Forwarded to :class:`pyro.infer.elbo.ELBO` (``vectorize_particles``,
        ``max_plate_nesting``, ``retain_graph``, ...).

    Examples
    --------
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.01}),
    ...                      loss=JensenELBO(entropy="path"))          # doctest: +SKIP
    """

    def __init__(self, num_particles: int = 1, entropy: str = "analytic", **kwargs):
        super().__init__(num_particles=num_particles, **kwargs)
        self.entropy = check_choice("entropy", entropy, ENTROPY_ESTIMATORS)

    def treat(self, site: SiteView, planning: Planning) -> Treatment:
        if site.role not in (GUIDED, AUXILIARY):
            return super().treat(site, planning)
        treatment = JensenTreatment if site.role == GUIDED else EntropyTreatment
        return treatment(self._estimator(site.guide_site, planning),
                         gradient_kind(site.guide_site["fn"]))

    def _estimator(self, guide_site: dict, planning: Planning) -> str:
        """``"path"`` falls back to ``"sampled"`` where it does not apply (see the class)."""
        if self.entropy != "path":
            return self.entropy
        return "path" if path_applies(guide_site, planning) else "sampled"


def path_applies(guide_site: dict, planning: Planning) -> bool:
    """Reparameterized, not a Delta, and with parameters computed from no other
    reparameterized latent of the guide (an autograd walk, once per structure).

    Without a gradient graph (a plan made under ``torch.no_grad``) the question cannot be
    answered; both estimators have the same value, so the path form is used and the plan is
    marked provisional (not cached).
    """
    fn = guide_site["fn"]
    if not getattr(fn, "has_rsample", False) or is_delta(fn):
        return False
    if not torch.is_grad_enabled():
        planning.provisional = True
        return True
    upstream = []
    for site in planning.guide_trace.nodes.values():
        if site is guide_site:
            break
        if (site["type"] == "sample" and getattr(site["fn"], "has_rsample", False)
                and torch.is_tensor(site["value"])):
            upstream.append(site["value"])
    return not depends_on(distribution_tensors(fn), upstream)
