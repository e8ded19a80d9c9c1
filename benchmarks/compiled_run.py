"""The compiled step's speed: the fused run against NumPyro's SVI.run; TraceEnum_ELBO compiled.

Two parts, each measured in one process with every contestant's samples interleaved (rounds),
one thread each (``torch.set_num_threads(1)``; XLA's CPU client limited to one thread with
``XLA_FLAGS``), compile time reported separately from the time per step:

* ``run``: Normal-Normal (N = 1000) and logistic regression (2000 x 20), one particle, Adam
  (lr 1e-3), Pyro's ``Trace_ELBO`` (CompiledSVI traces it as ``JensenELBO(entropy="sampled")``,
  the same estimator) against NumPyro's ``Trace_ELBO``:

  - ``CompiledSVI.run``: one call of ``run(RUN_STEPS + 1)`` per sample (its first step is a
    ``step`` call, the rest run in the compiled loop), per step;
  - NumPyro ``SVI.run``: ``lax.scan`` over the jitted update, 200 steps per call
    (:func:`benchmarks._compiled.numpyro_run_step`), per step;
  - ``CompiledSVI.step`` in a Python loop, and Pyro's eager ``SVI.step``, per step.

* ``enum``: ``TraceEnum_ELBO`` on a 3-component Gaussian mixture (N = 500, assignments
  enumerated in the model, MAP of the global sites with ``AutoDelta``) and on a 3-state
  Gaussian HMM (T = 20, states enumerated along ``pyro.markov``): Pyro's eager
  ``SVI.step``, ``CompiledSVI.step`` (Pyro's own enumeration, traced), NumPyro's jitted
  ``svi.update`` with its ``TraceEnum_ELBO`` (needs ``funsor``).

Usage::

    python -m benchmarks.compiled_run [--only run|enum] [--rounds 9] [--out DIR]

Writes ``compiled_run.md`` and ``compiled_run.json`` to ``--out`` (default
``benchmarks/results``).  NumPyro (and funsor for the enumeration column) are the
``bench`` extra; a contestant whose package is missing is reported as not available.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUN_STEPS = 2048


class Contestant:
    """A name, a ``sample() -> steps`` callable timed per call, and its first-call time."""

    def __init__(self, name: str, make):
        self.name, self.make = name, make
        self.sample = None
        self.first_call_s = None
        self.process, self.wall = [], []
        self.error = None

    def prepare(self) -> None:
        try:
            self.sample = self.make()
            start = time.perf_counter()
            self.sample()
            self.first_call_s = time.perf_counter() - start
            self.sample()  # warm
        except Exception as error:  # a missing package or an unsupported model: reported
            self.error = f"{type(error).__name__}: {error}"[:200]
            self.sample = None

    def measure(self) -> None:
        if self.sample is None:
            return
        cpu, wall = time.process_time(), time.perf_counter()
        steps = self.sample()
        self.process.append((time.process_time() - cpu) / steps)
        self.wall.append((time.perf_counter() - wall) / steps)

    def summary(self) -> dict:
        if self.sample is None:
            return {"error": self.error}

        def stats(values):
            q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
            return {"median_us": 1e6 * statistics.median(values),
                    "q1_us": 1e6 * q[0], "q3_us": 1e6 * q[-1]}

        return {"process": stats(self.process), "wall": stats(self.wall),
                "first_call_s": self.first_call_s}


# ============================================================================ run
def _compiled_svi(problem, elbo):
    from pyro_elbo_ext import CompiledSVI

    pyro.clear_param_store()
    problem.set_params()
    return CompiledSVI(problem.model, problem.guide, pyro.optim.Adam({"lr": 1e-3}), elbo,
                       compile_after=0)


def _compiled_at_once(*args, **kwargs):
    """``CompiledSVI`` compiling at its first step: the compiled step's speed is measured."""
    from pyro_elbo_ext import CompiledSVI

    return CompiledSVI(*args, compile_after=0, **kwargs)


def run_contestants(name: str) -> list[Contestant]:
    from pyro.infer import SVI, Trace_ELBO

    from ._common import PROBLEMS

    spec = PROBLEMS[name]
    problem = spec.build(**spec.options)
    def compiled_run():
        svi = _compiled_svi(problem, Trace_ELBO())

        def sample():
            svi.run(RUN_STEPS + 1, *problem.args)
            return RUN_STEPS + 1

        return sample

    def step_loop(svi_class, steps):
        def make():
            pyro.clear_param_store()
            problem.set_params()
            svi = svi_class(problem.model, problem.guide, pyro.optim.Adam({"lr": 1e-3}),
                            Trace_ELBO())
            return _loop(svi, steps, problem.args)
        return make

    def numpyro_run():
        step = spec.numpyro(problem, 1, run=True)

        def sample():
            step()
            return step.steps_per_call

        return sample

    return [Contestant(f"{name}: CompiledSVI.run", _isolated(compiled_run)),
            Contestant(f"{name}: NumPyro SVI.run", numpyro_run),
            Contestant(f"{name}: CompiledSVI.step loop",
                       _isolated(step_loop(_compiled_at_once, 200))),
            Contestant(f"{name}: Pyro SVI.step (eager)", _isolated(step_loop(SVI, 20)))]


def _loop(svi, steps: int, args: tuple):
    """A sample: ``steps`` calls of ``svi.step(*args)``."""
    def sample():
        for _ in range(steps):
            svi.step(*args)
        return steps

    return sample


def _isolated(make):
    """``make`` with its own param store: each call swaps its store in and out (the compiled
    step reads the store's tensors by identity, so the tensors themselves are swapped)."""
    def build():
        saved = pyro.get_param_store()._params, pyro.get_param_store()._param_to_name, \
            pyro.get_param_store()._constraints
        pyro.get_param_store()._params, pyro.get_param_store()._param_to_name = {}, {}
        pyro.get_param_store()._constraints = {}
        sample = make()
        own = (pyro.get_param_store()._params, pyro.get_param_store()._param_to_name,
               pyro.get_param_store()._constraints)
        _set_store(saved)

        def swapped():
            previous = _get_store()
            _set_store(own)
            try:
                return sample()
            finally:
                _set_store(previous)

        return swapped
    return build


def _get_store():
    store = pyro.get_param_store()
    return store._params, store._param_to_name, store._constraints


def _set_store(parts) -> None:
    store = pyro.get_param_store()
    store._params, store._param_to_name, store._constraints = parts


# ============================================================================ enum
K, N, T, S = 3, 500, 20, 3


def _mixture_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([-4.0, 0.0, 4.0])
    labels = torch.randint(0, K, (N,), generator=generator)
    return centers[labels] + torch.randn(N, generator=generator)


def _hmm_data() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    states, ys = 0, []
    for _ in range(T):
        states = (states + int(torch.rand((), generator=generator) < 0.2)) % S
        ys.append(2.0 * states + 0.5 * torch.randn((), generator=generator))
    return torch.stack(ys)


def pyro_mixture():
    from pyro.infer import config_enumerate
    from pyro.infer.autoguide import AutoDelta

    @config_enumerate
    def model(data):
        weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
        with pyro.plate("components", K):
            locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
        with pyro.plate("data", data.shape[0]):
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)

    guide = AutoDelta(pyro.poutine.block(model, expose=["weights", "scale", "locs"]),
                      init_loc_fn=_mixture_init)
    return model, guide, _mixture_data()


def _mixture_init(site):
    if site["name"] == "locs":
        return torch.tensor([-1.0, 0.0, 1.0])
    if site["name"] == "weights":
        return torch.ones(K) / K
    return torch.tensor(1.0)


def pyro_hmm():
    from pyro.infer.autoguide import AutoDelta

    def model(data):
        transition = pyro.sample("transition", dist.Dirichlet(torch.ones(S, S)).to_event(1))
        locs = pyro.sample("locs", dist.Normal(torch.zeros(S), 10.0).to_event(1))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        state = 0
        for t in pyro.markov(range(data.shape[0])):
            state = pyro.sample(f"state_{t}", dist.Categorical(transition[state]),
                                infer={"enumerate": "parallel"})
            pyro.sample(f"y_{t}", dist.Normal(locs[state], scale), obs=data[t])

    guide = AutoDelta(pyro.poutine.block(model, expose=["transition", "locs", "scale"]),
                      init_loc_fn=_hmm_init)
    return model, guide, _hmm_data()


def _hmm_init(site):
    if site["name"] == "locs":
        return torch.tensor([0.0, 1.0, 3.0])
    if site["name"] == "transition":
        return torch.full((S, S), 1.0 / S)
    return torch.tensor(1.0)


def numpyro_enum(which: str):
    import jax
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.contrib.funsor import markov
    from numpyro.infer import SVI, TraceEnum_ELBO

    if which == "mixture":
        data = jnp.asarray(_mixture_data().numpy())

        def model(data):
            weights = numpyro.sample("weights", ndist.Dirichlet(0.5 * jnp.ones(K)))
            scale = numpyro.sample("scale", ndist.LogNormal(0.0, 2.0))
            with numpyro.plate("components", K):
                locs = numpyro.sample("locs", ndist.Normal(0.0, 10.0))
            with numpyro.plate("data", data.shape[0]):
                assignment = numpyro.sample("assignment", ndist.Categorical(weights),
                                            infer={"enumerate": "parallel"})
                numpyro.sample("obs", ndist.Normal(locs[assignment], scale), obs=data)

        def guide(data):  # AutoDelta's guide, written out (the MAP of the global sites)
            weights = numpyro.param("weights_loc", jnp.ones(K) / K,
                                    constraint=ndist.constraints.simplex)
            numpyro.sample("weights", ndist.Delta(weights, event_dim=1))
            scale = numpyro.param("scale_loc", 1.0, constraint=ndist.constraints.positive)
            numpyro.sample("scale", ndist.Delta(scale))
            locs = numpyro.param("locs_loc", jnp.array([-1.0, 0.0, 1.0]))
            with numpyro.plate("components", K):
                numpyro.sample("locs", ndist.Delta(locs))
    else:
        data = jnp.asarray(_hmm_data().numpy())

        def model(data):
            transition = numpyro.sample("transition",
                                        ndist.Dirichlet(jnp.ones((S, S))).to_event(1))
            locs = numpyro.sample("locs", ndist.Normal(jnp.zeros(S), 10.0).to_event(1))
            scale = numpyro.sample("scale", ndist.LogNormal(0.0, 1.0))
            state = 0
            for t in markov(range(data.shape[0])):
                state = numpyro.sample(f"state_{t}", ndist.Categorical(transition[state]),
                                       infer={"enumerate": "parallel"})
                numpyro.sample(f"y_{t}", ndist.Normal(locs[state], scale), obs=data[t])

        def guide(data):
            transition = numpyro.param("transition_loc", jnp.full((S, S), 1.0 / S),
                                       constraint=ndist.constraints.simplex)
            numpyro.sample("transition", ndist.Delta(transition, event_dim=2))
            locs = numpyro.param("locs_loc", jnp.array([0.0, 1.0, 3.0]))
            numpyro.sample("locs", ndist.Delta(locs, event_dim=1))
            scale = numpyro.param("scale_loc", 1.0, constraint=ndist.constraints.positive)
            numpyro.sample("scale", ndist.Delta(scale))

    svi = SVI(model, guide, numpyro.optim.Adam(1e-3), TraceEnum_ELBO(max_plate_nesting=1))
    state = svi.init(jax.random.PRNGKey(0), data)
    update = jax.jit(svi.update)
    holder = [state]

    def sample():
        for _ in range(20):
            holder[0], loss = update(holder[0], data)
        float(loss)
        return 20

    return sample


def enum_contestants(which: str) -> list[Contestant]:
    from pyro.infer import SVI, TraceEnum_ELBO


    make_problem = pyro_mixture if which == "mixture" else pyro_hmm

    def pyro_loop(svi_class, steps):
        def make():
            pyro.clear_param_store()
            model, guide, data = make_problem()
            svi = svi_class(model, guide, pyro.optim.Adam({"lr": 1e-3}),
                            TraceEnum_ELBO(max_plate_nesting=1))
            return _loop(svi, steps, (data,))
        return make

    return [Contestant(f"{which}: Pyro TraceEnum_ELBO (eager)", _isolated(pyro_loop(SVI, 5))),
            Contestant(f"{which}: CompiledSVI + TraceEnum_ELBO",
                       _isolated(pyro_loop(_compiled_at_once, 50))),
            Contestant(f"{which}: NumPyro TraceEnum_ELBO (jit)", lambda: numpyro_enum(which))]


# ============================================================================ driver
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("run", "enum"), action="append")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    parts = args.only or ["run", "enum"]
    groups = []
    if "run" in parts:
        groups += [run_contestants("normal_normal"), run_contestants("logistic")]
    if "enum" in parts:
        groups += [enum_contestants("mixture"), enum_contestants("hmm")]
    load = os.getloadavg()[0]
    for group in groups:
        for contestant in group:
            contestant.prepare()
            print(f"{contestant.name}: first call {contestant.first_call_s} "
                  f"{contestant.error or ''}", flush=True)
    for _ in range(args.rounds):
        for group in groups:
            for contestant in group:
                contestant.measure()
    results = {c.name: c.summary() for group in groups for c in group}
    lines = ["# The fused run and TraceEnum_ELBO compiled", "",
             f"Measured {time.strftime('%Y-%m-%d')} on {platform.processor() or 'CPU'}, torch "
             f"{torch.__version__}, pyro {pyro.__version__}, one thread; load average at start "
             f"{load:.1f}; {args.rounds} interleaved rounds; medians [quartiles] of process time "
             "per step. Command: `python -m benchmarks.compiled_run "
             f"{' '.join(sys.argv[1:] if argv is None else argv)}`", "",
             "| contestant | us per step (process) | wall | first call s |", "|---|---|---|---|"]
    for name, summary in results.items():
        if "error" in summary:
            lines.append(f"| {name} | not available: {summary['error']} | | |")
            continue
        p, w = summary["process"], summary["wall"]
        lines.append(f"| {name} | {p['median_us']:.1f} [{p['q1_us']:.1f}, {p['q3_us']:.1f}] | "
                     f"{w['median_us']:.1f} | {summary['first_call_s']:.1f} |")
    for group in groups:
        names = [c.name for c in group]
        if "run" in parts and names[0].endswith("CompiledSVI.run"):
            ours, theirs = results[names[0]], results[names[1]]
            if "error" not in ours and "error" not in theirs:
                ratio = ours["process"]["median_us"] / theirs["process"]["median_us"]
                lines.append(f"| {names[0]} / NumPyro SVI.run | {ratio:.2f} | | |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compiled_run.md").write_text("\n".join(lines) + "\n")
    (args.out / "compiled_run.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
