"""The diagnose workflow: fit a problem's guide with one estimator, then check it with ArviZ.

* :func:`diagnose` -- SVI steps with a named estimator, draws from the fitted guide, PSIS k-hat,
  and the guide's posterior against a reference (the closed form, or a NUTS run);
* :func:`nuts_reference` -- Pyro's NUTS on the problem's model, as an InferenceData;
* :class:`Diagnosis` -- the result, with :meth:`Diagnosis.save` (CSV table, NetCDF draws, plot)
  and :meth:`Diagnosis.table_text` (the table, summarized per site when it is long).

This is what ``pyro-elbo-ext diagnose`` runs; the command line only parses and prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro
from pyro.util import get_rng_state, set_rng_state

from .._extras import require
from ..problems import Problem
from .compare_posterior import compare_posterior
from .inference_data import to_inference_data
from .plots import chosen_elements, plot_posterior, site_of
from .psis import PSISResult, psis_from_inference_data

az = require("arviz", "diagnostics")

#: the reference posteriors :func:`diagnose` knows
REFERENCES = ("auto", "nuts", "none")

#: rows of the posterior table shown in full; a longer one is summarized per site
MAX_TABLE_ROWS = 16


@dataclass(frozen=True, eq=False)
class Diagnosis:
    """A fitted guide's diagnostics.

    Attributes
    ----------
    problem : Problem
    estimator : str
        The registry name of the estimator that fitted the guide.
    num_steps : int
    lr : float
        SVI steps and Adam learning rate of the fit.
    idata : arviz.InferenceData
        Draws from the fitted guide (:func:`~.inference_data.to_inference_data`).
    psis : PSISResult
    table : pandas.DataFrame
        :func:`~.compare_posterior.compare_posterior` against the reference, or the guide's
        ``az.summary`` when there is none.
    reference : str or None
        What the table compares with (``"the closed-form posterior"``, ``"NUTS (500 draws)"``),
        or None.
    reference_draws : arviz.InferenceData or None
        The reference's draws (NUTS), drawn on the posterior plot; None for the closed form
        (its mean and sd are drawn) or no reference.
    """

    problem: Problem
    estimator: str
    num_steps: int
    lr: float
    idata: object
    psis: PSISResult
    table: object
    reference: str | None
    reference_draws: object = None

    def table_text(self, max_rows: int = MAX_TABLE_ROWS, full_table: str | Path | None = None,
                   float_format=lambda v: f"{v:.4g}") -> str:
        """:attr:`table` as text: whole when it has at most ``max_rows`` rows; otherwise one
        line per site (its number of elements and the range of each statistic) and the
        ``max_rows`` rows that :func:`~.plots.chosen_elements` picks (every site's worst
        ``|mean_error_z|``, then the worst of all, largest first), with a note naming
        ``full_table``.
        """
        table = self.table
        if len(table) <= max_rows:
            return table.to_string(float_format=float_format)
        sites = table.groupby(table.index.map(site_of), sort=False)
        summary = sites.size().to_frame("elements")
        for column in ("mean", "sd"):
            summary[f"{column} min"] = sites[column].min()
            summary[f"{column} max"] = sites[column].max()
        if "mean_error_z" in table:
            summary["max |mean_error_z|"] = sites["mean_error_z"].agg(lambda z: z.abs().max())
            summary["max |sd_error|"] = sites["sd_error"].agg(lambda e: e.abs().max())
        shown = table.loc[chosen_elements(table, max_rows)]
        if "mean_error_z" in table:
            shown = shown.iloc[np.argsort(-shown["mean_error_z"].abs().to_numpy(),
                                          kind="stable")]
            which = "the rows with the largest |mean_error_z|, every site represented"
        else:
            shown = shown.loc[[label for label in table.index if label in shown.index]]
            which = "the first rows of each site"
        where = f" (all {len(table)}: {full_table})" if full_table is not None else ""
        return "\n".join([
            f"{len(table)} rows over {len(summary)} site(s); per site:",
            summary.rename_axis("site").reset_index().to_string(index=False,
                                                               float_format=float_format),
            "",
            f"{len(shown)} of {len(table)} rows, {which}{where}:",
            shown.to_string(float_format=float_format),
        ])

    def save(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``diagnose_<problem>.csv``, ``.nc`` and (with ``plots``) ``_posterior.png``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"diagnose_{self.problem.name}"
        paths = {"table": out / f"{stem}.csv", "idata": out / f"{stem}.nc"}
        self.table.to_csv(paths["table"])
        self.idata.to_netcdf(str(paths["idata"]))
        if plots:
            paths["posterior_png"] = out / f"{stem}_posterior.png"
            plot_posterior(self).savefig(paths["posterior_png"], dpi=110)
        return paths


def nuts_reference(problem: Problem, num_samples: int = 500, progress: bool = False):
    """``num_samples`` NUTS draws (after as many warm-up steps) of the problem's posterior.

    Raises
    ------
    ValueError
        When NUTS draws no latent: a model whose latents are all discrete (NUTS sums them out).
    """
    kernel = pyro.infer.NUTS(problem.model, max_plate_nesting=problem.max_plate_nesting)
    mcmc = pyro.infer.MCMC(kernel, num_samples=num_samples, warmup_steps=num_samples,
                           disable_progbar=not progress)
    mcmc.run(*problem.args, **problem.kwargs)
    if not mcmc.get_samples():
        raise ValueError(
            f"NUTS drew no latent of problem {problem.name!r}: its latent sites are all "
            "discrete, which NUTS sums out; use reference 'auto' (the exact posterior where the "
            "problem has one) or 'none'"
        )
    return az.from_pyro(mcmc, log_likelihood=False)


def diagnose(
    problem: Problem,
    estimator: str = "jensen_path",
    num_steps: int = 500,
    lr: float = 0.05,
    num_particles: int = 1,
    num_samples: int = 2000,
    reference: str = "auto",
    nuts_samples: int = 500,
    seed: int = 0,
    progress: bool = False,
) -> Diagnosis:
    """Fit the problem's guide with ``estimator`` and diagnose it.

    Runs ``num_steps`` steps of SVI with Adam(``lr``) from the problem's starting parameters
    (seed ``seed``), draws ``num_samples`` times from the fitted guide, runs PSIS (Yao et al.
    2018, arXiv:1802.02538), and compares the guide's posterior with ``reference``: ``"auto"``
    (the closed-form posterior where the problem has one, else none), ``"nuts"`` (a NUTS run
    of ``nuts_samples`` draws) or ``"none"``.  The fitted parameters stay in Pyro's param store.

    Raises
    ------
    ValueError
        An unknown ``reference``, or NUTS on a model with only discrete latents.
    ~pyro_elbo_ext.compare.IncompatibleEstimatorError
        When the estimator does not apply to the problem.
    """
    from ..compare import get_estimator

    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    loss, model, guide = get_estimator(estimator).build(problem, num_particles)
    rng = get_rng_state()
    try:
        pyro.set_rng_seed(seed)
        problem.set_params()
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": lr}), loss=loss)
        for _ in range(num_steps):
            svi.step(*problem.args, **problem.kwargs)
        idata = to_inference_data(problem.model, problem.guide, *problem.args,
                                  num_samples=num_samples, **problem.kwargs)
        psis = psis_from_inference_data(idata)
        source = reference_idata = reference_draws = None
        if reference == "nuts":
            reference_idata = reference_draws = nuts_reference(problem, nuts_samples, progress)
            source = f"NUTS ({nuts_samples} draws)"
        elif reference == "auto" and problem.posterior_params is not None:
            reference_idata, source = problem, "the closed-form posterior"
    finally:
        set_rng_state(rng)
    if reference_idata is None:
        table = az.summary(idata, kind="stats")
    else:
        table = compare_posterior(idata, reference_idata)
    return Diagnosis(problem, estimator, num_steps, lr, idata, psis, table, source,
                     reference_draws)


__all__ = ["MAX_TABLE_ROWS", "REFERENCES", "Diagnosis", "diagnose", "nuts_reference"]
