"""The guide's ``az.summary`` side by side with a reference posterior (NUTS or closed form).

* :func:`compare_posterior` -- one table of the guide's mean and sd against the reference's;
* :func:`closed_form_reference` -- a conjugate problem's exact posterior mean and sd;
* :data:`COLUMNS` -- the table's columns.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pyro
import torch

from .._extras import require
from ..problems.base import Problem

az = require("arviz", "diagnostics")
pd = require("pandas", "diagnostics", "the posterior tables")

#: columns of the table returned by :func:`compare_posterior`
COLUMNS = (
    "mean", "sd", "mcse_mean", "ref_mean", "ref_sd", "ref_mcse_mean",
    "mean_error", "sd_error", "mean_error_se", "mean_error_z",
)


def _label(name: str, index: tuple[int, ...]) -> str:
    """ArviZ's row label: ``z`` for a scalar, ``z[0, 1]`` for an element."""
    return name if not index else f"{name}[{', '.join(str(i) for i in index)}]"


def _summary(idata: az.InferenceData, var_names) -> pd.DataFrame:
    """Mean, sd and the Monte Carlo SE of the mean of a posterior's draws."""
    # ArviZ logs through its own Logger object (not registered with logging.getLogger)
    logger = getattr(az, "_log", None) or logging.getLogger("arviz")
    level = logger.level
    logger.setLevel(logging.ERROR)  # one chain: ArviZ logs that r_hat needs two (we skip it)
    try:
        mcse = az.summary(idata, var_names=var_names, kind="diagnostics", round_to="none")
        stats = az.summary(idata, var_names=var_names, kind="stats", round_to="none")
    finally:
        logger.setLevel(level)
    return stats[["mean", "sd"]].assign(mcse_mean=mcse["mcse_mean"])


def closed_form_reference(problem: Problem) -> pd.DataFrame:
    """The exact posterior mean and sd of a conjugate problem, one row per latent element.

    The guide of a conjugate :class:`~pyro_elbo_ext.problems.Problem` equals the exact posterior
    at ``problem.posterior_params``; this runs the guide once there and reads each site's
    ``mean`` and ``stddev`` (closed forms of Normal, Beta, Gamma, ...). The param store is
    restored afterwards.

    Returns
    -------
    pandas.DataFrame
        Columns ``mean``, ``sd`` and ``mcse_mean`` (0: exact), indexed like ``az.summary``.

    Raises
    ------
    ValueError
        When the problem has no closed-form posterior.
    """
    if problem.posterior_params is None:
        raise ValueError(f"problem '{problem.name}' has no closed-form posterior")
    store = pyro.get_param_store()
    saved = store.get_state()
    try:
        problem.set_posterior()
        with torch.no_grad():
            trace = pyro.poutine.trace(problem.guide).get_trace(*problem.args, **problem.kwargs)
    finally:
        store.set_state(saved)
    rows = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        mean = site["fn"].mean.detach().cpu().numpy()
        sd = site["fn"].stddev.detach().cpu().numpy()
        for index in np.ndindex(mean.shape):
            rows[_label(name, index)] = (float(mean[index]), float(sd[index]), 0.0)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["mean", "sd", "mcse_mean"])


def compare_posterior(
    idata: az.InferenceData,
    reference: az.InferenceData | pd.DataFrame | Problem,
    var_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    r"""One table of the guide's posterior mean and sd against a reference posterior's.

    For each latent element (rows labelled as in ``az.summary``), the columns are

    * ``mean``, ``sd``, ``mcse_mean``: from the guide's draws (``idata``, e.g. from
      :func:`to_inference_data`);
    * ``ref_mean``, ``ref_sd``, ``ref_mcse_mean``: from the reference;
    * ``mean_error`` = mean - ref_mean, ``sd_error`` = sd - ref_sd;
    * ``mean_error_se`` = :math:`\sqrt{\mathrm{mcse}^2 + \mathrm{mcse}_{ref}^2}`, the Monte Carlo
      standard error of ``mean_error``, and ``mean_error_z`` = mean_error / mean_error_se:
      an error many SEs from 0 is the approximation's bias, not sampling noise.

    The Monte Carlo SEs are ArviZ's (ESS-based) ``mcse_mean``.

    Parameters
    ----------
    idata : arviz.InferenceData
        The guide's draws.
    reference : arviz.InferenceData, pandas.DataFrame or Problem
        A reference posterior: draws (e.g. a Pyro NUTS run through ``az.from_pyro(mcmc)``), a
        table with ``mean`` and ``sd`` columns (and optionally ``mcse_mean``) indexed like
        ``az.summary``, or a conjugate problem (see :func:`closed_form_reference`).
    var_names : list of str, optional
        The variables to compare; default: those in both.

    Returns
    -------
    pandas.DataFrame
        Rows in the order of the guide's summary, only those the reference has.

    Raises
    ------
    ValueError
        When the guide and the reference share no variables or rows, or the reference
        InferenceData has no posterior group.
    """
    if isinstance(reference, Problem):
        reference = closed_form_reference(reference)
    if isinstance(reference, az.InferenceData):
        if "posterior" not in reference.groups():
            raise ValueError(
                "the reference InferenceData has no posterior group (no draws of any latent: "
                "e.g. NUTS on a model whose latents are all discrete sums them out); pass a "
                "reference with posterior draws or a table"
            )
        if var_names is None:
            var_names = [v for v in idata.posterior.data_vars if v in reference.posterior]
            if not var_names:
                raise ValueError(
                    f"the guide's variables {list(idata.posterior.data_vars)} and the "
                    f"reference's {list(reference.posterior.data_vars)} share none; pass "
                    "var_names= or a reference for the same model"
                )
        ref = _summary(reference, var_names)
    else:
        ref = reference.copy()
        if "mcse_mean" not in ref:
            ref["mcse_mean"] = 0.0
    guide = _summary(idata, var_names)
    common = [label for label in guide.index if label in ref.index]
    if not common:
        raise ValueError(
            f"the guide's variables {list(guide.index)} and the reference's {list(ref.index)} "
            "share no rows; pass var_names= or a reference for the same model"
        )
    guide, ref = guide.loc[common], ref.loc[common]
    table = pd.DataFrame(
        {
            "mean": guide["mean"],
            "sd": guide["sd"],
            "mcse_mean": guide["mcse_mean"],
            "ref_mean": ref["mean"],
            "ref_sd": ref["sd"],
            "ref_mcse_mean": ref["mcse_mean"],
        }
    )
    table["mean_error"] = table["mean"] - table["ref_mean"]
    table["sd_error"] = table["sd"] - table["ref_sd"]
    table["mean_error_se"] = np.sqrt(table["mcse_mean"] ** 2 + table["ref_mcse_mean"] ** 2)
    table["mean_error_z"] = table["mean_error"] / table["mean_error_se"]
    return table[list(COLUMNS)]
