"""Typed records of a comparison and their tidy pandas / JSON forms.

* :class:`ReferenceGradient` -- the gradient biases are measured against;
* :class:`ParameterRecord` -- one parameter's per-element gradient statistics;
* :class:`EstimatorRecord` -- everything measured for one estimator at one parameter point;
* :class:`Comparison` -- the records of a run, with ``summary()``, ``tidy()``, ``to_json()``
  and ``save()``;
* :func:`summary_frame`, :func:`tidy_frame`, :data:`SUMMARY_COLUMNS`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._extras import require

pd = require("pandas", "compare", "the comparison's tables")


@dataclass(frozen=True, eq=False)
class ReferenceGradient:
    """The gradient dL that biases are measured against.

    Attributes
    ----------
    kind : {"exact", "estimate", "none"}
        Closed form (``Problem.exact_elbo_and_grad``), a many-sample estimate, or unavailable.
    label : str
        What the table prints, e.g. ``"exact"`` or ``"estimate: trace_elbo x 4000"``.
    grads : dict of str to ndarray
        dL wrt each unconstrained parameter leaf (constrained shapes as stored).
    se : dict of str to ndarray
        Standard errors of ``grads`` (zero for the exact reference).
    elbo : float or None
        L at the parameters (exact, or the reference estimator's mean).
    """

    kind: str
    label: str
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    se: dict[str, np.ndarray] = field(default_factory=dict)
    elbo: float | None = None


@dataclass(frozen=True, eq=False)
class ParameterRecord:
    """Gradient statistics of one parameter (flattened over its elements).

    ``snr = |grad_mean| / sqrt(grad_var)``; ``bias = grad_mean - reference``,
    ``bias_se = sqrt(grad_var / R + reference_se^2)``.
    """

    name: str
    shape: tuple[int, ...]
    grad_mean: np.ndarray
    grad_var: np.ndarray
    grad_var_se: np.ndarray
    snr: np.ndarray
    reference: np.ndarray | None = None
    bias: np.ndarray | None = None
    bias_se: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class EstimatorRecord:
    """Everything measured for one estimator on one problem at one parameter point.

    Attributes
    ----------
    problem, estimator, description, family, objective : str
    at : str
        Where the parameters were (``"init"``, ``"posterior"``, ``"custom"``).
    num_repeats, num_particles, seed : int
        R evaluations, particles per evaluation, and the first seed (repetition r used
        ``seed + r`` for every estimator: common random numbers).
    elbo_mean, elbo_se : float
        Mean and standard error of the R estimates of L (the negated loss).
    exact_elbo : float or None
        L in closed form at the parameters, where the problem has it.
    log_evidence : float or None
        log p(X), where known; ``gap = log_evidence - elbo_mean``.
    grad_var_total, grad_var_total_se : float
        Sum over all parameter elements of the gradient variance (the trace of the covariance
        of the gradient estimate) and its standard error.
    snr_median : float
        Median over parameter elements of ``|mean| / sd``.
    bias_norm : float or None
        Euclidean norm of (mean gradient - reference gradient) over all elements.
    bias_max_z : float or None
        Largest ``|bias| / bias_se`` over the elements (about N(0,1)-sized when unbiased), leaving
        out the unassessed ones.
    bias_unassessed : int
        Elements of a stochastic estimator that took one value in all R draws while the
        reference differs (a rare event not drawn): their bias cannot be standardized
        (:func:`~pyro_elbo_ext.compare.statistics.standardized_bias`).
    reference : str
        The reference gradient's label (``"exact"``, ``"estimate: ..."`` or ``"none"``).
    time_per_eval_s : float
        Mean wall time of one ``loss_and_grads`` call.
    efficiency : float
        ``1 / (grad_var_total * time_per_eval_s)``: inverse of the variance left after one
        second of averaging (infinite for a zero-variance estimator).
    params : tuple of ParameterRecord
    bias_z_threshold : float or None
        What ``bias_max_z`` of an unbiased estimator stays below in 99% of runs at this R and
        number of elements (Student-t, Šidák:
        :func:`~pyro_elbo_ext.compare.statistics.max_z_threshold`); None without a reference.
    repeats_for_normal_mean : int
        The R that Cochran's rule (R > 25 g1², g1 the largest sample skewness among the
        elements) asks for before the threshold holds; when ``num_repeats`` is below it, the
        threshold does not mean what it says
        (:func:`~pyro_elbo_ext.compare.statistics.repeats_for_normal_mean`).
    """

    problem: str
    estimator: str
    description: str
    family: str
    objective: str
    at: str
    num_repeats: int
    num_particles: int
    seed: int
    elbo_mean: float
    elbo_se: float
    exact_elbo: float | None
    log_evidence: float | None
    grad_var_total: float
    grad_var_total_se: float
    snr_median: float
    bias_norm: float | None
    bias_max_z: float | None
    bias_unassessed: int
    reference: str
    time_per_eval_s: float
    efficiency: float
    params: tuple[ParameterRecord, ...] = ()
    bias_z_threshold: float | None = None
    repeats_for_normal_mean: int = 0

    @property
    def too_few_repeats(self) -> bool:
        """Whether R is below what Cochran's rule asks for (the bias threshold may not hold)."""
        return self.num_repeats < self.repeats_for_normal_mean

    @property
    def gap(self) -> float | None:
        """log p(X) - mean L (the KL to the posterior, plus noise), where log p(X) is known."""
        return None if self.log_evidence is None else self.log_evidence - self.elbo_mean

    def to_row(self) -> dict[str, object]:
        """The scalar fields (and ``gap``) as a flat dict: one row of the summary table."""
        row = {k: v for k, v in self.__dict__.items() if k != "params"}
        row["gap"] = self.gap
        return row


#: summary columns in display order
SUMMARY_COLUMNS = [
    "problem", "estimator", "family", "objective", "at", "num_repeats", "num_particles",
    "elbo_mean", "elbo_se", "exact_elbo", "log_evidence", "gap", "grad_var_total",
    "grad_var_total_se", "snr_median", "bias_norm", "bias_max_z", "bias_z_threshold",
    "bias_unassessed", "repeats_for_normal_mean", "reference", "time_per_eval_s", "efficiency",
    "description", "seed",
]


def summary_frame(records: list[EstimatorRecord]) -> pd.DataFrame:
    """One row per estimator with the scalar statistics (:data:`SUMMARY_COLUMNS`)."""
    return pd.DataFrame([r.to_row() for r in records], columns=SUMMARY_COLUMNS)


def tidy_frame(records: list[EstimatorRecord]) -> pd.DataFrame:
    """One row per (estimator, parameter, element): the per-element gradient statistics."""
    rows = []
    for rec in records:
        for p in rec.params:
            for i in range(p.grad_mean.size):
                has_ref = p.reference is not None
                bias = float(p.bias[i]) if has_ref else math.nan
                bias_se = float(p.bias_se[i]) if has_ref else math.nan
                rows.append({
                    "problem": rec.problem,
                    "estimator": rec.estimator,
                    "at": rec.at,
                    "parameter": p.name,
                    "element": _index_label(i, p.shape),
                    "grad_mean": float(p.grad_mean[i]),
                    "grad_var": float(p.grad_var[i]),
                    "grad_var_se": float(p.grad_var_se[i]),
                    "snr": float(p.snr[i]),
                    "reference_grad": float(p.reference[i]) if has_ref else math.nan,
                    "bias": bias,
                    "bias_se": bias_se,
                    "reference": rec.reference,
                })
    return pd.DataFrame(rows)


def _index_label(flat: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return ""
    return ",".join(str(int(i)) for i in np.unravel_index(flat, shape))


@dataclass(frozen=True, eq=False)
class Comparison:
    """The result of :func:`~pyro_elbo_ext.compare.runner.compare_estimators` (one parameter
    point) or :func:`~pyro_elbo_ext.compare.runner.compare_at_points` (several).

    Attributes
    ----------
    problem : str
    at : str
        The parameter point, or the points joined by ``", "``.
    reference : ReferenceGradient
        The reference at the (first) point.
    records : tuple of EstimatorRecord
        By point, then by estimator.
    skipped : dict of str to str
    references : dict of str to ReferenceGradient
        The reference at each point (by its ``at`` label).
    """

    problem: str
    at: str
    reference: ReferenceGradient
    records: tuple[EstimatorRecord, ...]
    skipped: dict[str, str] = field(default_factory=dict)
    references: dict[str, ReferenceGradient] = field(default_factory=dict)

    @property
    def points(self) -> list[str]:
        """The parameter points, in order."""
        return list(dict.fromkeys(rec.at for rec in self.records)) or [self.at]

    def summary(self) -> pd.DataFrame:
        """One row per estimator (see :func:`summary_frame`)."""
        return summary_frame(list(self.records))

    def tidy(self) -> pd.DataFrame:
        """One row per estimator and parameter element (see :func:`tidy_frame`)."""
        return tidy_frame(list(self.records))

    def record(self, estimator: str, at: str | None = None) -> EstimatorRecord:
        """The record of ``estimator`` (at point ``at``; default the first point)."""
        at = self.points[0] if at is None else at
        for rec in self.records:
            if rec.estimator == estimator and rec.at == at:
                return rec
        raise KeyError(f"no record for estimator {estimator!r} at {at!r} in this comparison")

    def to_json(self) -> str:
        """The records (with per-parameter arrays as lists) as a JSON document."""
        doc = {
            "problem": self.problem,
            "at": self.at,
            "reference": {"kind": self.reference.kind, "label": self.reference.label,
                          "elbo": self.reference.elbo},
            "references": _jsonable({at: {"kind": ref.kind, "label": ref.label, "elbo": ref.elbo}
                                     for at, ref in self.references.items()}),
            "skipped": self.skipped,
            "estimators": [
                {**_jsonable(rec.to_row()), "params": [
                    {"name": p.name, "shape": list(p.shape),
                     **{k: None if getattr(p, k) is None else _jsonable(getattr(p, k).tolist())
                        for k in ("grad_mean", "grad_var", "grad_var_se", "snr", "reference",
                                  "bias", "bias_se")}}
                    for p in rec.params
                ]}
                for rec in self.records
            ],
        }
        return json.dumps(doc, indent=1)

    def save(self, out: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>_summary.csv``, ``<stem>_params.csv`` and ``<stem>.json`` to ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"compare_{self.problem}"
        paths = {
            "summary_csv": out / f"{stem}_summary.csv",
            "params_csv": out / f"{stem}_params.csv",
            "json": out / f"{stem}.json",
        }
        self.summary().to_csv(paths["summary_csv"], index=False)
        self.tidy().to_csv(paths["params_csv"], index=False)
        paths["json"].write_text(self.to_json())
        return paths


def _jsonable(value):
    """Replace non-finite floats (not valid JSON) by strings ``"inf"``, ``"-inf"``, ``"nan"``."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float | np.floating) and not math.isfinite(value):
        return str(float(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


__all__ = [
    "Comparison",
    "EstimatorRecord",
    "ParameterRecord",
    "ReferenceGradient",
    "SUMMARY_COLUMNS",
    "summary_frame",
    "tidy_frame",
]
