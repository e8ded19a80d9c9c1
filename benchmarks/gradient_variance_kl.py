"""Gradient variance of AnalyticKLELBO against Pyro's Trace_ELBO (and TraceMeanField_ELBO).

Problems: ``normal_normal`` (N = 20) at a misfit guide and at the exact posterior, and the
synthetic Bayesian ``logistic_regression`` (N = 200, D = 5) at its starting guide and at a
guide fitted by 300 Adam steps.  At each point every estimator's gradient wrt the
unconstrained guide parameters is drawn ``--draws`` times (one particle each, the same seed
for every estimator) and the total gradient variance (trace of the covariance) is divided by
Trace_ELBO's.  Because every estimator sees the same random numbers, the draws are paired;
the standard error of each ratio is from the delta method on the per-draw squared deviations
of the two estimators, with their covariance (the unpaired SE, which ignores it, is printed
too).  TraceMeanField_ELBO, which also uses the analytic KL, should agree with
AnalyticKLELBO draw for draw on these mean-field guides.

Run: ``python -m benchmarks.gradient_variance_kl [--draws 2000]``
"""

from __future__ import annotations

import argparse

import pyro
import torch
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO

from pyro_elbo_ext.elbos.analytic_kl import AnalyticKLELBO
from pyro_elbo_ext.problems import get_problem
from pyro_elbo_ext.problems.logistic import logistic_regression

from .gradient_variance_jensen import gradient_draws


def fitted_params(problem, num_steps: int = 300, lr: float = 0.05, seed: int = 0) -> dict:
    """Guide parameters after ``num_steps`` of Adam on AnalyticKLELBO (4 particles)."""
    problem.set_params()
    pyro.set_rng_seed(seed)
    elbo = AnalyticKLELBO(num_particles=4, vectorize_particles=True,
                          max_plate_nesting=problem.max_plate_nesting)
    svi = SVI(problem.model, problem.guide, pyro.optim.Adam({"lr": lr}), loss=elbo)
    for _ in range(num_steps):
        svi.step(*problem.args, **problem.kwargs)
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in problem.init_params}


def variance_ratio(draws: torch.Tensor, reference: torch.Tensor) -> tuple[float, float, float]:
    """tr Var[draws] / tr Var[reference] for paired gradient draws (rows), with two SEs.

    With d_k = |g_k - mean g|^2 per draw, the ratio is mean(d) / mean(d_ref); its paired SE
    is the delta-method SE of a ratio of two correlated means, the unpaired SE leaves the
    covariance out.

    Returns
    -------
    ratio, paired_se, unpaired_se : float
    """
    d = ((draws - draws.mean(0)) ** 2).sum(-1)
    d_ref = ((reference - reference.mean(0)) ** 2).sum(-1)
    n = d.shape[0]
    m, m_ref = d.mean(), d_ref.mean()
    ratio = m / m_ref
    var_a, var_r = d.var() / m**2, d_ref.var() / m_ref**2
    cov = ((d - m) * (d_ref - m_ref)).sum() / (n - 1) / (m * m_ref)
    paired = ratio * torch.sqrt(torch.clamp(var_a + var_r - 2 * cov, min=0.0) / n)
    unpaired = ratio * torch.sqrt((var_a + var_r) / n)
    return float(ratio), float(paired), float(unpaired)


def compare(problem, points: dict, num_draws: int, seed: int) -> list[tuple]:
    """Rows (point, estimator, Var[L], tr Var[grad], ratio, paired SE, unpaired SE)."""
    estimators = {
        "Trace_ELBO": Trace_ELBO(),
        "TraceMeanField_ELBO": TraceMeanField_ELBO(),
        "AnalyticKLELBO": AnalyticKLELBO(),
    }
    rows = []
    for point, params in points.items():
        reference = None
        for name, elbo in estimators.items():
            problem.set_params(params)
            pyro.set_rng_seed(seed)
            values, grads = gradient_draws(elbo, problem, num_draws)
            if reference is None:
                reference = grads
            ratio, paired, unpaired = variance_ratio(grads, reference)
            total = float(((grads - grads.mean(0)) ** 2).sum(-1).mean()) * num_draws / (
                num_draws - 1
            )
            rows.append((point, name, float(values.var()), total, ratio, paired, unpaired))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: extra intra-op threads only add overhead

    normal = get_problem("normal_normal", dtype=torch.float64)
    logistic = logistic_regression(num_data=200, num_features=5, dtype=torch.float64)
    cases = [
        (normal, {"misfit guide": dict(normal.init_params),
                  "exact posterior": dict(normal.posterior_params)}),
        (logistic, {"initial guide": dict(logistic.init_params),
                    "fitted guide (300 steps)": fitted_params(logistic, seed=args.seed)}),
    ]
    print(f"{args.draws} single-particle gradient draws per cell (same seed for every "
          "estimator); ratio = tr Var[grad] / Trace_ELBO's +- paired SE (unpaired SE)")
    header = (f"{'problem':<20} {'point':<25} {'estimator':<20} {'Var[L]':>10} "
              f"{'tr Var[grad]':>13} {'ratio vs Trace_ELBO':>30}")
    print(header)
    print("-" * len(header))
    for problem, points in cases:
        rows = compare(problem, points, args.draws, args.seed)
        for point, name, var_l, var_g, ratio, paired, unpaired in rows:
            ratio_text = (
                "1" if name == "Trace_ELBO" else f"{ratio:.3f} +- {paired:.2g} ({unpaired:.2g})"
            )
            print(f"{problem.name:<20} {point:<25} {name:<20} {var_l:>10.4g} {var_g:>13.4g} "
                  f"{ratio_text:>30}")


if __name__ == "__main__":
    main()
