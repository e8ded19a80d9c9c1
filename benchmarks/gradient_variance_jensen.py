"""Gradient variance of JensenELBO's entropy estimators against Pyro's Trace_ELBO.

Problem: ``normal_normal`` (N = 20). At three guide settings — a misfit guide, a guide one
posterior sd away from the posterior mean (scale at its exact value), and the exact
posterior — each estimator's gradient wrt the unconstrained guide parameters is drawn
``--draws`` times (one particle each) and the total gradient variance (trace of the
covariance) is compared with Trace_ELBO's at the same point; the variance of L itself is
printed beside it (the analytic entropy's gain: for a location-scale guide its gradient
equals the sampled entropy's pathwise gradient draw for draw, but L's draws are less noisy).
The standard error of each ratio is from the delta method on the two independent variance estimates.

Run: ``python -m benchmarks.gradient_variance_jensen [--draws 2000]``
"""

from __future__ import annotations

import argparse
import math

import pyro
import torch
from pyro.infer import Trace_ELBO

from pyro_elbo_ext import JensenELBO
from pyro_elbo_ext.problems import get_problem


def gradient_draws(elbo, problem, num_draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws of L, shape (num_draws,), and of dL wrt the unconstrained leaves, (num_draws, P)."""
    leaves = list(problem.unconstrained_params().values())
    values, rows = [], []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
        grads = torch.autograd.grad(loss, leaves)
        values.append(-loss.detach())
        rows.append(torch.cat([-g.reshape(-1) for g in grads]))
    return torch.stack(values), torch.stack(rows)


def total_variance(draws: torch.Tensor) -> tuple[float, float]:
    """Trace of the covariance and its standard error (from per-draw squared deviations)."""
    centred_sq = ((draws - draws.mean(0)) ** 2).sum(-1)
    n = draws.shape[0]
    return float(centred_sq.mean() * n / (n - 1)), float(centred_sq.std() / math.sqrt(n))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    problem = get_problem("normal_normal", dtype=torch.float64)
    post = problem.posterior_params
    points = {
        "misfit guide": dict(problem.init_params),
        "1 sd from posterior": {"loc": post["loc"] + post["scale"], "scale": post["scale"]},
        "exact posterior": dict(post),
    }
    estimators = {
        "Trace_ELBO": Trace_ELBO(),
        "JensenELBO(analytic)": JensenELBO(entropy="analytic"),
        "JensenELBO(sampled)": JensenELBO(entropy="sampled"),
        "JensenELBO(path)": JensenELBO(entropy="path"),
    }
    print(f"normal_normal, N=20, {args.draws} single-particle gradient draws per cell")
    print(f"{'point':<20} {'estimator':<21} {'Var[L]':>10} {'tr Var[grad]':>13} "
          f"{'grad-variance ratio vs Trace_ELBO':>34}")
    for point, point_params in points.items():
        reference = None
        for name, elbo in estimators.items():
            problem.set_params(point_params)
            pyro.set_rng_seed(args.seed)
            values, grads = gradient_draws(elbo, problem, args.draws)
            var, se = total_variance(grads)
            if reference is None:
                reference = (var, se)
            ratio = var / reference[0]
            rel = math.hypot(se / var if var else 0.0, reference[1] / reference[0])
            ratio_text = f"{ratio:.3g} +- {ratio * rel:.2g}" if name != "Trace_ELBO" else "1"
            print(f"{point:<20} {name:<21} {float(values.var()):>10.4g} {var:>13.4g} "
                  f"{ratio_text:>34}")


if __name__ == "__main__":
    main()
