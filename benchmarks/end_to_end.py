"""What a user pays end to end: a digits VAE, eager and with CompiledSVI, in fresh processes.

Every measurement runs in its own Python process (``python -m benchmarks.end_to_end worker``)
with an empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR`` a new temporary directory), so the
times include importing, tracing and compiling as a user's first run does.  Inductor's
vector-ISA probe is answered from this package's record (``~/.cache/pyro_elbo_ext/vec_isa.json``,
see :mod:`pyro_elbo_ext.compiled.vec_isa`) unless ``--no-isa-record`` is given; the record is
written by the first compile on the machine.

The model is the Pyro tutorial's VAE (softplus hidden layer, Bernoulli pixels, amortized
Normal guide) on scikit-learn's 1,797 bundled 8x8 digits, binarized, minibatches of 100:

* ``vae``: 6,000 steps on full minibatches (each epoch's short last batch dropped), eager
  ``SVI`` + ``Trace_ELBO`` against ``CompiledSVI`` + ``Trace_ELBO`` (traced as
  ``JensenELBO(entropy="sampled")``, the same estimator) as a user gets it (``compile_after``
  left at its default: 1,000 eager steps, then the compile) and compiling at once
  (``compile_after=0``): total seconds, seconds per step after the first 100 (the default's
  rows: after the compile), compile seconds;
* ``loader``: 30 epochs (540 steps) of a DataLoader-style loop whose last batch has 97 images
  (a second argument structure): eager against CompiledSVI with the default (the run is
  shorter than ``compile_after``: nothing compiles) and with ``compile_after=0`` (both batch
  sizes compile at their first step), empty Inductor cache; and ``--long-epochs`` (300: 5,400
  steps) eager against the default, which compiles the full batches after 1,000 of them;
* ``sizes``: seconds per step, eager and compiled (``compile_after=0``), by hidden-layer
  width, and the break-even number of steps (compile seconds / per-step saving);
* ``first-compile``: the first ``CompiledSVI.step`` (``compile_after=0``) of a small model
  (Normal-Normal, N=1000) in a fresh process with an empty Inductor cache, with and without
  the ISA record.

Usage::

    python -m benchmarks.end_to_end [--only vae|loader|sizes|first-compile] [--repeats 3]
        [--no-isa-record] [--out benchmarks/results]

Timings on a shared machine are noisy: the script reports the median of ``--repeats``
fresh processes per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BATCH = 100
LATENT = 10


# ============================================================================ the worker
def _vae(hidden: int):
    """The tutorial VAE's model and guide, and the binarized digits."""
    import pyro
    import pyro.distributions as dist
    import torch
    from torch import nn

    from pyro_elbo_ext.problems.vae import load_binarized_digits

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc21, self.fc22 = (nn.Linear(64, hidden), nn.Linear(hidden, LATENT),
                                              nn.Linear(hidden, LATENT))

        def forward(self, x):
            h = nn.functional.softplus(self.fc1(x))
            return self.fc21(h), torch.exp(self.fc22(h))

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(LATENT, hidden), nn.Linear(hidden, 64)

        def forward(self, z):
            return self.fc2(nn.functional.softplus(self.fc1(z)))

    torch.manual_seed(0)
    encoder, decoder = Encoder(), Decoder()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(LATENT), 1.0).to_event(1))
            pyro.sample("obs", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x)

    def guide(x):
        pyro.module("encoder", encoder)
        loc, scale = encoder(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    data = load_binarized_digits(None).float()
    return model, guide, data


def _batches(data, drop_last: bool):
    import torch

    order = torch.randperm(data.shape[0])
    stop = data.shape[0] - data.shape[0] % BATCH if drop_last else data.shape[0]
    return [data[order[i: i + BATCH]] for i in range(0, stop, BATCH)]


def _cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the compiler's processes): on a
    busy machine a better guide to a quiet machine's wall time than the wall time itself."""
    import resource

    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def worker(config: dict) -> dict:
    """One measurement (see the module docstring); returns its numbers."""
    start = time.perf_counter()
    import pyro
    import torch

    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    from pyro.infer import SVI, Trace_ELBO

    from pyro_elbo_ext import CompiledSVI

    kind, compiled = config["kind"], config["compiled"]
    result = {"config": config}
    if kind == "first-compile":
        from pyro_elbo_ext.problems.conjugate import normal_normal

        problem = normal_normal(num_data=1000)
        problem.set_params()
        svi = CompiledSVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 1e-3}),
                          Trace_ELBO(), compile_after=0)
        t, cpu = time.perf_counter(), _cpu_seconds()
        svi.step(*problem.args)
        result["first_step_s"] = time.perf_counter() - t
        result["first_step_cpu_s"] = _cpu_seconds() - cpu
        result["process_s"] = time.perf_counter() - start
        result["process_cpu_s"] = _cpu_seconds()
        return result
    model, guide, data = _vae(config.get("hidden", 200))
    if compiled:
        svi = CompiledSVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO(),
                          compile_after=config.get("compile_after"))
    else:
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), Trace_ELBO())
    steps, times = 0, []
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    if kind in ("vae", "sizes"):
        target = config["steps"]
        while steps < target:
            for batch in _batches(data, drop_last=True):
                t = time.process_time()
                svi.step(batch)
                times.append(time.process_time() - t)
                steps += 1
                if steps == target:
                    break
    elif kind == "loader":
        for _ in range(config["epochs"]):
            for batch in _batches(data, drop_last=False):
                t = time.process_time()
                svi.step(batch)
                times.append(time.process_time() - t)
                steps += 1
    result["train_s"] = time.perf_counter() - t0
    result["process_s"] = time.perf_counter() - start
    result["process_cpu_s"] = _cpu_seconds()
    result["steps"] = steps
    if compiled and getattr(svi, "_steps", None) and svi.compile_after:  # after the compile
        times_after = times[svi.compile_after + 100:]
        steady = times_after if len(times_after) > 100 else times[len(times) // 2:]
    else:
        steady = times[100:] if len(times) > 200 else times[len(times) // 2:]
    result["per_step_ms"] = 1e3 * statistics.median(steady)  # process CPU time
    result["first_step_cpu_s"] = times[0]
    result["train_cpu_s"] = _cpu_seconds() - cpu0  # with the compiler's processes
    if compiled and hasattr(svi, "compile_seconds"):
        result["compile_s"] = sum(svi.compile_seconds)  # wall
        # CPU of the builds: the training's CPU less that of every step but those that built
        # (the longest ones: seconds against milliseconds)
        builds = len(svi.compile_seconds)
        steps_cpu = sorted(times)[:len(times) - builds] if builds else times
        result["compile_cpu_s"] = result["train_cpu_s"] - sum(steps_cpu)
        result["compiled_structures"] = len(svi._steps)
        result["eager_structures"] = len(svi._eager_structures)
    result["final_loss"] = svi.evaluate_loss(data) / data.shape[0]
    return result


# ============================================================================ the driver
def measure(config: dict, isa_record: bool) -> dict:
    """Run :func:`worker` in a fresh process with an empty Inductor cache."""
    with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache,
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        if not isa_record:
            env["PYRO_ELBO_EXT_VEC_ISA_CACHE"] = "0"
        command = [sys.executable, "-m", "benchmarks.end_to_end", "worker", json.dumps(config)]
        t = time.perf_counter()
        out = subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True,
                             text=True)
        wall = time.perf_counter() - t
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def _row(label: str, eager: list[dict], compiled: list[dict]) -> str:
    def both(results, wall, cpu):
        return f"{_median(results, wall):.1f} s ({_median(results, cpu):.1f} s)"

    return (f"| {label} | {both(eager, 'wall_s', 'process_cpu_s')} | "
            f"{both(compiled, 'wall_s', 'process_cpu_s')} | {_median(eager, 'per_step_ms'):.2f} "
            f"/ {_median(compiled, 'per_step_ms'):.2f} | "
            f"{both(compiled, 'compile_s', 'compile_cpu_s')} |")


def _median(results: list[dict], key: str) -> float | None:
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("vae", "loader", "sizes", "first-compile"),
                        action="append")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--long-epochs", type=int, default=300,
                        help="a second, longer DataLoader run (0: none)")
    parser.add_argument("--no-isa-record", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args(argv)
    parts = args.only or ["first-compile", "vae", "loader", "sizes"]
    isa = not args.no_isa_record
    rows, raw = [], {}

    def run(name, config, record=isa):
        results = [measure(config, record) for _ in range(args.repeats)]
        raw[name] = results
        print(name, json.dumps({k: _median(results, k) for k in (
            "wall_s", "train_s", "train_cpu_s", "per_step_ms", "compile_s", "compile_cpu_s",
            "first_step_s")}), flush=True)
        return results

    if "first-compile" in parts:
        for record in (True, False):
            name = f"first compile, ISA record {'used' if record else 'off'}"
            results = run(name, {"kind": "first-compile", "compiled": True}, record)
            rows.append(f"| {name} | {_median(results, 'first_step_s'):.1f} s "
                        f"({_median(results, 'first_step_cpu_s'):.1f} s) | "
                        f"{_median(results, 'process_s'):.1f} s "
                        f"({_median(results, 'process_cpu_s'):.1f} s) |")
        rows = ["| first CompiledSVI.step, fresh process, empty Inductor cache | step: wall (CPU) "
                "| process: wall (CPU) |", "|---|---|---|", *rows, ""]
    table = []
    if "vae" in parts:
        eager = run("vae eager", {"kind": "vae", "compiled": False, "steps": args.steps})
        for after, label in ((None, "default compile_after"), (0, "compile_after=0")):
            comp = run(f"vae compiled, {label}", {"kind": "vae", "compiled": True,
                                                  "steps": args.steps, "compile_after": after})
            table.append(_row(f"VAE, {args.steps} steps (batch {BATCH}), {label}", eager,
                              comp))
    if "loader" in parts:
        eager = run("loader eager", {"kind": "loader", "compiled": False,
                                     "epochs": args.epochs})
        for after, label in ((None, "default compile_after"), (0, "compile_after=0")):
            comp = run(f"loader compiled, {label}", {"kind": "loader", "compiled": True,
                                                     "epochs": args.epochs,
                                                     "compile_after": after})
            table.append(_row(f"DataLoader loop, {args.epochs} epochs, last batch 97, "
                              f"{label}", eager, comp))
        if args.long_epochs:  # long enough for the default to compile the full batches
            eager = run("long loader eager", {"kind": "loader", "compiled": False,
                                              "epochs": args.long_epochs})
            comp = run("long loader compiled, default compile_after",
                       {"kind": "loader", "compiled": True, "epochs": args.long_epochs})
            table.append(_row(f"DataLoader loop, {args.long_epochs} epochs, last batch 97, "
                              "default compile_after", eager, comp))
    if table:
        rows += ["| case | eager SVI: process wall (CPU) | CompiledSVI: process wall (CPU) | "
                 "CPU ms per step, eager / compiled | compile wall (CPU) |",
                 "|---|---|---|---|---|", *table, ""]
    if "sizes" in parts:
        rows += ["| hidden width | eager ms/step | compiled ms/step | ratio | compile s | "
                 "break-even steps |", "|---|---|---|---|---|---|"]
        for hidden in (50, 200, 800):
            eager = run(f"size {hidden} eager", {"kind": "sizes", "compiled": False,
                                                  "steps": 600, "hidden": hidden})
            comp = run(f"size {hidden} compiled", {"kind": "sizes", "compiled": True,
                                                    "steps": 600, "hidden": hidden,
                                                    "compile_after": 0})
            te, tc = _median(eager, "per_step_ms"), _median(comp, "per_step_ms")
            compile_s = _median(comp, "compile_cpu_s") or _median(comp, "compile_s")
            saving = (te - tc) / 1e3
            even = f"{compile_s / saving:,.0f}" if saving > 0 else "never"
            rows.append(f"| {hidden} | {te:.2f} | {tc:.2f} | {tc / te:.2f} | {compile_s:.1f} | "
                        f"{even} |")
        rows.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    machine = platform.processor() or platform.machine()
    header = ("# What a user pays end to end\n\n"
              f"Measured {time.strftime('%Y-%m-%d')} on {machine}, load average at start "
              f"{os.getloadavg()[0]:.1f}; medians of {args.repeats} "
              f"fresh processes; ISA record {'used' if isa else 'off'}. Command: "
              f"`python -m benchmarks.end_to_end {' '.join(argv or sys.argv[1:])}`\n\n")
    (args.out / "end_to_end.md").write_text(header + "\n".join(rows) + "\n")
    (args.out / "end_to_end.json").write_text(json.dumps(raw, indent=1))
    print(header + "\n".join(rows))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        main()
