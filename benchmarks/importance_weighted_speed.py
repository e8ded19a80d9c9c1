r"""Speed of one SVI step: ImportanceWeightedELBO against Pyro's ``RenyiELBO(alpha=0)``.

Both compute the importance-weighted bound L_K from K vectorized particles
(``RenyiELBO(alpha=0, vectorize_particles=True)`` is Pyro's L_K with the IWAE gradient).  For
each problem (normal_normal, logistic, vae from :mod:`benchmarks._common`) and K (8 and 32;
``RenyiELBO`` at K = 1 does not vectorize and takes its log-sum-exp over a plate dimension, so
K = 1 is left out) this times one ``pyro.infer.SVI`` step (loss, backward, ``pyro.optim.Adam``)
of

- ``ImportanceWeightedELBO(K, estimator="iwae")`` (the same estimator as Pyro's),
- ``ImportanceWeightedELBO(K, estimator="dreg")``,
- ``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)``.

Target: eager ``ImportanceWeightedELBO`` at most 1.0x ``RenyiELBO(alpha=0)``.

Protocol (that of :mod:`benchmarks.speed`): every contestant of a group is built and warmed
up, then timed in ``--rounds`` interleaved rounds, in a shuffled order in each round; a
round's sample of a contestant is the mean of ``k`` back-to-back steps (``k`` chosen from the
warm-up so that a sample lasts about ``--sample-ms``), timed by process CPU time.  Reported:
the median per-step time, and for each ratio the median over rounds of the per-round ratio
(paired, so that load on the machine cancels) with its interquartile range.  Validation off,
``torch.set_num_threads(1)``.

Run ``python -m benchmarks.importance_weighted_speed`` (``--quick`` for a smoke run of a few
seconds).  Results go to ``benchmarks/results/importance_weighted_speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

import pyro

from ._common import (
    PROBLEMS,
    machine_info,
    median,
    quantile,
    single_thread_no_validation,
    svi_step,
    time_calls,
)

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 1.0
CONTESTANTS = ("iwae", "dreg", "renyi")


def _loss(kind: str, num_particles: int, nesting: int):
    if kind == "renyi":
        return pyro.infer.RenyiELBO(alpha=0, num_particles=num_particles,
                                    vectorize_particles=True, max_plate_nesting=nesting)
    from pyro_elbo_ext.elbos.importance_weighted import ImportanceWeightedELBO

    return ImportanceWeightedELBO(num_particles, kind, max_plate_nesting=nesting)


def time_group(problem_name: str, num_particles: int, rounds: int, sample_ms: float,
               problem_options: dict) -> dict:
    """Interleaved timing of the three contestants on one problem and K."""
    problem = PROBLEMS[problem_name].build(**problem_options)
    problem.set_params()
    steps = {kind: svi_step(_loss(kind, num_particles, problem.max_plate_nesting),
                            problem.model, problem.guide, problem.args)
             for kind in CONTESTANTS}
    repeats = {}
    for kind, step in steps.items():
        for _ in range(3):
            step()
        per_call = time_calls(step, 5)
        repeats[kind] = max(1, round(sample_ms * 1e-3 / max(per_call, 1e-6)))
    samples: dict[str, list[float]] = {kind: [] for kind in CONTESTANTS}
    order = list(CONTESTANTS)
    for _ in range(rounds):
        random.shuffle(order)
        for kind in order:
            samples[kind].append(time_calls(steps[kind], repeats[kind]))
    ratios = {}
    for kind in ("iwae", "dreg"):
        per_round = [a / b for a, b in zip(samples[kind], samples["renyi"])]
        ratios[kind] = {"median": median(per_round), "q25": quantile(per_round, 0.25),
                        "q75": quantile(per_round, 0.75)}
    return {
        "problem": problem_name, "num_particles": num_particles,
        "ms": {kind: 1e3 * median(v) for kind, v in samples.items()},
        "ratios": ratios,
    }


def report(groups: list[dict], info: dict, rounds: int) -> str:
    lines = [
        "# ImportanceWeightedELBO against RenyiELBO(alpha=0): one SVI step (ms, process CPU)",
        "",
        f"- {info['date']}; torch {info['torch']}, pyro {info['pyro']}; "
        f"torch.set_num_threads(1); validation off; {rounds} interleaved rounds; "
        f"load average {info.get('load_average')} (a shared machine: other jobs were running)",
        f"- target: eager ImportanceWeightedELBO / RenyiELBO(alpha=0) <= {TARGET:.1f} "
        "(median of per-round ratios, interquartile range in brackets)",
        "",
        "| problem | K | IW iwae | IW dreg | Renyi(0) | iwae / Renyi | dreg / Renyi | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in groups:
        r = g["ratios"]
        cells = [f"{r[k]['median']:.2f} [{r[k]['q25']:.2f}, {r[k]['q75']:.2f}]"
                 for k in ("iwae", "dreg")]
        met = all(r[k]["median"] <= TARGET for k in ("iwae", "dreg"))
        lines.append(
            f"| {g['problem']} | {g['num_particles']} | {g['ms']['iwae']:.3f} | "
            f"{g['ms']['dreg']:.3f} | {g['ms']['renyi']:.3f} | {cells[0]} | {cells[1]} | "
            f"{'yes' if met else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    """Time every group, print the table and write ``importance_weighted_speed.{json,md}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["normal_normal", "logistic", "vae"],
                        choices=["normal_normal", "logistic", "vae"])
    parser.add_argument("--particles", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--sample-ms", type=float, default=60.0)
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, 3 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    options: dict = {}
    if args.quick:
        args.problems, args.particles, args.rounds, args.sample_ms = (
            ["normal_normal"], [8], 3, 5.0)
        options = {"num_data": 50}
    with single_thread_no_validation():
        groups = [time_group(name, k, args.rounds, args.sample_ms, options)
                  for name in args.problems for k in args.particles]
    info = machine_info(probe_numpyro=False)
    text = report(groups, info, args.rounds)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": info, "rounds": args.rounds, "target": TARGET, "groups": groups}
    (args.out / "importance_weighted_speed.json").write_text(json.dumps(result, indent=1))
    (args.out / "importance_weighted_speed.md").write_text(text)
    return result


if __name__ == "__main__":
    main()
