"""A fitted guide as an :class:`arviz.InferenceData`.

* :func:`to_inference_data` -- guide draws (vectorized), the model replayed on them, as
  posterior, posterior_predictive, observed_data, log_likelihood and sample_stats groups.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .._extras import require
from .sampling import SiteArray, callable_name, draw_from_guide

az = require("arviz", "diagnostics")


def _group(arrays: Mapping[str, SiteArray], coords, *, per_draw: bool = True, attrs=None):
    """One ArviZ group from named site arrays (adding a chain dim of size 1 to draws)."""
    data, dims = {}, {}
    for name, array in arrays.items():
        values = array.values.detach().cpu().numpy()
        data[name] = values[None] if per_draw else values
        dims[name] = list(array.dims)
    used = {d for ds in dims.values() for d in ds}
    group_coords = {k: v for k, v in (coords or {}).items() if k in used}
    return az.dict_to_dataset(
        data,
        library=None,
        coords=group_coords,
        dims=dims,
        default_dims=None if per_draw else [],
        index_origin=0,
        attrs=attrs,
    )


def _check_coords(coords, draws) -> None:
    """Every dimension named in ``coords`` must belong to some site."""
    known = {
        d
        for group in (draws.latent, draws.deterministic, draws.predictive)
        for array in group.values()
        for d in array.dims
    }
    unknown = sorted(set(coords or {}) - known - {"chain", "draw"})
    if unknown:
        raise ValueError(
            f"coords name dimension(s) {unknown} that no site has; the dimensions are "
            f"{sorted(known)} (plate names, or <site>_dim_<k>; rename them with dims=)"
        )


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    coords: Mapping[str, Sequence] | None = None,
    dims: Mapping[str, Sequence[str]] | None = None,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> az.InferenceData:
    r"""Draw from a fitted guide and return the draws as an :class:`arviz.InferenceData`.

    All ``num_samples`` draws :math:`Z_s \sim q(Z)` are taken at once under an outer
    ``pyro.plate`` left of the model's plates (as ``pyro.infer.Predictive(parallel=True)``
    does), and the model is replayed on them. The groups are

    ``posterior``
        Every latent site of the model and every ``pyro.deterministic`` site; dims
        ``(chain, draw, ...)`` with one chain and ``num_samples`` draws.
    ``posterior_predictive``
        Each observed site re-sampled from the model given each draw,
        :math:`\tilde x_s \sim p(x \mid Z_s)` (``poutine.uncondition``).
    ``observed_data``
        The observed values.
    ``log_likelihood``
        Pointwise :math:`\log p(x_i \mid Z_s)` per observed site and plate element (what
        :func:`~.psis.psis_from_inference_data` weighs for its leave-one-out k-hats and
        ``elpd_loo``). ``az.loo`` and ``az.waic`` accept the group, but they take the draws
        for posterior draws: on guide draws their k-hats and estimates describe neither q nor
        the posterior, so use ``psis_from_inference_data(idata).khat_loo`` / ``.elpd_loo``
        (weighted for q) instead; see :func:`~.psis.psis_diagnostics`.
    ``sample_stats``
        Per draw: ``log_weight`` :math:`\log w_s = \log p(X, Z_s) - \log q(Z_s)`, ``lp``
        :math:`\log p(X, Z_s)`, ``log_q``, and the Monte Carlo ELBO terms
        ``elbo_log_likelihood`` :math:`\log p(X \mid Z_s)`, ``elbo_log_prior``
        :math:`\log p(Z_s)` and ``elbo_entropy`` :math:`-\log q(Z_s)`, which add up to
        ``log_weight``. Their mean over draws estimates
        :math:`L = \mathbb{E}_q[\log p(X, Z) - \log q(Z)]` (stored with its standard error in
        the group's attrs ``elbo`` and ``elbo_se``).

    :math:`\log q(Z)` sums the log densities of *every* guide sample site, auxiliary ones
    included: an ``AutoContinuous`` guide (``AutoDiagonalNormal``,
    ``AutoMultivariateNormal``, ...) samples an unconstrained latent vector and then a Delta
    site per model latent whose log density is the log-Jacobian term, so the sum is the log
    density of q over the constrained latents.

    Dimension names: a dimension owned by a ``pyro.plate`` is named after it
    (``pyro.plate("data", N)`` gives ``data``); other dimensions are ``<site>_dim_<k>``; batch
    dimensions of size 1 that no plate owns are dropped. ``dims`` overrides a site's names.

    Parameters
    ----------
    model, guide : callable
        The model and the fitted guide (hand-written or an AutoGuide), as passed to SVI.
    *args, **kwargs
        Their inputs (the data).
    num_samples : int
        Number of draws from the guide (>= 1).
    coords : dict of str to sequence, optional
        Coordinate values per dimension, e.g. ``{"data": ids}``.
    dims : dict of str to list of str, optional
        Dimension names (after ``chain`` and ``draw``) overriding the defaults of a site.
    max_plate_nesting : int, optional
        How many plate dims the model uses; guessed from an un-vectorized run when omitted.

    Returns
    -------
    arviz.InferenceData

    Raises
    ------
    ValueError
        ``num_samples`` < 1, subsampled plates, a latent the guide does not sample, ``dims``
        of the wrong length.
    SamplingError
        The guide (or the model replayed on its draws) cannot be run with the given inputs;
        names the guide and the site, and wraps the original exception.

    Notes
    -----
    With a point-mass guide (``AutoDelta``) every draw is the same point; ``az.summary`` then
    reports sd 0, and importance weights are undefined.

    References
    ----------
    Kumar, Carroll, Hartikainen & Martin (2019), "ArviZ a unified library for exploratory
    analysis of Bayesian models in Python", JOSS 4(33), 1143.

    Examples
    --------
    >>> idata = to_inference_data(model, guide, data, num_samples=2000)   # doctest: +SKIP
    >>> az.summary(idata, kind="stats")                                  # doctest: +SKIP
    """
    draws = draw_from_guide(
        model, guide, args, kwargs, num_samples, max_plate_nesting=max_plate_nesting, dims=dims
    )
    _check_coords(coords, draws)
    log_weight = draws.log_weight.double()
    elbo = float(log_weight.mean())
    elbo_se = float(log_weight.std() / num_samples**0.5) if num_samples > 1 else float("nan")
    stats = {
        "log_weight": draws.log_weight,
        "lp": draws.log_joint,
        "log_q": draws.log_q,
        "elbo_log_likelihood": draws.log_joint - draws.log_prior,
        "elbo_log_prior": draws.log_prior,
        "elbo_entropy": -draws.log_q,
    }
    stats = {name: SiteArray(values, ()) for name, values in stats.items()}
    posterior = {**draws.latent, **draws.deterministic}
    groups = {
        "posterior": _group(posterior, coords),
        "sample_stats": _group(stats, coords, attrs={"elbo": elbo, "elbo_se": elbo_se}),
    }
    if draws.observed:
        groups["posterior_predictive"] = _group(draws.predictive, coords)
        groups["log_likelihood"] = _group(draws.log_likelihood, coords)
        groups["observed_data"] = _group(draws.observed, coords, per_draw=False)
    idata = az.InferenceData(**groups)
    idata.attrs.update(
        {
            "inference_library": "pyro",
            "inference_method": "variational",
            "guide": callable_name(guide),
            "model": callable_name(model),
            "num_samples": num_samples,
            "max_plate_nesting": draws.max_plate_nesting,
            "point_mass_guide": int(draws.point_mass_guide),
            "latent_sites": ",".join(draws.latent),
            "deterministic_sites": ",".join(draws.deterministic),
        }
    )
    return idata

