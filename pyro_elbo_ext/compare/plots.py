"""Figures of a comparison: gradient variance / SNR, learning curves, the bound vs log p(X).

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot`` (no global
figure state, no GUI backend needed); save it with ``fig.savefig(path)``.
"""

from __future__ import annotations

import math

import numpy as np

from .._extras import require

pd = require("pandas", "compare", "the comparison's plots")
Figure = require("matplotlib.figure", "compare", "the comparison's plots").Figure

_FAMILY_COLORS = {"ours": "tab:blue", "pyro": "tab:gray"}


def plot_gradient_variance(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Total gradient variance (log scale, ±2 SE), median SNR and efficiency per estimator.

    Parameters
    ----------
    summary : DataFrame
        :meth:`Comparison.summary` (columns ``estimator``, ``family``, ``grad_var_total``,
        ``grad_var_total_se``, ``snr_median``, ``efficiency``).
    """
    fig = Figure(figsize=(12, max(3.0, 0.45 * len(summary) + 1.5)), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    y = np.arange(len(summary))
    colors = [_FAMILY_COLORS.get(f, "tab:orange") for f in summary["family"]]
    var = summary["grad_var_total"].to_numpy(float)
    se = summary["grad_var_total_se"].to_numpy(float)
    positive = var[var > 0]
    floor = positive.min() / 100 if positive.size else 1e-12
    shown = np.where(var > 0, var, floor)
    lower = np.minimum(2 * se, shown - floor / 10)
    axes[0].barh(y, shown, xerr=[np.maximum(lower, 0), 2 * se], color=colors)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("total gradient variance  tr Cov[dL]  (±2 SE)")
    for i, v in enumerate(var):
        if v <= 0:
            axes[0].annotate("0", (shown[i], i), xytext=(3, -3), textcoords="offset points")
    snr = summary["snr_median"].to_numpy(float)
    axes[1].barh(y, np.where(np.isfinite(snr), snr, 0.0), color=colors)
    axes[1].set_xlabel("median SNR  |mean| / sd")
    eff = summary["efficiency"].to_numpy(float)
    finite = eff[np.isfinite(eff) & (eff > 0)]
    cap = finite.max() * 10 if finite.size else 1.0
    axes[2].barh(y, np.where(np.isfinite(eff), eff, cap), color=colors)
    axes[2].set_xscale("log")
    axes[2].set_xlabel("efficiency  1 / (variance x seconds)")
    for i, e in enumerate(eff):
        if not math.isfinite(e):
            axes[2].annotate("inf", (cap, i), xytext=(3, -3), textcoords="offset points")
    axes[0].set_yticks(y, summary["estimator"])
    axes[0].invert_yaxis()
    fig.suptitle(title or _title(summary, "gradient statistics"))
    return fig


def plot_bound(summary: pd.DataFrame, title: str | None = None) -> Figure:
    """Each estimator's mean L (±2 SE) against the exact L and log p(X) where known."""
    fig = Figure(figsize=(8, max(3.0, 0.45 * len(summary) + 1.5)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(summary))
    ax.errorbar(summary["elbo_mean"], y, xerr=2 * summary["elbo_se"], fmt="o", capsize=3,
                label="mean estimate of L (±2 SE)")
    exact = summary["exact_elbo"].dropna()
    if len(exact):
        ax.axvline(float(exact.iloc[0]), color="tab:green", ls="--", label="exact L(q)")
    evidence = summary["log_evidence"].dropna()
    if len(evidence):
        ax.axvline(float(evidence.iloc[0]), color="tab:red", ls="-", label="log p(X)")
    ax.set_yticks(y, summary["estimator"])
    ax.invert_yaxis()
    ax.set_xlabel("L (nats)")
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or _title(summary, "the bound"))
    return fig


def plot_learning_curves(
    frame: pd.DataFrame, log_evidence: float | None = None, title: str | None = None
) -> Figure:
    """L against SVI step and against cumulative wall time, one line per estimator.

    Uses the closed-form ``exact_elbo`` where the problem has one, else the common-yardstick
    estimate ``eval_elbo``; draws log p(X) as a horizontal line where known.
    """
    column = "exact_elbo" if frame["exact_elbo"].notna().any() else "eval_elbo"
    label = "exact L(q)" if column == "exact_elbo" else "L (estimate, common yardstick)"
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for name, group in frame.groupby("estimator", sort=False):
        points = group.dropna(subset=[column])
        by_step.plot(points["step"], points[column], label=name)
        by_time.plot(points["wall_time_s"], points[column], label=name)
    for ax in (by_step, by_time):
        if log_evidence is not None:
            ax.axhline(log_evidence, color="black", ls=":", label="log p(X)")
        ax.grid(alpha=0.3)
    values = frame[column].dropna()
    if len(values):  # focus on the converging part: ignore the first few percent of the range
        top = max(values.max(), log_evidence if log_evidence is not None else -np.inf)
        low = values.quantile(0.1)
        span = max(top - low, 1e-6)
        by_step.set_ylim(low - 0.1 * span, top + 0.1 * span)
    by_step.set_xlabel("SVI step")
    by_time.set_xlabel("wall time (s)")
    by_step.set_ylabel(label)
    by_time.legend(loc="lower right", fontsize="small")
    problem = frame["problem"].iloc[0] if len(frame) else ""
    fig.suptitle(title or f"{problem}: learning curves")
    return fig


def _title(summary: pd.DataFrame, what: str) -> str:
    if not len(summary):
        return what
    row = summary.iloc[0]
    return (f"{row['problem']}: {what} at {row['at']} parameters "
            f"(R = {row['num_repeats']}, reference: {row['reference']})")


__all__ = ["plot_bound", "plot_gradient_variance", "plot_learning_curves"]
