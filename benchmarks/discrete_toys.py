"""Discrete-latent gradient estimators on the literature's toys: variance at equal evaluations,
and optimization curves.

Toys (:mod:`pyro_elbo_ext.compare.discrete_toys`): the REBAR/RELAX toy, minimize
E[(b - t)^2] with b ~ Bernoulli(sigmoid(a)), t = 0.499 and t = 0.45 (Tucker et al. 2017,
arXiv:1703.07370; Grathwohl et al. 2018, arXiv:1711.00123); three Bernoulli sites with targets
(0.499, 0.45, 0.55) and an interaction 0.1 b1 b2; two Categorical(3) sites.

Part 1 (variance).  At the toys' starting logits (a = 0) and at a seeded a ~ N(0, 1), each
estimator's gradient of E[f]
wrt the logits at E evaluations of f per estimate (E = 2 and 6; a DisARM pair is 2
evaluations, a REBAR sample 3): the total variance (sum over the logits), exact by enumeration
for REINFORCE (E independent samples averaged), leave-one-out (E samples) and DisARM (E/2
pairs) where the enumeration fits, else estimated from ``--draws`` draws with its standard error
(the squared deviations from the exact gradient: iid, mean = the variance); the bias
(mean - exact, estimated) where it is not zero by construction; RELAX (neural control variate,
one evaluation per sample) and REBAR (eta f(sigmoid(z / lambda))) before and after training
their control variate on the variance objective at those logits (``--cv-steps`` Adam steps,
256 estimates each).

Part 2 (optimization).  Minimize E[f] from a = 0 with Adam (lr ``--lr``) on each estimator's
gradient at 2 evaluations per step (REBAR: 3, stated), for ``--steps`` steps and ``--seeds``
seeds; RELAX and REBAR train their control variate jointly (the variance objective, its own
Adam).  Recorded every 20 steps: the exact E[f] - min_b f(b) and the estimator's total gradient
variance at the current logits (exact where enumeration allows, else from 2,000 draws).

Output: ``benchmarks/results/discrete_toys.{json,md}`` and ``discrete_toys.png`` (curves).

Run from the repository root: ``python -m benchmarks.discrete_toys [--quick]`` (the full run
takes a few minutes on one core; ``--quick`` a few seconds, for the tests).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from pyro_elbo_ext.compare.discrete_exact import (
    MAX_TUPLES,
    configurations,
    exact_expectation,
    exact_gradient,
    exact_variance,
)
from pyro_elbo_ext.compare.discrete_toys import (
    TOYS,
    estimate,
    get_toy,
    gradient_draws,
    samples_per_estimate,
)
from pyro_elbo_ext.elbos.discrete_estimators import ControlVariate, variance_objective

RESULTS = Path(__file__).parent / "results"
EXACT = ("reinforce", "loo", "disarm")
VARIANCE_ESTIMATORS = ("reinforce", "loo", "disarm", "relax", "rebar", "gumbel_st")
CURVE_ESTIMATORS = ("reinforce", "loo", "disarm", "relax", "rebar", "gumbel_st")


def make_control(toy, estimator: str, seed: int = 0) -> ControlVariate | None:
    """RELAX's neural control variate (no f evaluation) or REBAR's eta f(sigmoid(z/lambda))."""
    if estimator not in ("relax", "rebar"):
        return None
    torch.manual_seed(seed)
    categorical = toy.family == "categorical"
    if estimator == "rebar":
        return ControlVariate(toy.logits.shape, f=toy.f, use_relaxed_f=True, hidden=0,
                              categorical=categorical, dtype=toy.logits.dtype)
    return ControlVariate(toy.logits.shape, hidden=16, categorical=categorical,
                          dtype=toy.logits.dtype)


def fits(estimator: str, toy, evaluations: int) -> bool:
    """Whether ``estimator`` can use exactly ``evaluations`` evaluations on ``toy``."""
    if estimator == "disarm" and toy.family != "bernoulli":
        return False
    try:
        samples_per_estimate(estimator, evaluations)
    except ValueError:
        return False
    return True


def exact_total(estimator: str, toy, logits, evaluations: int) -> float | None:
    """The exact total variance, or None where enumeration does not give it."""
    if estimator not in EXACT:
        return None
    if estimator == "loo":
        count = configurations(logits, toy.family).shape[0] ** evaluations
        if count > MAX_TUPLES:
            return None
    return float(exact_variance(estimator, toy.f, logits, toy.family, evaluations).sum())


def estimated_total(draws: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """Total variance from draws (squared deviations from the exact mean) and its SE."""
    sq = ((draws - exact) ** 2).reshape(draws.shape[0], -1).sum(-1)
    return float(sq.mean()), float(sq.std() / math.sqrt(draws.shape[0]))


def train_control(toy, estimator, control, logits, steps: int, lr: float = 0.01,
                  batch: int = 256, evaluations: int | None = None, seed: int = 0) -> None:
    """Adam on the variance objective (mean over ``batch`` estimates) at fixed ``logits``."""
    if steps <= 0:
        return
    evaluations = evaluations or (3 if estimator == "rebar" else 1)
    opt = torch.optim.Adam(control.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    rows = logits.detach().expand((batch,) + logits.shape)
    for _ in range(steps):
        opt.zero_grad()
        g = estimate(estimator, toy, rows, evaluations, control, create_graph=True,
                     generator=gen)
        (variance_objective(g) / batch).backward()
        opt.step()


def points(toy) -> dict[str, torch.Tensor]:
    """The logits the variance is measured at: the start (a = 0; for one Bernoulli at
    p = 1/2 DisARM's pair is always b~ = 1 - b and its estimate exact) and a seeded point
    a ~ N(0, 1)."""
    gen = torch.Generator().manual_seed(0)
    shifted = toy.logits + torch.randn(toy.logits.shape, generator=gen, dtype=toy.logits.dtype)
    return {"a = 0": toy.logits, "a ~ N(0, 1)": shifted}


def variance_table(toy_names, evaluations_list, num_draws: int, cv_steps: int) -> list[dict]:
    rows = []
    for name in toy_names:
        toy = get_toy(name)
        for point, logits in points(toy).items():
            rows += _variance_rows(toy, name, point, logits, evaluations_list, num_draws,
                                   cv_steps)
    return rows


def _variance_rows(toy, name, point, logits, evaluations_list, num_draws, cv_steps):
    rows = []
    exact = exact_gradient(toy.f, logits, toy.family)
    for evaluations in evaluations_list:
        reference = None
        for estimator in VARIANCE_ESTIMATORS:
            if not fits(estimator, toy, evaluations):
                continue
            stages = [("", None)]
            if estimator in ("relax", "rebar"):
                stages = [(" (untrained c)", 0), (f" (c trained {cv_steps} steps)", cv_steps)]
            for label, steps in stages:
                control = make_control(toy, estimator)
                if steps:
                    train_control(toy, estimator, control, logits, steps)
                draws = gradient_draws(estimator, toy, evaluations, num_draws, logits=logits,
                                       control=control, seed=17)
                total, se = estimated_total(draws, exact)
                exact_value = exact_total(estimator, toy, logits, evaluations)
                bias = (draws.mean(0) - exact).abs().max()
                bias_se = (draws.std(0) / math.sqrt(num_draws)).max()
                row = {
                    "toy": name, "point": point, "evaluations": evaluations,
                    "estimator": estimator + label,
                    "samples": samples_per_estimate(estimator, evaluations),
                    "variance": exact_value if exact_value is not None else total,
                    "variance_se": 0.0 if exact_value is not None else se,
                    "exact": exact_value is not None,
                    "estimated_variance": total, "estimated_variance_se": se,
                    "max_abs_bias": float(bias), "bias_se": float(bias_se),
                    "grad_norm": float(exact.norm()),
                }
                if estimator == "reinforce":
                    reference = row["variance"]
                row["ratio_to_reinforce"] = row["variance"] / reference
                rows.append(row)
    return rows


def optimize(toy, estimator: str, steps: int, lr: float, seed: int, every: int = 20,
             variance_draws: int = 2000) -> dict:
    """Adam on the logits with ``estimator``'s gradient of E[f]; the exact curve."""
    evaluations = 3 if estimator == "rebar" else 2
    logits = toy.logits.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    control = make_control(toy, estimator, seed)
    cv_opt = torch.optim.Adam(control.parameters(), lr=0.01) if control is not None else None
    gen = torch.Generator().manual_seed(seed)
    best = float(toy.f(configurations(toy.logits, toy.family)).min())
    curve, variances, at = [], [], []
    start = time.process_time()
    for step in range(steps + 1):
        if step % every == 0:
            with torch.no_grad():
                gap = float(exact_expectation(toy.f, logits.detach(), toy.family)) - best
            curve.append(gap)
            at.append(step)
            variances.append(current_variance(toy, estimator, logits.detach(), evaluations,
                                              control, variance_draws, seed + step))
        if step == steps:
            break
        row = logits.unsqueeze(0)
        if control is not None:
            cv_opt.zero_grad()
            g = estimate(estimator, toy, row, evaluations, control, create_graph=True,
                         generator=gen)
            variance_objective(g).backward(inputs=list(control.parameters()))
            cv_opt.step()
            g = g.detach()
        else:
            g = estimate(estimator, toy, row, evaluations, generator=gen)
        opt.zero_grad()
        logits.grad = g[0].detach().clone()
        opt.step()
    return {"steps": at, "gap": curve, "variance": variances, "evaluations_per_step":
            evaluations, "cpu_s": time.process_time() - start}


def current_variance(toy, estimator, logits, evaluations, control, draws, seed) -> float:
    exact_value = exact_total(estimator, toy, logits, evaluations)
    if exact_value is not None:
        return exact_value
    samples = gradient_draws(estimator, toy, evaluations, draws, logits=logits, control=control,
                             seed=seed)
    return estimated_total(samples, exact_gradient(toy.f, logits, toy.family))[0]


def curves(toy_names, steps: int, lr: float, seeds: int) -> dict:
    out = {}
    for name in toy_names:
        toy = get_toy(name)
        out[name] = {}
        for estimator in CURVE_ESTIMATORS:
            if estimator == "disarm" and toy.family != "bernoulli":
                continue
            runs = [optimize(toy, estimator, steps, lr, seed) for seed in range(seeds)]
            out[name][estimator] = runs
    return out


def _fmt(x: float, se: float | None = None) -> str:
    text = f"{x:.3g}"
    return text if not se else f"{text} ± {se:.2g}"


def markdown(meta: dict, table: list[dict], race: dict) -> str:
    lines = [
        "# Discrete estimators on the toys (`python -m benchmarks.discrete_toys`)",
        "",
        f"- date: {meta['date']}; {meta['machine']}; torch {meta['torch']}; "
        f"{meta['threads']} thread; wall time {meta['wall_s']:.0f} s",
        f"- variance: total over the logits at the start (a = 0) and at a seeded a ~ N(0, 1), "
        "exact by "
        f"enumeration where marked, else from {meta['draws']} draws (± one SE); E = "
        "evaluations of f per estimate (DisARM: E/2 antithetic pairs; REBAR: 3 per sample)",
        "",
        "## Gradient variance at equal evaluations",
        "",
        "| toy | logits | E | estimator | samples | total variance | exact? | / REINFORCE | "
        "max abs bias (SE) | abs gradient |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        bias = ("0 (unbiased)" if r["exact"] or not r["estimator"].startswith("gumbel")
                and r["max_abs_bias"] < 4 * r["bias_se"]
                else _fmt(r["max_abs_bias"], r["bias_se"]))
        lines.append(
            f"| {r['toy']} | {r['point']} | {r['evaluations']} | {r['estimator']} | "
            f"{r['samples']} | "
            f"{_fmt(r['variance'], r['variance_se'])} | {'exact' if r['exact'] else 'MC'} | "
            f"{r['ratio_to_reinforce']:.3g} | {bias} | {r['grad_norm']:.3g} |"
        )
    lines += [
        "",
        "Bias: `0 (unbiased)` where the estimator is unbiased by construction and its "
        "estimated bias is within 4 SE; the straight-through estimator's is shown as measured.",
        "",
        f"## Optimization: Adam (lr {meta['lr']}) on each estimator's gradient, 2 evaluations "
        f"per step (REBAR 3), {meta['steps']} steps, {meta['seeds']} seeds",
        "",
        "| toy | estimator | E[f] - min f at the end (mean over seeds) | at mid-run | "
        "mean total gradient variance along the run | CPU s per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_est in race.items():
        for estimator, runs in by_est.items():
            end = sum(r["gap"][-1] for r in runs) / len(runs)
            mid = sum(r["gap"][len(r["gap"]) // 2] for r in runs) / len(runs)
            var = sum(sum(r["variance"]) / len(r["variance"]) for r in runs) / len(runs)
            cpu = sum(r["cpu_s"] for r in runs) / len(runs)
            lines.append(f"| {name} | {estimator} | {end:.3g} | {mid:.3g} | {var:.3g} | "
                         f"{cpu:.1f} |")
    lines += ["", f"![optimization curves and gradient variance]({meta['stem']}.png)"]
    return "\n".join(lines) + "\n"


def plot(race: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # matplotlib is the compare extra; the numbers are in the JSON
        return
    names = list(race)
    colors = dict(zip(CURVE_ESTIMATORS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6.5), squeeze=False)
    for j, name in enumerate(names):
        for estimator, runs in race[name].items():
            steps = runs[0]["steps"]
            gap = [sum(r["gap"][i] for r in runs) / len(runs) for i in range(len(steps))]
            var = [sum(r["variance"][i] for r in runs) / len(runs) for i in range(len(steps))]
            axes[0, j].plot(steps, gap, label=estimator, color=colors[estimator])
            axes[1, j].plot(steps, var, label=estimator, color=colors[estimator])
        axes[0, j].set_title(name)
        axes[0, j].set_yscale("log")
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
    axes[0, 0].set_ylabel("E[f] - min f (exact)")
    axes[1, 0].set_ylabel("total gradient variance")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=50_000)
    parser.add_argument("--cv-steps", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--toys", nargs="+", default=list(TOYS), choices=list(TOYS))
    parser.add_argument("--quick", action="store_true", help="tiny run (for the tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.draws, opts.cv_steps, opts.steps, opts.seeds = 2000, 20, 40, 1
    torch.set_num_threads(1)
    start = time.time()
    table = variance_table(opts.toys, (2, 6), opts.draws, opts.cv_steps)
    race = curves(opts.toys, opts.steps, opts.lr, opts.seeds)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, "
                   f"{torch.get_num_threads()} torch thread",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "draws": opts.draws, "cv_steps": opts.cv_steps, "steps": opts.steps, "lr": opts.lr,
        "seeds": opts.seeds, "wall_s": time.time() - start,
    }
    stem = "discrete_toys_quick" if opts.quick else "discrete_toys"
    meta["stem"] = stem
    result = {"meta": meta, "variance": table, "optimization": race}
    text = markdown(meta, table, race)
    print(text)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (opts.out / f"{stem}.md").write_text(text)
    plot(race, opts.out / f"{stem}.png")
    return result


if __name__ == "__main__":
    main()
