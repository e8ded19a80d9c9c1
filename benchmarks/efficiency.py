"""Gradient variance and work-normalized efficiency of each loss against its Pyro counterpart.

For each problem and guide setting, every estimator draws ``--draws`` gradients of its
surrogate loss with respect to the unconstrained parameters (``differentiable_loss`` and
``torch.autograd.grad``, one or ``--particles`` particles each), in interleaved blocks so that
the time per draw is measured under the same load for all of them. Reported per estimator:

- ``tr Var[grad]``, the trace of the gradient covariance, with its standard error;
- ``ms``, the median time of one gradient draw (loss + backward), in process CPU time
  (``time.process_time``, immune to preemption by other load on a shared machine);
- ``efficiency = 1 / (tr Var[grad] x seconds)`` and its ratio to the Pyro counterpart's
  (``rel. eff.`` > 1: our loss reaches a given gradient precision with less compute).

Problems and pairs: Normal-Normal (N = 1000, misfit guide; JensenELBO vs Trace_ELBO,
AnalyticKLELBO vs TraceMeanField_ELBO and Trace_ELBO), JensenELBO(entropy="path") at the exact
posterior and within one posterior sd of it; logistic regression (2000 x 20); the digits VAE;
and, where the hard-attention module exists, HardAttentionELBO(reinforce) with each baseline
against no baseline on the cluttered-digits problem (score-function gradient of the attention
network, 8 vectorized particles, baseline state warmed up by ``--baseline-warmup`` steps that
train only the baseline).

Run: ``python -m benchmarks.efficiency`` (a few minutes); writes
``benchmarks/results/efficiency.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from ._common import PROBLEMS, Unavailable, machine_info, median, require

RESULTS = Path(__file__).resolve().parent / "results"


def _leaves(problem, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    store = pyro.get_param_store()
    names = list(problem.init_params) if names is None else names
    return [store[name].unconstrained() for name in names]


def compare(problem, estimators: dict[str, Callable[[], object]], num_draws: int,
            block: int = 25, leaf_names: Sequence[str] | None = None, seed: int = 0,
            ) -> dict[str, dict]:
    """Gradient draws of each estimator at the current parameters, in interleaved blocks.

    Parameters
    ----------
    problem : Problem
        Provides model, guide and args; the parameters are the param store's.
    estimators : dict of str to callable
        ``name -> make()`` returning a Pyro ELBO-like object with ``differentiable_loss``.
    num_draws : int
        Gradient draws per estimator.
    block : int
        Draws per estimator per interleaved block.
    leaf_names : sequence of str, optional
        Parameter names to differentiate (default: all of ``problem.init_params``).

    Returns
    -------
    dict
        Per estimator: ``var`` (trace of the covariance), ``var_se``, ``ms`` (median per draw),
        ``efficiency`` (1 / (var x seconds)).
    """
    pyro.set_rng_seed(seed)
    elbos = {name: make() for name, make in estimators.items()}
    leaves = _leaves(problem, leaf_names)
    draws: dict[str, list[torch.Tensor]] = {name: [] for name in elbos}
    times: dict[str, list[float]] = {name: [] for name in elbos}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for elbo in elbos.values():  # warm-up (plans, caches)
            loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
            torch.autograd.grad(loss, leaves, allow_unused=True)
        while min(len(d) for d in draws.values()) < num_draws:
            for name, elbo in elbos.items():
                start = time.process_time()
                for _ in range(block):
                    loss = elbo.differentiable_loss(problem.model, problem.guide, *problem.args)
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                    draws[name].append(torch.cat([
                        (torch.zeros_like(leaf) if g is None else g).reshape(-1)
                        for leaf, g in zip(leaves, grads)]).detach().double())
                times[name].append((time.process_time() - start) / block)
    out = {}
    for name in elbos:
        g = torch.stack(draws[name][:num_draws])
        sq = ((g - g.mean(0)) ** 2).sum(-1)
        n = g.shape[0]
        var = float(sq.mean() * n / (n - 1))
        seconds = median(times[name])
        out[name] = {
            "var": var,
            "var_se": float(sq.std() / math.sqrt(n)),
            "ms": seconds * 1e3,
            "efficiency": 1.0 / (var * seconds) if var > 0 else math.inf,
            "draws": n,
        }
    return out


def _relative(rows: dict[str, dict], reference: str) -> None:
    ref = rows[reference]
    for row in rows.values():
        rel_var = math.hypot(row["var_se"] / row["var"] if row["var"] else 0.0,
                             ref["var_se"] / ref["var"] if ref["var"] else 0.0)
        row["reference"] = reference
        row["var_ratio"] = row["var"] / ref["var"] if ref["var"] else math.nan
        row["var_ratio_se"] = row["var_ratio"] * rel_var
        row["rel_efficiency"] = (ref["var"] * ref["ms"]) / (row["var"] * row["ms"]) if row[
            "var"] > 0 else math.inf
        row["rel_efficiency_se"] = row["rel_efficiency"] * rel_var if math.isfinite(
            row["rel_efficiency"]) else math.nan


def _elbo(cls, problem, particles: int = 1, **options):
    return lambda: cls(num_particles=particles, vectorize_particles=particles > 1,
                       max_plate_nesting=problem.max_plate_nesting, **options)


def _ours(module: str, name: str):
    return getattr(require(module), name)


def smooth_sections(draws: int, vae_draws: int) -> list[dict]:
    """Normal-Normal, logistic regression and the VAE, each loss against its counterpart."""
    sections = []
    jensen = _ours("pyro_elbo_ext.elbos.jensen", "JensenELBO")
    try:
        akl = _ours("pyro_elbo_ext.elbos.analytic_kl", "AnalyticKLELBO")
    except Unavailable as exc:
        akl, akl_status = None, str(exc)

    def estimators(problem):
        ests = {
            "Trace_ELBO": _elbo(Trace_ELBO, problem),
            "JensenELBO(analytic)": _elbo(jensen, problem),
            "JensenELBO(path)": _elbo(jensen, problem, entropy="path"),
            "TraceMeanField_ELBO": _elbo(TraceMeanField_ELBO, problem),
        }
        if akl is not None:
            ests["AnalyticKLELBO"] = _elbo(akl, problem)
        return ests

    problem = PROBLEMS["normal_normal"].build(num_data=1000)
    post = problem.posterior_params
    sd = post["scale"]
    points = {
        "misfit guide (init)": None,
        "exact posterior": dict(post),
        "loc - 0.5 sd": {"loc": post["loc"] - 0.5 * sd, "scale": sd},
        "loc + 1 sd": {"loc": post["loc"] + sd, "scale": sd},
        "loc + 1 sd, scale x 1.5": {"loc": post["loc"] + sd, "scale": 1.5 * sd},
    }
    for point, values in points.items():
        problem.set_params(values)
        ests = estimators(problem) if values is None else {
            "Trace_ELBO": _elbo(Trace_ELBO, problem),
            "JensenELBO(analytic)": _elbo(jensen, problem),
            "JensenELBO(path)": _elbo(jensen, problem, entropy="path"),
        }
        rows = compare(problem, ests, draws)
        _relative(rows, "Trace_ELBO")
        sections.append({"problem": "normal_normal (N=1000)", "point": point, "rows": rows})
        print(f"normal_normal {point}: done", flush=True)
    for key, n_draws, label in (("logistic", draws, "logistic regression (2000x20)"),
                                ("vae", vae_draws, "VAE digits (100 images)")):
        try:
            problem = PROBLEMS[key].build()
        except Unavailable as exc:
            sections.append({"problem": label, "point": "init", "status": str(exc), "rows": {}})
            continue
        problem.set_params()
        rows = compare(problem, estimators(problem), n_draws)
        _relative(rows, "Trace_ELBO")
        if "AnalyticKLELBO" in rows:
            tmf = rows["TraceMeanField_ELBO"]
            rows["AnalyticKLELBO"]["vs_TraceMeanField_rel_efficiency"] = (
                tmf["var"] * tmf["ms"]) / (rows["AnalyticKLELBO"]["var"]
                                           * rows["AnalyticKLELBO"]["ms"])
        sections.append({"problem": label, "point": "init", "rows": rows})
        print(f"{label}: done", flush=True)
    if akl is None:
        sections.append({"problem": "AnalyticKLELBO", "point": "", "status": akl_status,
                         "rows": {}})
    return sections


def attention_section(draws: int, warmup: int, particles: int = 8) -> dict:
    """HardAttentionELBO(reinforce): each baseline against none (score-function gradient)."""
    label = f"hard attention, cluttered digits (batch 64, {particles} particles)"
    try:
        mod = require("pyro_elbo_ext.elbos.hard_attention")
        problem = PROBLEMS["hard_attention"].build()
    except Unavailable as exc:
        return {"problem": label, "point": "", "status": str(exc), "rows": {}}
    attention = problem.notes["networks"]["attention"]
    rows = {}
    for baseline in (None, "moving_average", "learned", "leave_one_out"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo = mod.HardAttentionELBO(estimator="reinforce", baseline=baseline,
                                     num_particles=particles, vectorize_particles=True,
                                     max_plate_nesting=problem.max_plate_nesting)

        def lr(module_name, param_name=None):
            name = module_name if param_name is None else f"{module_name}$$${param_name}"
            frozen = name.startswith(("attention", "classifier"))
            return {"lr": 0.0 if frozen else 1e-2}

        svi = pyro.infer.SVI(problem.model, problem.guide, pyro.optim.Adam(lr), loss=elbo)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(warmup if baseline is not None else 1):
                svi.step(*problem.args)  # trains only the baseline (the model's lr is 0)
        names = [f"attention$$${n}" for n, _ in attention.named_parameters()]
        name = f"baseline={baseline}"
        rows.update(compare(problem, {name: lambda elbo=elbo: elbo}, draws, leaf_names=names))
        print(f"hard attention {name}: done", flush=True)
    _relative(rows, "baseline=None")
    return {"problem": label, "point": f"init, baselines warmed up {warmup} steps",
            "rows": rows}


def markdown(result: dict) -> str:
    """The tables of the efficiency report."""
    info = result["machine"]
    lines = [
        "# Gradient variance and efficiency (1 / (variance x time))", "",
        f"- date: {info['date']}; {info.get('cpu_model', info['processor'])}, "
        f"{info.get('cpu_count')} CPUs; torch {info['torch']}, pyro {info['pyro']}; "
        f"torch.set_num_threads({info['torch_num_threads']}); load average "
        f"{info.get('load_average')}",
        f"- {result['settings']['draws']} gradient draws per cell "
        f"({result['settings']['vae_draws']} for the VAE, {result['settings']['attention_draws']}"
        " for hard attention), one particle unless stated; time = median per draw "
        "(loss + backward, process CPU time) in interleaved blocks; variance = trace of the "
        "gradient covariance over the unconstrained parameters; ± one standard error",
        f"- wall time {result['wall_s']:.0f} s", "",
        "| problem | guide | estimator | tr Var[grad] | ms/draw | var ratio vs ref | "
        "rel. efficiency vs ref | ref |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for sec in result["sections"]:
        if sec.get("status"):
            lines.append(f"| {sec['problem']} | {sec['point']} | {sec['status']} | | | | | |")
            continue
        for name, r in sec["rows"].items():
            eff = r["rel_efficiency"]
            eff_text = "inf (zero variance)" if not math.isfinite(eff) else (
                f"{eff:.3g} ± {r['rel_efficiency_se']:.2g}")
            lines.append(
                f"| {sec['problem']} | {sec['point']} | {name} | {r['var']:.4g} ± "
                f"{r['var_se']:.2g} | {r['ms']:.3g} | {r['var_ratio']:.3g} ± "
                f"{r['var_ratio_se']:.2g} | {eff_text} | {r['reference']} |")
    extra = [(sec["problem"], r["vs_TraceMeanField_rel_efficiency"])
             for sec in result["sections"] for name, r in sec["rows"].items()
             if "vs_TraceMeanField_rel_efficiency" in r]
    if extra:
        lines += ["", "AnalyticKLELBO's efficiency relative to TraceMeanField_ELBO: "
                  + "; ".join(f"{p}: {v:.3g}" for p, v in extra)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the efficiency benchmark and write ``efficiency.{json,md}``; returns the result.

    Parameters
    ----------
    argv : sequence of str, optional
        Command-line arguments (``sys.argv[1:]`` when None); see ``--help``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--vae-draws", type=int, default=300)
    parser.add_argument("--attention-draws", type=int, default=200)
    parser.add_argument("--baseline-warmup", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="few draws, a smoke run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.draws, args.vae_draws, args.attention_draws, args.baseline_warmup = 50, 20, 10, 5
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        info = machine_info(probe_numpyro=False)
        sections = smooth_sections(args.draws, args.vae_draws)
        sections.append(attention_section(args.attention_draws, args.baseline_warmup))
        result = {"machine": info, "settings": {k: str(v) if isinstance(v, Path) else v
                                                for k, v in vars(args).items()},
                  "sections": sections, "wall_s": time.perf_counter() - start}
    finally:
        torch.set_num_threads(previous)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "efficiency.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "efficiency.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
