"""JensenELBO: L = E_q[log p(X, Z)] + H[q(Z)], with an analytic or path-derivative entropy."""

from __future__ import annotations

import torch

from .base import SiteTreatmentELBO, check_entropy_estimator
from .engine import Term
from .treatments import (
    analytic_entropy_term,
    depends_on,
    distribution_tensors,
    has_no_parameters,
    is_reparameterized,
    log_prior_term,
    path_entropy_term,
    sampled_entropy_term,
)


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

    Discrete (non-reparameterized) guide sites get the score-function term
    ``log q(z_j) * stop_grad(cost_j)``, with the cost Rao-Blackwellized by plates, as in
    ``Trace_ELBO`` (Ranganath, Gerrish & Blei 2014, arXiv:1401.0118).

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
        self.entropy = check_entropy_estimator(entropy)
        # per site: whether its parameters depend on another reparameterized latent, decided
        # once from the autograd graph (see ``_path_applies``)
        self._path_blocked: dict[str, bool] = {}

    def _latent_terms(self, name: str, model_site: dict, guide_site: dict) -> list[Term]:
        return [log_prior_term(name, model_site), self._entropy_term(name, guide_site)]

    def _auxiliary_terms(self, name: str, guide_site: dict) -> list[Term]:
        return [self._entropy_term(name, guide_site)]

    def _entropy_term(self, name: str, guide_site: dict) -> Term:
        if self.entropy == "analytic":
            term = analytic_entropy_term(name, guide_site)
            if term is not None:
                return term
        elif self.entropy == "path" and self._path_applies(name, guide_site):
            return path_entropy_term(name, guide_site)
        return sampled_entropy_term(name, guide_site)

    def _path_applies(self, name: str, guide_site: dict) -> bool:
        """Reparameterized, with parameters that do not depend on other latent samples."""
        fn = guide_site["fn"]
        if not is_reparameterized(guide_site) or has_no_parameters(fn):
            return False
        blocked = self._path_blocked.get(name)
        if blocked is None:
            if not torch.is_grad_enabled():
                return True  # same value either way; decide when a graph exists
            upstream = guide_site.get("_elbo_ext_upstream_values", ())
            blocked = depends_on(distribution_tensors(fn), upstream)
            self._path_blocked[name] = blocked
        return not blocked

    def _get_trace(self, model, guide, args, kwargs):
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        if self.entropy == "path" and _has_undecided_path_site(guide_trace, self._path_blocked):
            _record_upstream_values(guide_trace)
        return model_trace, guide_trace


def _has_undecided_path_site(guide_trace, decided: dict[str, bool]) -> bool:
    """Whether a site that the path estimator applies to has not had its check yet."""
    return any(
        site["type"] == "sample"
        and name not in decided
        and is_reparameterized(site)
        and not has_no_parameters(site["fn"])
        for name, site in guide_trace.nodes.items()
    )


def _record_upstream_values(guide_trace) -> None:
    """Note on each guide site the reparameterized samples drawn before it."""
    upstream: list[torch.Tensor] = []
    for site in guide_trace.nodes.values():
        if site["type"] != "sample":
            continue
        site["_elbo_ext_upstream_values"] = tuple(upstream)
        if is_reparameterized(site) and torch.is_tensor(site["value"]):
            upstream.append(site["value"])
