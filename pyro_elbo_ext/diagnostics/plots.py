"""The guide's posterior drawn against a reference, a few readable panels however many latents.

* :func:`chosen_elements` -- which latent elements to show: every site represented, the worst
  agreement with the reference first;
* :func:`plot_posterior` -- one panel per chosen element: the guide's draws, and the reference
  (NUTS draws, or the closed-form mean and sd);
* :data:`MAX_PANELS`.

Built without ``pyplot`` (no global figure state); save with ``fig.savefig(path)``.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .._extras import require

Figure = require("matplotlib.figure", "diagnostics", "the posterior plots").Figure

#: panels in one figure: a model with 200 latent elements gets 8 legible ones, not 200 tiny ones
MAX_PANELS = 8


def site_of(label: str) -> str:
    """The site of an ``az.summary`` row label: ``z`` for ``z[3, 1]``."""
    return label.split("[", 1)[0]


def chosen_elements(table, max_panels: int = MAX_PANELS) -> list[str]:
    """Up to ``max_panels`` row labels of ``table`` (an ``az.summary``-like table).

    All rows, in table order, when there are at most ``max_panels``.  Otherwise every site
    gets one row first; where the table has ``mean_error_z`` that is the site's worst
    (largest ``|mean_error_z|``: the guide's worst disagreement with the reference) and the
    remaining places go to the worst rows of any site; without it the sites take turns in
    table order.
    """
    if len(table) <= max_panels:
        return list(table.index)
    order: dict[str, list[str]] = {}
    if "mean_error_z" in table:
        score = table["mean_error_z"].abs().fillna(np.inf)
        worst = sorted(table.index, key=lambda label: -score[label])
        for label in worst:
            order.setdefault(site_of(label), []).append(label)
        first = [labels[0] for labels in order.values()][:max_panels]
        rest = [label for label in worst if label not in first]
        return first + rest[:max_panels - len(first)]
    for label in table.index:
        order.setdefault(site_of(label), []).append(label)
    chosen: list[str] = []
    depth = 0
    while len(chosen) < max_panels:
        for labels in order.values():
            if depth < len(labels) and len(chosen) < max_panels:
                chosen.append(labels[depth])
        depth += 1
    return chosen


def _draws(idata, label: str) -> np.ndarray | None:
    """All draws of element ``label`` (``z[3, 1]``) of an InferenceData's posterior."""
    site = site_of(label)
    if idata is None or site not in idata.posterior:
        return None
    values = np.asarray(idata.posterior[site].values)
    values = values.reshape(-1, *values.shape[2:])
    index = tuple(int(i) for i in re.findall(r"-?\d+", label[len(site):]))
    if len(index) != values.ndim - 1:  # labelled coordinates: not an element this can find
        return None
    return values[(slice(None), *index)]


def _bins(values: np.ndarray) -> int:
    """sqrt(n) histogram bins, between 10 and 40."""
    return int(np.clip(np.sqrt(values.size), 10, 40))


def plot_posterior(diagnosis, max_panels: int = MAX_PANELS) -> Figure:
    """The guide's marginal posterior for the elements :func:`chosen_elements` picks, each
    against the reference: a histogram of the NUTS draws, or the closed-form mean (line) and
    mean ± sd (band).  The title says how many of how many elements are shown and why."""
    table = diagnosis.table
    labels = chosen_elements(table, max_panels)
    ncols = min(4, len(labels)) or 1
    nrows = max(1, math.ceil(len(labels) / ncols))
    fig = Figure(figsize=(max(7.5, 3.2 * ncols), 2.6 * nrows + 0.9), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    reference = diagnosis.reference
    for ax, label in zip(axes, labels):
        guide = _draws(diagnosis.idata, label)
        if guide is not None:
            ax.hist(guide, bins=_bins(guide), density=True, histtype="stepfilled", alpha=0.45,
                    color="tab:blue", label="guide")
        drawn = _draws(diagnosis.reference_draws, label)
        if drawn is not None:
            ax.hist(drawn, bins=_bins(drawn), density=True, histtype="step", lw=1.5,
                    color="black", label=reference)
        if "ref_mean" in table:
            mean, sd = table.loc[label, "ref_mean"], table.loc[label, "ref_sd"]
            ax.axvline(mean, color="black", ls="--", lw=1.2,
                       label=None if drawn is not None else f"{reference}: mean")
            if drawn is None:
                ax.axvspan(mean - sd, mean + sd, color="black", alpha=0.12,
                           label=f"{reference}: mean ± sd")
            z = round(float(table.loc[label, "mean_error_z"]), 1) + 0.0  # no "-0.0"
            ax.set_title(f"{label}   mean_error_z = {z:.1f}", fontsize=9)
        else:
            ax.set_title(label, fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=8)
    for ax in axes[len(labels):]:
        ax.set_axis_off()
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize="small")
    total, sites = len(table), len({site_of(label) for label in table.index})
    which = ("each site's worst |mean_error_z| first" if "mean_error_z" in table
             else "the first elements of each site")
    shown = (f"all {total} element(s)" if len(labels) == total
             else f"{len(labels)} of {total} elements ({sites} site(s); {which})")
    draws = diagnosis.idata.posterior.sizes["draw"]
    fig.suptitle(f"{diagnosis.problem.name}: the guide's posterior after {diagnosis.num_steps} "
                 f"{diagnosis.estimator} steps ({draws} draws); {shown}", fontsize=10)
    return fig


__all__ = ["MAX_PANELS", "chosen_elements", "plot_posterior", "site_of"]
