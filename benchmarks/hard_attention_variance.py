"""HardAttentionELBO: score-function gradient variance of each baseline, and a training race.

Part 1 (variance).  On ``random_attention`` (two dependent glimpses, 3 examples, 4 locations)
and on the cluttered-digits model (after a short exact warm-up, so that the classifier's
rewards differ between glimpses), the REINFORCE gradient wrt the *attention* parameters
(which only receive score-function gradients) is drawn ``--draws`` times with 4 vectorized
particles per draw, for each baseline; the total variance (trace of the covariance) is
divided by that of plain REINFORCE.  The learned baseline is first regressed on the reward
(300 steps, model fixed); the moving average is warmed up for 50 steps.  The ratio's standard
error is from the delta method with the conservative 2 V^2 / (n - 1) for the sampling variance
of each total variance V (exact for one Gaussian coordinate, an upper figure for many).

Part 2 (training).  ``train_hard_attention`` on the 16x16 cluttered digits (9 glimpse
locations; ``--canvas 20`` for 16 locations) with the exact estimator, REINFORCE with each
baseline, and plain REINFORCE: test accuracy (classifying from the most probable glimpse) and
wall time of the SVI loop, one thread.  The REINFORCE runs get an entropy bonus
(``--entropy-weight``, default 0.1; Xu et al. 2015), without which a baseline lets the
attention policy collapse early onto a wrong location on the 20x20 canvas.

Run from the repository root: ``python -m benchmarks.hard_attention_variance
[--draws 2000] [--steps 1500] [--canvas 16] [--entropy-weight 0.1]``
"""

from __future__ import annotations

import argparse
import math

import pyro
import torch

from pyro_elbo_ext.elbos.hard_attention import HardAttentionELBO
from pyro_elbo_ext.problems.hard_attention import (
    cluttered_digits,
    random_attention,
    train_hard_attention,
)

BASELINES = (None, "moving_average", "learned", "leave_one_out")


def attention_grad_draws(elbo, model, guide, args, leaves, num_draws: int) -> torch.Tensor:
    """(num_draws, P) draws of dF wrt ``leaves`` (flattened, concatenated)."""
    rows = []
    for _ in range(num_draws):
        loss = elbo.differentiable_loss(model, guide, *args)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        rows.append(torch.cat([
            (torch.zeros_like(leaf) if g is None else -g).reshape(-1)
            for leaf, g in zip(leaves, grads)
        ]))
    return torch.stack(rows)


def variance_ratios(model, guide, args, leaves, num_draws: int, seed: int = 0) -> dict:
    """Total variance of each baseline's attention gradient divided by plain REINFORCE's."""
    out = {}
    for baseline in BASELINES:
        pyro.set_rng_seed(seed)
        elbo = HardAttentionELBO(estimator="reinforce", baseline=baseline, num_particles=4,
                                 vectorize_particles=True, max_plate_nesting=1)
        if baseline == "learned":  # each training call takes one step of its own optimizer
            for _ in range(300):
                elbo.differentiable_loss(model, guide, *args)
        elif baseline == "moving_average":
            for _ in range(50):
                elbo.differentiable_loss(model, guide, *args)
        with pyro.validation_enabled(False):
            draws = attention_grad_draws(elbo, model, guide, args, leaves, num_draws)
        var = draws.var(0)
        total = float(var.sum())
        # conservative: the sampling variance of a total variance whose coordinates were
        # perfectly correlated, 2 total^2 / (n - 1)
        out[baseline] = (total, 2 * total**2 / (num_draws - 1))
    base, base_var = out[None]
    return {
        b: (v / base, (v / base) * math.sqrt(vv / v**2 + base_var / base**2))
        for b, (v, vv) in out.items()
    }


def print_ratios(title: str, ratios: dict) -> None:
    print(title)
    for baseline, (ratio, se) in ratios.items():
        if baseline is None:
            print(f"  {'None':<16} variance ratio vs no baseline =  1 (reference)")
            continue
        print(f"  {str(baseline):<16} variance ratio vs no baseline = {ratio:6.3f} (+- {se:.3f})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--canvas", type=int, default=16)
    parser.add_argument("--entropy-weight", type=float, default=0.1,
                        help="entropy bonus of the REINFORCE runs in the training race")
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)

    # ---- part 1: variance
    torch.set_default_dtype(torch.float64)
    problem = random_attention(num_glimpses=2)
    problem.set_params()
    store = pyro.get_param_store()
    leaves = [store["att_w"].unconstrained(), store["trans"].unconstrained()]
    ratios = variance_ratios(problem.model, problem.guide, problem.args, leaves, opts.draws)
    print_ratios(f"random_attention (2 glimpses), attention-parameter gradient, {opts.draws} "
                 "draws x 4 particles:", ratios)
    torch.set_default_dtype(torch.float32)

    pyro.set_rng_seed(0)
    digits = cluttered_digits(canvas=opts.canvas, batch_size=64)
    train_hard_attention("enum", None, num_steps=200, problem=digits)  # warm-up
    attention = digits.notes["networks"]["attention"]
    leaves = [p.unconstrained() for name, p in store.items() if name.startswith("attention")]
    ratios = variance_ratios(digits.model, digits.guide, digits.args, leaves,
                             max(opts.draws // 4, 100))
    print_ratios(f"cluttered digits {opts.canvas}x{opts.canvas} after 200 exact steps, "
                 f"attention-network gradient, {max(opts.draws // 4, 100)} draws x 4 particles "
                 "(minibatch 64):", ratios)
    del attention

    # ---- part 2: training
    print(f"training on cluttered digits {opts.canvas}x{opts.canvas}, {opts.steps} SVI steps "
          "(Adam lr 0.01, minibatch 64), test accuracy from the most probable glimpse; "
          f"REINFORCE runs with entropy bonus {opts.entropy_weight:g}:")
    runs = [("enum", None, 1)] + [("reinforce", b, 4 if b == "leave_one_out" else 1)
                                  for b in ("moving_average", "learned", "leave_one_out", None)]
    for estimator, baseline, particles in runs:
        bonus = {"entropy_weight": opts.entropy_weight} if estimator == "reinforce" else {}
        result = train_hard_attention(estimator, baseline, num_steps=opts.steps,
                                      num_particles=particles, canvas=opts.canvas,
                                      elbo_options=bonus)
        label = estimator if baseline is None and estimator == "enum" else (
            f"reinforce + {baseline}" if baseline else "reinforce, no baseline")
        if particles > 1:
            label += f" ({particles} particles)"
        print(f"  {label:<38} accuracy {result['accuracy']:.3f} (chance 0.1)   "
              f"{result['seconds']:6.1f} s")


if __name__ == "__main__":
    main()
