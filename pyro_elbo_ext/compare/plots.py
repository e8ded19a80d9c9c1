"""Figures of a comparison: gradient variance / SNR, learning curves, the bound vs log p(X).

* :func:`plot_gradient_variance` -- variance, SNR and efficiency per estimator and point;
* :func:`plot_bound` -- each estimator's mean L against the exact L and log p(X);
* :func:`plot_learning_curves` -- L against SVI step and wall time.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no global
figure state, no GUI backend needed); save it with ``fig.savefig(path)``.
"""

from __future__ import annotations

import numpy as np

from .._extras import require

pd = require("pandas", "compare", "the comparison's plots")
Figure = require("matplotlib.figure", "compare", "the comparison's plots").Figure
_ticker = require("matplotlib.ticker", "compare", "the comparison's plots")

_FAMILY_COLORS = {"ours": "tab:blue", "pyro": "tab:gray"}

#: below this fraction of the largest variance at a point, a variance is drawn as "~0"
NEAR_ZERO = 1e-12

#: at most this many major ticks on a log axis (more overlap on a narrow panel)
MAX_LOG_TICKS = 5


#: a panel whose values span less than this ratio gets a linear axis (a log axis would show
#: one labelled decade or none)
LOG_SPAN = 30.0


def _value_axis(ax, values: np.ndarray) -> None:
    """The x axis of a bar panel: log with at most :data:`MAX_LOG_TICKS` labelled decades
    when the positive ``values`` span :data:`LOG_SPAN` or more, else linear with 4 ticks."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size and positive.max() / positive.min() >= LOG_SPAN:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(_ticker.LogLocator(base=10, numticks=MAX_LOG_TICKS))
        ax.xaxis.set_minor_locator(_ticker.NullLocator())
    else:
        ax.xaxis.set_major_locator(_ticker.MaxNLocator(nbins=4))


def _near_zero_and_floor(var: np.ndarray) -> tuple[np.ndarray, float]:
    """Which variances are at rounding level (<= NEAR_ZERO x the largest), and the value such
    bars are drawn at (a hundredth of the smallest other variance)."""
    largest = var.max(initial=0.0)
    near_zero = var <= NEAR_ZERO * largest
    others = var[~near_zero]
    floor = others.min() / 100 if others.size else 1e-12
    return near_zero, floor


def plot_gradient_variance(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Total gradient variance (log scale, ±2 SE), median SNR and efficiency per estimator,
    one row of panels per parameter point (``summary["at"]``).

    A variance at rounding level (at most :data:`NEAR_ZERO` times the largest at its point)
    is drawn as a short bar labelled "~0", and its efficiency as a bar labelled "~inf", so that
    the other bars stay readable; the numbers are in the summary.

    Parameters
    ----------
    summary : DataFrame
        :meth:`Comparison.summary` (columns ``at``, ``estimator``, ``family``,
        ``grad_var_total``, ``grad_var_total_se``, ``snr_median``, ``efficiency``).
    title : str, optional
        The figure's title (default: the problem, R and the reference).
    """
    points = list(dict.fromkeys(summary["at"])) if len(summary) else ["init"]
    per_point = max((int((summary["at"] == at).sum()) for at in points), default=1)
    fig = Figure(figsize=(13, len(points) * (0.32 * per_point + 1.4) + 0.6),
                 layout="constrained")
    grid = np.atleast_2d(fig.subplots(len(points), 3, squeeze=False))
    for row, at in zip(grid, points):
        _variance_row(row, summary[summary["at"] == at], at, several=len(points) > 1)
    fig.suptitle(title or _title(summary, "gradient noise per estimator "
                                 "(lower variance, higher SNR and efficiency are better)"))
    return fig


def _variance_row(axes, rows: pd.DataFrame, at: str, several: bool) -> None:
    y = np.arange(len(rows))
    colors = [_FAMILY_COLORS.get(f, "tab:orange") for f in rows["family"]]
    var = rows["grad_var_total"].to_numpy(float)
    se = rows["grad_var_total_se"].to_numpy(float)
    near_zero, floor = _near_zero_and_floor(var)
    shown = np.where(near_zero, floor, var)
    lower = np.where(near_zero, 0.0, np.minimum(2 * se, shown - floor / 10))
    upper = np.where(near_zero, 0.0, 2 * se)
    axes[0].barh(y, shown, xerr=[np.maximum(lower, 0), upper], color=colors)
    _value_axis(axes[0], shown)
    axes[0].set_xlabel("total gradient variance (±2 SE)")
    snr = rows["snr_median"].to_numpy(float)
    finite_snr = snr[np.isfinite(snr)]
    snr_cap = finite_snr.max() * 1.2 if finite_snr.size else 1.0
    axes[1].barh(y, np.where(np.isfinite(snr), snr, snr_cap), color=colors)
    for i in np.flatnonzero(np.isinf(snr)):
        axes[1].annotate("inf", (snr_cap, i), xytext=(-18, -3), textcoords="offset points",
                         color="white")
    axes[1].set_xlabel("median SNR  |mean| / sd")
    axes[1].xaxis.set_major_locator(_ticker.MaxNLocator(nbins=4))
    eff = rows["efficiency"].to_numpy(float)
    finite = eff[np.isfinite(eff) & (eff > 0) & ~near_zero]
    cap = finite.max() * 100 if finite.size else 1.0
    eff_shown = np.where(near_zero | ~np.isfinite(eff), cap, eff)
    axes[2].barh(y, eff_shown, color=colors)
    _value_axis(axes[2], eff_shown)
    axes[2].set_xlabel("efficiency  1 / (variance x seconds)")
    for i in np.flatnonzero(near_zero):
        axes[0].annotate("~0", (shown[i], i), xytext=(3, -3), textcoords="offset points")
        axes[2].annotate("~inf", (cap, i), xytext=(-22, -3), textcoords="offset points",
                         color="white")
    for ax in axes:
        ax.set_yticks(y, rows["estimator"] if ax is axes[0] else [""] * len(y))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
    if several:
        axes[0].set_title(f"at {at} parameters", loc="left", fontweight="bold")


def plot_bound(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Each estimator's mean L (±2 SE) against the exact L and log p(X) where known, one panel
    per parameter point."""
    points = list(dict.fromkeys(summary["at"])) if len(summary) else ["init"]
    per_point = max((int((summary["at"] == at).sum()) for at in points), default=1)
    fig = Figure(figsize=(6 * len(points) + 2, max(3.0, 0.4 * per_point + 1.8)),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(points), squeeze=False)[0])
    for ax, at in zip(axes, points):
        rows = summary[summary["at"] == at]
        y = np.arange(len(rows))
        ax.errorbar(rows["elbo_mean"], y, xerr=2 * rows["elbo_se"], fmt="o", capsize=3,
                    label="mean estimate of L (±2 SE)")
        exact = rows["exact_elbo"].dropna()
        if len(exact):
            ax.axvline(float(exact.iloc[0]), color="tab:green", ls="--", label="exact L(q)")
        evidence = rows["log_evidence"].dropna()
        if len(evidence):
            ax.axvline(float(evidence.iloc[0]), color="tab:red", ls=":", label="log p(X)")
        ax.set_yticks(y, rows["estimator"] if ax is axes[0] else [""] * len(y))
        ax.set_ylim(len(rows) - 0.5, -0.5)
        ax.xaxis.set_major_locator(_ticker.MaxNLocator(nbins=4))
        ax.set_xlabel("L (nats)")
        ax.set_title(f"at {at} parameters", loc="left", fontweight="bold")
        ax.grid(axis="x", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize="small")
    fig.suptitle(title or _title(summary, "each estimator's mean L against the exact L"))
    return fig


def plot_learning_curves(
    frame: pd.DataFrame, log_evidence: float | None = None, title: str | None = None
) -> Figure:
    """L against SVI step and against cumulative wall time, one line per estimator: the whole
    run (top row, the start included) and its second half zoomed (bottom row).

    Uses the closed-form ``exact_elbo`` where the problem has one, else the common-yardstick
    estimate ``eval_elbo``; draws log p(X) as a horizontal line where known (in the zoomed row
    only when it lies within the zoomed range's span of the curves).
    """
    column = "exact_elbo" if frame["exact_elbo"].notna().any() else "eval_elbo"
    label = "exact L(q)" if column == "exact_elbo" else "L (estimate, common yardstick)"
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    (whole_step, whole_time), (zoom_step, zoom_time) = fig.subplots(2, 2, sharey="row")
    points = frame.dropna(subset=[column])
    half = points["step"].max() / 2 if len(points) else 0.0
    late = points[points["step"] >= half]
    for name, group in points.groupby("estimator", sort=False):
        for ax in (whole_step, zoom_step):
            ax.plot(group["step"], group[column], label=name)
        for ax in (whole_time, zoom_time):
            ax.plot(group["wall_time_s"], group[column], label=name)
    if len(late):
        low, top = late[column].min(), late[column].max()
        span = max(top - low, 1e-6 * max(1.0, abs(top)))
        near = log_evidence is not None and top <= log_evidence <= top + span
        if near:
            top = log_evidence
        zoom_step.set_ylim(low - 0.1 * span, top + 0.1 * span)
        zoom_step.set_xlim(half, points["step"].max())
        zoom_time.set_xlim(late["wall_time_s"].min(), points["wall_time_s"].max())
    else:
        near = False
    for ax in (whole_step, whole_time, zoom_step, zoom_time):
        if log_evidence is not None and (ax in (whole_step, whole_time) or near):
            ax.axhline(log_evidence, color="black", ls=":", label="log p(X)")
        ax.grid(alpha=0.3)
    whole_step.set_title("the whole run", fontsize=10)
    whole_time.set_title("the whole run, against wall time", fontsize=10)
    last = points["step"].max() if len(points) else 0
    zoom_step.set_title(f"the second half (steps {half:.0f}-{last}), zoomed", fontsize=10)
    zoom_time.set_title("the second half, against wall time", fontsize=10)
    for ax in (zoom_step, whole_step):
        ax.set_ylabel(label)
    zoom_step.set_xlabel("SVI step")
    zoom_time.set_xlabel("wall time (s)")
    handles, names = whole_step.get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=min(len(names), 6),
               fontsize="small")
    problem = frame["problem"].iloc[0] if len(frame) else ""
    note = ("" if column == "exact_elbo" else
            "; every evaluation uses the same random draws (common random numbers)")
    fig.suptitle(title or f"{problem}: learning curves{note}")
    return fig


def _title(summary: pd.DataFrame, what: str) -> str:
    if not len(summary):
        return what
    row = summary.iloc[0]
    points = " and ".join(dict.fromkeys(summary["at"]))
    references = ", ".join(dict.fromkeys(summary["reference"]))
    return (f"{row['problem']}: {what}\nat {points} parameters; R = {row['num_repeats']} "
            f"evaluations each; reference gradient: {references}")


__all__ = ["plot_bound", "plot_gradient_variance", "plot_learning_curves"]
