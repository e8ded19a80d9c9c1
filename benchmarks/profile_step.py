"""cProfile of SVI steps of one contestant of the speed benchmark: where the time goes.

Examples
--------
``python -m benchmarks.profile_step normal_normal JensenELBO --particles 32 --validation off``
``python -m benchmarks.profile_step logistic Trace_ELBO --jit``
``python -m benchmarks.profile_step vae floor:jensen``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import warnings
from collections.abc import Sequence

import pyro
import torch

from ._common import PAIRINGS, PROBLEMS, StepFn, floor_step, svi_step


def make_step(problem_name: str, contestant: str, num_particles: int, jit: bool) -> StepFn:
    """The step function of ``contestant`` (one of our losses, a Pyro ELBO or ``floor:<est>``)."""
    spec = PROBLEMS[problem_name]
    problem = spec.build(**spec.options)
    problem.set_params()
    if contestant.startswith("floor:"):
        loss_fn, leaves = spec.floor(problem, contestant.split(":", 1)[1], num_particles)
        return floor_step(loss_fn, leaves)
    for pairing in PAIRINGS:
        if problem_name not in pairing.problems:
            continue
        if contestant == pairing.ours:
            return svi_step(*pairing.make_ours(problem, num_particles, jit), problem.args)
        if contestant == pairing.pyro:
            return svi_step(*pairing.make_pyro(problem, num_particles, jit), problem.args)
    raise SystemExit(f"unknown contestant {contestant!r} for problem {problem_name!r}")


def profile(step: StepFn, steps: int, top: int, sort: str = "tottime") -> str:
    """cProfile ``steps`` calls of ``step`` (after 5 warm-up calls); the top entries as text."""
    for _ in range(5):
        step()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(sort).print_stats(top)
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> str:
    """Print (and return) the profile of one contestant.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments; see ``--help``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=list(PROBLEMS))
    parser.add_argument("contestant", help="e.g. JensenELBO, Trace_ELBO, floor:jensen")
    parser.add_argument("--particles", type=int, default=1)
    parser.add_argument("--validation", choices=["on", "off"], default="off")
    parser.add_argument("--jit", action="store_true")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--sort", default="tottime", choices=["tottime", "cumulative"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.enable_validation(args.validation == "on")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = make_step(args.problem, args.contestant, args.particles, args.jit)
        text = profile(step, args.steps, args.top, args.sort)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
