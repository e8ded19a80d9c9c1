"""The text report of a comparison: the table, and lines that say what its numbers mean.

* :func:`variance_yardstick` -- the estimator the others' variance is divided by;
* :func:`format_table` -- the terminal table (one row per estimator and parameter point);
* :func:`notes` -- the lines printed after the table: the bias threshold and when R is too
  small for it, rare events not drawn, biased objectives, and what the numbers show.
"""

from __future__ import annotations

import math

from .._extras import require
from .records import Comparison

pd = require("pandas", "compare", "the comparison's tables")

#: estimators the others' variance is compared with, in order of preference: the plain
#: score-function / sampled-entropy estimators that the others improve on
YARDSTICKS = ("trace_elbo", "hard_attention_reinforce", "jensen_sampled")

#: below this fraction of the yardstick's variance an estimator is "zero-variance" in the text
ZERO_VARIANCE = 1e-12


def variance_yardstick(summary) -> str | None:
    """The first of :data:`YARDSTICKS` in the summary, else None."""
    present = set(summary["estimator"])
    return next((name for name in YARDSTICKS if name in present), None)


def _num(x, spec: str = ".4g") -> str:
    missing = x is None or (isinstance(x, float) and math.isnan(x))
    return "-" if missing else format(x, spec)


def format_table(summary) -> str:
    """The terminal table of :meth:`Comparison.summary` (an ``at`` column when several points).

    ``K`` is the number of particles (model evaluations) each evaluation of the estimator
    used.  The column ``var / <yardstick>`` is each estimator's total gradient variance divided
    by the yardstick's (:func:`variance_yardstick`) at the same point.
    """
    yardstick = variance_yardstick(summary)
    several = summary["at"].nunique() > 1
    base = {}
    if yardstick is not None:
        rows = summary[summary["estimator"] == yardstick]
        base = dict(zip(rows["at"], rows["grad_var_total"]))
    lines = []
    for _, r in summary.iterrows():
        row = {"at": r["at"]} if several else {}
        row.update({
            "estimator": r["estimator"],
            "K": int(r["num_particles"]),
            "L mean": f"{_num(r['elbo_mean'], '.4f')} ± {_num(r['elbo_se'], '.2g')}",
            "gap to log p(X)": _num(r["gap"], ".4g"),
            "grad var": f"{_num(r['grad_var_total'], '.3g')} ± "
                        f"{_num(r['grad_var_total_se'], '.2g')}",
        })
        if yardstick is not None:
            b = base.get(r["at"])
            row[f"var / {yardstick}"] = _num(r["grad_var_total"] / b, ".2g") if b else "-"
        row.update({
            "SNR (median)": _num(r["snr_median"], ".3g"),
            "max |bias|/SE": _num(r["bias_max_z"], ".2f"),
            "ms/eval": _num(1e3 * r["time_per_eval_s"], ".3g"),
            "efficiency": _num(r["efficiency"], ".3g"),
        })
        lines.append(row)
    return pd.DataFrame(lines).to_string(index=False)


def notes(comparison: Comparison) -> list[str]:
    """The lines that follow the table, in order: how to read the bias column (and where R is
    too small for that reading), elements no draw varied, estimators of another objective, and
    what the table shows (lowest variance per point, the path estimator at the posterior, the
    baselines' variance cut)."""
    out: list[str] = []
    records = comparison.records
    if not records:
        return out
    summary = comparison.summary()
    with_reference = [r for r in records if r.bias_z_threshold is not None]
    if with_reference:
        first = with_reference[0]
        size = sum(p.grad_mean.size for p in first.params)
        out.append(
            f"max |bias|/SE is the worst of {size} gradient element(s): at R = "
            f"{first.num_repeats} an unbiased estimator stays below "
            f"{first.bias_z_threshold:.2f} in 99% of runs (Student-t with R - 1 = "
            f"{first.num_repeats - 1} degrees of freedom, Sidak over the elements), provided "
            "each element's mean is near normal")
        short = [r for r in with_reference if r.too_few_repeats]
        if short:
            worst = max(r.repeats_for_normal_mean for r in short)
            names = ", ".join(sorted({r.estimator for r in short}))
            out.append(
                f"R is too small for that threshold to hold for {names}: their draws are "
                f"skewed, and Cochran's rule (R > 25 g1^2) asks for R >= {worst}; read their "
                "max |bias|/SE as indicative only, or raise --repeats")
    for rec in records:
        if rec.bias_unassessed:
            out.append(
                f"note: {rec.estimator}: {rec.bias_unassessed} element(s) took one value in all "
                f"{rec.num_repeats} draws while the reference differs (a rare event not drawn): "
                "left out of max |bias|/SE; raise --repeats to assess them")
    biased = summary.loc[summary["objective"] != "L", ["estimator", "objective"]]
    for name, objective in sorted(set(map(tuple, biased.to_numpy()))):
        out.append(f"note: {name} estimates the gradient of the {objective}, not of L")
    out.extend(_findings(summary))
    return out


def _findings(summary) -> list[str]:
    """What the variance and efficiency columns show, one line per finding."""
    lines = [
        "grad var is the total variance of one evaluation's gradient (the trace of its "
        "covariance): SGD's noise grows with it; efficiency = 1 / (grad var x seconds) also "
        "charges the time an evaluation takes (higher is better)",
    ]
    ks = sorted({int(k) for k in summary["num_particles"]})
    if len(ks) > 1:
        lines.append(
            "K is the particles (model evaluations) per evaluation: estimators that need "
            "several (leave-one-out, DisARM pairs, L_K) use at least that many, so compare "
            "their variance with the yardstick's at the same K (--particles)")
    yardstick = variance_yardstick(summary)
    for at, rows in summary.groupby("at", sort=False):
        var = dict(zip(rows["estimator"], rows["grad_var_total"]))
        unbiased = rows[rows["objective"] == "L"]
        if yardstick is None or yardstick not in var or not var[yardstick] > 0 or not len(unbiased):
            continue
        base = var[yardstick]
        zero = [(n, v) for n, v in zip(unbiased["estimator"], unbiased["grad_var_total"])
                if v <= ZERO_VARIANCE * base]
        for name, value in zero:
            size = "exactly 0" if value == 0 else f"{value:.2g}, at rounding level,"
            lines.append(f"at {at}: {name}'s gradient variance is {size} against {base:.3g} "
                         f"for {yardstick}" + _why_zero(name, at))
        zero = [n for n, _ in zero]
        best = unbiased.loc[unbiased["grad_var_total"].idxmin()]
        if best["estimator"] not in zero and best["estimator"] != yardstick:
            lines.append(
                f"at {at}: the lowest variance of an unbiased estimator is "
                f"{best['estimator']}'s, {best['grad_var_total'] / base:.2g} x {yardstick}'s")
        cuts = [f"{n.removeprefix('hard_attention_reinforce_')} x{base / var[n]:.2g}"
                for n in ("hard_attention_reinforce_ma", "hard_attention_reinforce_learned",
                          "hard_attention_reinforce_loo")
                if yardstick == "hard_attention_reinforce" and var.get(n, 0) > 0]
        if cuts:
            lines.append(f"at {at}: the baselines divide REINFORCE's variance by: "
                         + ", ".join(cuts))
    return lines


def _why_zero(name: str, at: str) -> str:
    if at == "posterior" and name == "jensen_path":
        return (": at the exact posterior the path estimator's gradient is 0 in every draw, "
                "because the score term it drops has mean 0 and carries all the noise "
                "(Roeder et al. 2017, arXiv:1703.09194)")
    return ": it sums the discrete sites exactly" if "enum" in name else ""


__all__ = ["YARDSTICKS", "format_table", "notes", "variance_yardstick"]
