"""Where the compiled loss's gap to the floor comes from: the loss, the optimizer or SVI.

For each problem, in process CPU time (validation off, one particle, JensenELBO with
``jit=True``; rounds interleave the six, medians over rounds), this times

- ``svi.step (jit)``: the full SVI step the speed benchmark times;
- ``jit loss+backward``: our compiled ``differentiable_loss`` and ``backward`` only;
- ``floor loss+backward``: the hand-written loss and ``backward`` only;
- ``floor + one Adam``: the speed benchmark's floor step (one ``torch.optim.Adam`` over all
  leaves);
- ``floor + Adam per leaf``: the floor with one ``torch.optim.Adam`` per leaf, which is what
  ``pyro.optim.Adam`` builds;
- ``svi.step (jit, GroupedOptim)``: the SVI step with
  :class:`pyro_elbo_ext.optim.GroupedOptim` (one ``torch.optim.Adam`` over all parameters,
  the floor's own optimizer).

``loss gap`` is jit loss+backward / floor loss+backward; ``step gap`` is svi.step (jit) /
(floor + one Adam); ``step gap, GroupedOptim`` the same with GroupedOptim: each the median over
rounds of the per-round ratio (times: medians over rounds).

Run: ``python -m benchmarks.decompose_step``; writes ``benchmarks/results/decompose_step.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch

from pyro_elbo_ext.optim import GroupedOptim

from ._common import PAIRINGS, PROBLEMS, machine_info, single_thread_no_validation

RESULTS = Path(__file__).resolve().parent / "results"


#: the gaps of the table: (label, numerator, denominator), each the median over rounds of the
#: per-round ratio (paired, so that a change of load on the machine cancels)
GAPS = (
    ("loss gap", "jit loss+backward", "floor loss+backward"),
    ("step gap", "svi.step (jit)", "floor + one Adam"),
    ("step gap, GroupedOptim", "svi.step (jit, GroupedOptim)", "floor + one Adam"),
)


def interleaved_samples(fns: dict[str, Callable[[], object]], calls: int = 300,
                        reps: int = 31) -> dict[str, list[float]]:
    """Per function, ``reps`` samples of its mean process CPU time (ms) over ``calls`` calls;
    each round runs every function once, so that a change of load falls on all alike."""
    for fn in fns.values():
        for _ in range(20):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.process_time()
            for _ in range(calls):
                fn()
            samples[name].append((time.process_time() - start) / calls * 1e3)
    return samples


def decompose(name: str, calls: int) -> dict[str, list[float]]:
    """Samples of the six timings of the module docstring for problem ``name``."""
    spec = PROBLEMS[name]
    problem = spec.build(**spec.options)
    problem.set_params()
    elbo, model, guide = PAIRINGS[0].make_ours(problem, 1, True)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), loss=elbo)
    grouped_elbo, _, _ = PAIRINGS[0].make_ours(problem, 1, True)
    grouped_svi = pyro.infer.SVI(model, guide, GroupedOptim(torch.optim.Adam, {"lr": 1e-3}),
                                 loss=grouped_elbo)
    loss_fn, leaves = spec.floor(problem, "jensen", 1)
    one = torch.optim.Adam(leaves, lr=1e-3)
    per_leaf = [torch.optim.Adam([leaf], lr=1e-3) for leaf in leaves]

    leaves = [pyro.param(name).unconstrained() for name in pyro.get_param_store().keys()]

    def jit_loss_backward():  # gradients returned, not accumulated into the SVI steps' params
        torch.autograd.grad(elbo.differentiable_loss(model, guide, *problem.args), leaves,
                            allow_unused=True)

    def floor_loss_backward():
        loss_fn().backward()

    def floor_one_adam():
        one.zero_grad()
        floor_loss_backward()
        one.step()

    def floor_adam_per_leaf():
        for opt in per_leaf:
            opt.zero_grad()
        floor_loss_backward()
        for opt in per_leaf:
            opt.step()

    return interleaved_samples({
        "svi.step (jit)": lambda: svi.step(*problem.args),
        "jit loss+backward": jit_loss_backward,
        "floor loss+backward": floor_loss_backward,
        "floor + one Adam": floor_one_adam,
        "floor + Adam per leaf": floor_adam_per_leaf,
        "svi.step (jit, GroupedOptim)": lambda: grouped_svi.step(*problem.args),
    }, calls)


def main(argv: Sequence[str] | None = None) -> str:
    """Print and write the decomposition table.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments; see ``--help``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["normal_normal", "logistic", "vae"],
                        choices=[k for k in PROBLEMS if k != "hard_attention"])
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with single_thread_no_validation():
        rows = {name: decompose(name, args.calls) for name in args.problems}
    info = machine_info(probe_numpyro=False)
    keys = list(next(iter(rows.values())))
    lines = [
        "# Decomposition of the compiled SVI step against the floor (ms, process CPU time)",
        "",
        f"- {info['date']}; torch {info['torch']}, pyro {info['pyro']}; "
        "torch.set_num_threads(1); validation off; 1 particle; JensenELBO(jit=True); "
        f"load average {info.get('load_average')}",
        "",
        "| problem | " + " | ".join(keys) + "".join(f" | {label}" for label, _, _ in GAPS) + " |",
        "|---|" + "---|" * (len(keys) + 3),
    ]
    for name, samples in rows.items():
        gaps = [statistics.median(a / b for a, b in zip(samples[num], samples[den]))
                for _, num, den in GAPS]
        lines.append(
            f"| {name} | " + " | ".join(f"{statistics.median(samples[k]):.3f}" for k in keys)
            + "".join(f" | {gap:.2f}x" for gap in gaps) + " |")
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decompose_step.md").write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
