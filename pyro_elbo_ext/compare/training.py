r"""Training comparison: SVI runs of several estimators with the same seeds and step budget.

* :func:`fit_estimators` -- train with each named estimator; returns a :class:`FitResult`
  (the learning curves, ``final()``, ``save()``); :data:`FIT_COLUMNS`.

Every estimator starts from the problem's ``init_params``, runs ``num_steps`` steps of
``pyro.infer.SVI`` with Adam at the same learning rate, and step t runs under the seed
``seed + t`` (common random numbers across estimators).  Recorded per step: the loss the
estimator reported and the wall time of the step.  Every ``eval_every`` steps (and at the last
step), outside the timed region, the run is also scored on a common yardstick:

- ``eval_elbo``: a ``num_eval_particles``-sample estimate of L by ``JensenELBO("analytic")``
  (or, where JensenELBO does not apply, the estimator's own ``decompose``), with its terms
  per kind as ``term_<kind>`` columns (expected log-likelihood, log prior, entropy, KL);
- ``exact_elbo``: L in closed form at the current parameters, where the problem has it.

Every evaluation, at every step and for every estimator, runs under the same seed
(``seed + num_steps``: common random numbers), so the differences along a curve and between
curves are differences of the parameters, not fresh evaluation noise (with a new seed per
evaluation a 50-particle estimate's noise can hide the progress of the last few hundred steps);
the level of every point carries the estimate's own standard error.  Comparing ``eval_elbo``
or ``exact_elbo`` against cumulative ``wall_time_s`` answers the practical question of which
estimator gets to a good bound fastest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro.infer import SVI
from pyro.optim import Adam
from pyro.util import get_rng_state, set_rng_state

from .._extras import require
from ..elbos import JensenELBO
from ..problems import Problem
from .draws import check_params_listed, module_values_restored
from .estimators import chosen_estimators, get_estimator

pd = require("pandas", "compare", "the learning-curve tables")
tqdm = require("tqdm.auto", "compare", "progress bars").tqdm

#: columns of every row of a fit frame (term_<kind> columns are added when decompositions exist)
FIT_COLUMNS = ["problem", "estimator", "step", "loss", "step_time_s", "wall_time_s",
               "eval_elbo", "exact_elbo"]


@dataclass(frozen=True, eq=False)
class FitResult:
    """The learning curves of a training comparison.

    Attributes
    ----------
    problem : str
    frame : DataFrame
        One row per (estimator, step): :data:`FIT_COLUMNS` plus ``term_<kind>`` columns; the
        evaluation columns are NaN between evaluation steps.
    log_evidence : float or None
        log p(X) where it is known and fixed (None when it depends on trained model parameters).
    final_params : dict of str to dict of str to Tensor
        Each estimator's constrained parameter values after the last step.
    """

    problem: str
    frame: pd.DataFrame
    log_evidence: float | None = None
    final_params: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def final(self) -> pd.DataFrame:
        """The last evaluation row of each estimator, plus its total wall time."""
        evaluated = self.frame.dropna(subset=["eval_elbo"])
        last = evaluated.groupby("estimator", sort=False).tail(1)
        return last.reset_index(drop=True)

    def final_table(self, num_eval_particles: int | None = None) -> str:
        """The terminal table of :meth:`final`: final L (exact and estimated), wall time and
        time per step of each estimator."""
        final = self.final()
        estimate = f"final L ({num_eval_particles}-sample)" if num_eval_particles \
            else "final L (estimate)"
        table = pd.DataFrame({
            "estimator": final["estimator"],
            "final L (exact)": final["exact_elbo"].map(
                lambda v: "-" if pd.isna(v) else f"{v:.4f}"),
            estimate: final["eval_elbo"].map(lambda v: f"{v:.4f}"),
            "wall time (s)": final["wall_time_s"].map(lambda v: f"{v:.2f}"),
            "ms/step": (1e3 * final["wall_time_s"] / final["step"]).map(lambda v: f"{v:.3g}"),
        })
        return table.to_string(index=False)

    def save(self, out: str | Path, stem: str | None = None) -> dict[str, Path]:
        """Write ``<stem>_curves.csv`` and ``<stem>_final.csv`` to ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = stem or f"fit_{self.problem}"
        paths = {"curves_csv": out / f"{stem}_curves.csv", "final_csv": out / f"{stem}_final.csv"}
        self.frame.to_csv(paths["curves_csv"], index=False)
        self.final().to_csv(paths["final_csv"], index=False)
        return paths


def fit_estimators(
    problem: Problem,
    estimators: Iterable[str] | None = None,
    num_steps: int = 300,
    lr: float = 0.05,
    seed: int = 0,
    num_particles: int = 1,
    eval_every: int | None = None,
    num_eval_particles: int = 50,
    progress: bool | None = None,
) -> FitResult:
    """Train the problem's guide with each named estimator and record the learning curves.

    Parameters
    ----------
    problem : Problem
    estimators : iterable of str, optional
        Registry names (default: every estimator that applies).
    num_steps : int
        SVI steps per estimator (the same budget for all).
    lr : float
        Adam learning rate.
    seed : int
        Step t of every estimator runs under seed ``seed + t``; every evaluation under
        ``seed + num_steps``.
    num_particles : int
        Particles per step.
    eval_every : int, optional
        Steps between evaluations (default ``max(1, num_steps // 25)``).
    num_eval_particles : int
        Particles of the common-yardstick estimate ``eval_elbo``.
    progress : bool or None
        tqdm bars (None: on a terminal, shown after 2 s).

    Returns
    -------
    FitResult
    """
    for name, value in (("num_steps", num_steps), ("num_particles", num_particles),
                        ("num_eval_particles", num_eval_particles)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    eval_every = max(1, num_steps // 25) if eval_every is None else int(eval_every)
    if eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer, got {eval_every!r}")
    names = chosen_estimators(problem, estimators)
    specs = [get_estimator(n) for n in names]
    built = [spec.build(problem, num_particles) for spec in specs]  # fail early on a bad pair
    yardstick = _yardstick(problem, num_eval_particles)
    store = pyro.get_param_store()
    saved, rng = store.get_state(), get_rng_state()
    _warm_up_torch_optim()
    rows: list[dict] = []
    finals: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with module_values_restored(problem):
            for spec, (loss, model, guide) in zip(specs, built):
                evaluator = yardstick if yardstick is not None else loss
                rows.extend(_fit_one(problem, spec.name, loss, model, guide, evaluator,
                                     num_steps, lr, seed, eval_every, progress))
                finals[spec.name] = {
                    n: pyro.param(n).detach().clone() for n in problem.init_params
                }
    finally:
        store.set_state(saved)
        set_rng_state(rng)
    frame = pd.DataFrame(rows)
    for column in FIT_COLUMNS:
        if column not in frame:
            frame[column] = float("nan")
    terms = sorted(c for c in frame.columns if c.startswith("term_"))
    frame = frame[FIT_COLUMNS + terms]
    # log p(X) that depends on model parameters being trained (``notes["log_evidence_at"]``,
    # e.g. tiny_discrete's mu) is not a fixed ceiling for the curves: leave it out
    log_evidence = None if "log_evidence_at" in problem.notes else problem.log_evidence
    return FitResult(problem.name, frame, log_evidence, finals)


def _fit_one(problem, name, loss, model, guide, evaluator, num_steps, lr, seed, eval_every,
             progress) -> list[dict]:
    problem.set_params()
    with _rng_preserved():  # one untimed evaluation: first-call costs are not the estimator's
        pyro.set_rng_seed(seed)
        loss.loss_and_grads(model, guide, *problem.args, **problem.kwargs)
    check_params_listed(problem)
    problem.set_params()
    svi = SVI(model, guide, Adam({"lr": lr}), loss=loss)
    rows = []
    wall = 0.0
    bar = tqdm(range(num_steps), desc=f"fit {name}", unit="step",
               disable=None if progress is None else not progress,
               delay=0 if progress else 2.0, leave=False)
    for step in bar:
        pyro.set_rng_seed(seed + step)
        start = time.perf_counter()
        value = svi.step(*problem.args, **problem.kwargs)
        elapsed = time.perf_counter() - start
        wall += elapsed
        row = {"problem": problem.name, "estimator": name, "step": step + 1, "loss": value,
               "step_time_s": elapsed, "wall_time_s": wall}
        if (step + 1) % eval_every == 0 or step + 1 == num_steps:
            row.update(_evaluate(problem, evaluator, seed + num_steps))
        rows.append(row)
    return rows


def _warm_up_torch_optim() -> None:
    """Take one Adam step on a throwaway tensor.

    torch's first optimizer step pays one-time import costs (about a second or two); without
    this the first estimator's wall time would carry them.
    """
    dummy = torch.zeros(1, requires_grad=True)
    dummy.grad = torch.zeros(1)
    torch.optim.Adam([dummy]).step()


def _yardstick(problem: Problem, num_particles: int) -> JensenELBO | None:
    """``JensenELBO("analytic")`` with vectorized particles where the model allows, else looped;
    None where JensenELBO does not apply (the estimators' own ``decompose`` is used then)."""
    if not get_estimator("jensen_analytic").applies_to(problem)[0]:
        return None
    options = {"num_particles": num_particles, "entropy": "analytic",
               "max_plate_nesting": problem.max_plate_nesting}
    vectorized = JensenELBO(vectorize_particles=True, **options)
    store = pyro.get_param_store()
    saved = store.get_state()
    try:
        problem.set_params()
        with _rng_preserved():
            vectorized.decompose(problem.model, problem.guide, *problem.args, **problem.kwargs)
        return vectorized
    except Exception:  # a model that does not broadcast over a particle dimension
        return JensenELBO(**options)
    finally:
        store.set_state(saved)


def _evaluate(problem: Problem, evaluator, seed: int) -> dict[str, float]:
    """The common-yardstick decomposition and the closed-form L at the current parameters."""
    out: dict[str, float] = {}
    with _rng_preserved():
        pyro.set_rng_seed(seed)
        if hasattr(evaluator, "decompose"):
            decomposition = evaluator.decompose(problem.model, problem.guide, *problem.args,
                                                **problem.kwargs)
            out["eval_elbo"] = decomposition.elbo
            out.update({f"term_{k}": v for k, v in decomposition.by_kind().items()})
        else:
            out["eval_elbo"] = -evaluator.loss(problem.model, problem.guide, *problem.args,
                                               **problem.kwargs)
    if problem.exact_elbo is not None:
        with torch.no_grad():
            values = {n: pyro.param(n).detach() for n in problem.init_params}
            out["exact_elbo"] = float(problem.exact_elbo(values))
    return out


@contextmanager
def _rng_preserved():
    """Restore Pyro's RNG state (python, numpy, torch) on exit."""
    state = get_rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


__all__ = ["FIT_COLUMNS", "FitResult", "fit_estimators"]
