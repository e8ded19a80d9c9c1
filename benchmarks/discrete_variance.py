"""Gradient variance of discrete (score-function) sites against Pyro's TraceGraph_ELBO.

Structures (``pyro_elbo_ext.problems.discrete``):

- ``binary_chain``: a 6-site Markov chain of binary latents, each with its own Normal
  observation; a mean-field guide samples the sites one after another;
- ``independent_bits``: 6 independent binary sites (model and guide) sampled in sequence:
  the case where a sample-order rule overstates the dependencies;
- ``two_cluster_mixture``: a two-cluster Gaussian mixture (20 points) whose guide samples
  the global locations, then each point's assignment;
- ``binary_vae_digits``: a VAE with 16 binary latents per image on 100 of scikit-learn's
  bundled 8x8 digits (``--structures binary_vae_digits``; needs scikit-learn);
- ``attention_chain``: the chain's sites drawn by the model itself (hard attention: a
  learnable policy, ``HardAttentionELBO`` with the empty guide; Pyro's estimators get a
  guide that samples the sites from the same distribution with a separate copy of the
  policy's parameters, so that its gradient there is the score term alone).

At the problem's starting parameters every contestant's gradient with respect to the
discrete sites' logits is drawn ``--draws`` times (one particle, the same seed for every
contestant, so the draws are paired where the samplers agree) and the total variance (trace
of the covariance) is divided by TraceGraph_ELBO's (Pyro 1.9.2: provenance tracking, the
data flow) and by the old sample-order rule's (Pyro's ``_compute_downstream_costs``, used
by TraceGraph_ELBO before Pyro 1.8.2; ``benchmarks/_sample_order.py``).  With
``baselines``, every discrete guide site carries Pyro's
``infer={"baseline": {"use_decaying_avg_baseline": True}}`` (hard attention:
``baseline="moving_average"``), warmed up for ``--warmup`` calls at the same parameters
before the draws.  ``--fit`` also trains the mixture for 1,000 Adam steps with each loss and
reports the fitted locations.

Run: ``python -m benchmarks.discrete_variance [--draws 2000] [--fit]``; results go to
``benchmarks/results/discrete_variance.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO

from pyro_elbo_ext import (
    AnalyticKLELBO,
    HardAttentionELBO,
    ImportanceWeightedELBO,
    JensenELBO,
    empty_guide,
)
from pyro_elbo_ext.problems.discrete import binary_chain, two_cluster_mixture

from ._sample_order import sample_order_loss
from .gradient_variance_kl import variance_ratio

RESULTS = Path(__file__).resolve().parent / "results"
DTYPE = torch.float64


# ---------------------------------------------------------------------------- structures
@dataclass
class Structure:
    """A model, a guide for our losses and one for Pyro's, and the logits to measure."""

    name: str
    description: str
    model: Callable
    guide: Callable
    pyro_guide: Callable
    args: tuple
    params: dict
    leaf: str
    pyro_leaf: str
    discrete_sites: tuple[str, ...]
    max_plate_nesting: int
    model_drawn: bool = False

    def set_params(self) -> None:
        pyro.clear_param_store()
        for name, value in self.params.items():
            pyro.param(name, value.detach().clone(),
                       constraint=dist.constraints.positive if name == "q_scale"
                       else dist.constraints.real)


def _from_problem(problem, description: str, leaf: str, sites: tuple[str, ...]) -> Structure:
    return Structure(problem.name, description, problem.model, problem.guide, problem.guide,
                     problem.args, dict(problem.init_params), leaf, leaf, sites,
                     problem.max_plate_nesting)


def attention_chain(num_sites: int = 6, seed: int = 0) -> Structure:
    """The binary chain's sites drawn from the model: p(z_t | z_{t-1}) with learnable logits
    ``att[t] + trans * z_{t-1}``, each observed through a Normal."""
    x = binary_chain(num_sites, seed=seed, dtype=DTYPE).args[0]

    def policy(prefix):
        att = pyro.param(f"{prefix}att", lambda: torch.linspace(-0.5, 0.5, num_sites,
                                                                dtype=DTYPE))
        trans = pyro.param(f"{prefix}trans", lambda: torch.tensor(1.0, dtype=DTYPE))
        return att, trans

    def glimpses(prefix):
        att, trans = policy(prefix)
        z, out = torch.zeros((), dtype=DTYPE), []
        for t in range(num_sites):
            z = pyro.sample(f"z_{t}", dist.Bernoulli(logits=att[t] + trans * z))
            out.append(z)
        return out

    def model(data):
        for t, z in enumerate(glimpses("")):
            pyro.sample(f"x_{t}", dist.Normal(2.0 * z - 1.0, 1.0), obs=data[t])

    def pyro_guide(data):  # q = p with its own copy of the policy's parameters
        glimpses("q_")

    params = {"att": torch.linspace(-0.5, 0.5, num_sites, dtype=DTYPE),
              "trans": torch.tensor(1.0, dtype=DTYPE)}
    params.update({f"q_{k}": v for k, v in params.items()})
    return Structure("attention_chain", f"{num_sites} model-drawn binary glimpses in a chain",
                     model, empty_guide, pyro_guide, (x,), params, "att", "q_att",
                     tuple(f"z_{t}" for t in range(num_sites)), 0, model_drawn=True)


def binary_vae() -> Structure:
    """The binary-latent VAE on 100 digits (scikit-learn): the encoder's output bias, the
    16 logits' shared offset, is the measured leaf."""
    from pyro_elbo_ext.problems.vae import binary_vae_digits

    problem = binary_vae_digits(dtype=DTYPE)
    return Structure(problem.name, "binary-latent VAE (16 bits), 100 digits", problem.model,
                     problem.guide, problem.guide, problem.args, dict(problem.init_params),
                     "encoder$$$2.bias", "encoder$$$2.bias", ("z",), 1)


def _chain(markov: bool) -> Structure:
    problem = binary_chain(markov=markov, dtype=DTYPE)
    what = ("6-site Markov chain, Normal observations" if markov
            else "6 independent sites sampled in sequence")
    return _from_problem(problem, what, "q_logits", tuple(f"z_{t}" for t in range(6)))


def _mixture() -> Structure:
    return _from_problem(two_cluster_mixture(dtype=DTYPE),
                         "two-cluster mixture, 20 points, sampled assignments",
                         "assign_logits", ("z",))


#: the structures by name (built when run)
STRUCTURES: dict[str, Callable[[], Structure]] = {
    "binary_chain": lambda: _chain(True),
    "independent_bits": lambda: _chain(False),
    "two_cluster_mixture": _mixture,
    "attention_chain": attention_chain,
    "binary_vae_digits": binary_vae,
}


# ---------------------------------------------------------------------------- contestants
def _with_baselines(fn: Callable, sites: tuple[str, ...]) -> Callable:
    """``fn`` with Pyro's decaying-average baseline on each discrete site."""
    def config(msg):
        if msg["name"] in sites:
            return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": 0.9}}
        return {}
    return poutine.infer_config(fn, config)


def contestants(structure: Structure, baselines: bool) -> dict[str, tuple[Callable, str]]:
    """name -> (draw() returning a loss whose gradient is -dL, the leaf to measure)."""
    s = structure
    nesting = {"max_plate_nesting": s.max_plate_nesting}
    pyro_guide = _with_baselines(s.pyro_guide, s.discrete_sites) if baselines else s.pyro_guide
    guide = _with_baselines(s.guide, s.discrete_sites) if baselines else s.guide
    tracegraph = TraceGraph_ELBO(**nesting)
    out = {"TraceGraph_ELBO": (lambda: tracegraph._loss_and_surrogate_loss(
        s.model, pyro_guide, s.args, {})[1], s.pyro_leaf)}
    if not baselines:
        out["sample-order rule (Pyro < 1.8.2)"] = (lambda: sample_order_loss(
            s.model, s.pyro_guide, s.args, max_plate_nesting=s.max_plate_nesting)[1],
            s.pyro_leaf)
        trace = Trace_ELBO(**nesting)
        out["Trace_ELBO"] = (lambda: trace.differentiable_loss(s.model, s.pyro_guide,
                                                               *s.args), s.pyro_leaf)
    if s.model_drawn:
        ours = {"HardAttentionELBO(reinforce)": HardAttentionELBO(
            estimator="reinforce", baseline="moving_average" if baselines else None,
            **nesting)}
    else:
        ours = {
            "JensenELBO(analytic)": JensenELBO(**nesting),
            "JensenELBO(sampled)": JensenELBO(entropy="sampled", **nesting),
            "JensenELBO(path)": JensenELBO(entropy="path", **nesting),
            "AnalyticKLELBO": AnalyticKLELBO(**nesting),
        }
        if not baselines:
            ours["ImportanceWeightedELBO(K=1)"] = ImportanceWeightedELBO(num_particles=1,
                                                                         **nesting)
    for name, elbo in ours.items():
        out[name] = (_differentiable(elbo, s.model, guide, s.args), s.leaf)
    return out


def _differentiable(elbo, model, guide, args):
    return lambda: elbo.differentiable_loss(model, guide, *args)


# ---------------------------------------------------------------------------- measuring
def draws(loss_fn: Callable, leaf: str, num_draws: int, warmup: int, seed: int):
    """(num_draws, P) gradient draws of dL wrt ``leaf``, and CPU ms per draw."""
    for _ in range(warmup):  # the baselines' state learns; the parameters do not move
        loss_fn()
    pyro.set_rng_seed(seed)
    tensor = pyro.param(leaf).unconstrained()
    rows = []
    start = time.process_time()
    for _ in range(num_draws):
        rows.append(-torch.autograd.grad(loss_fn(), [tensor])[0].reshape(-1))
    return torch.stack(rows), 1e3 * (time.process_time() - start) / num_draws


def measure(structure: Structure, baselines: bool, num_draws: int, warmup: int,
            seed: int) -> list[dict]:
    results = {}
    for name, (loss_fn, leaf) in contestants(structure, baselines).items():
        structure.set_params()
        with pyro.validation_enabled(False):
            rows, ms = draws(loss_fn, leaf, num_draws, warmup if baselines else 0, seed)
        results[name] = (rows, ms)
    reference = results["TraceGraph_ELBO"][0]
    order = results.get("sample-order rule (Pyro < 1.8.2)", (None,))[0]
    out = []
    for name, (rows, ms) in results.items():
        centred = ((rows - rows.mean(0)) ** 2).sum(-1)
        ratio, paired, unpaired = variance_ratio(rows, reference)
        row = {"structure": structure.name, "description": structure.description,
               "baselines": baselines, "estimator": name,
               "total_variance": float(centred.mean() * num_draws / (num_draws - 1)),
               "total_variance_se": float(centred.std() / num_draws ** 0.5),
               "ratio_vs_tracegraph": ratio, "ratio_se_paired": paired,
               "ratio_se_unpaired": unpaired, "ms_per_draw": ms}
        if order is not None:
            row["ratio_vs_sample_order"] = variance_ratio(rows, order)[0]
        out.append(row)
    return out


def fit_mixture(steps: int = 1000, lr: float = 0.05, seed: int = 0) -> list[dict]:
    """Train the mixture from its collapsed start with each loss; the fitted locations."""
    problem = two_cluster_mixture(dtype=DTYPE)
    losses = {
        "TraceGraph_ELBO": TraceGraph_ELBO(max_plate_nesting=1),
        "Trace_ELBO": Trace_ELBO(max_plate_nesting=1),
        "JensenELBO(analytic)": JensenELBO(max_plate_nesting=1),
        "AnalyticKLELBO": AnalyticKLELBO(max_plate_nesting=1),
    }
    out = []
    for name, loss in losses.items():
        problem.set_params()
        pyro.set_rng_seed(seed)
        svi = SVI(problem.model, problem.guide, pyro.optim.Adam({"lr": lr}), loss=loss)
        start = time.process_time()
        with pyro.validation_enabled(False):
            for _ in range(steps):
                svi.step(*problem.args)
        locs = pyro.param("q_loc").detach()
        out.append({"estimator": name, "steps": steps, "locations": locs.tolist(),
                    "separated": bool((locs.max() - locs.min()) > 2.0),
                    "seconds": time.process_time() - start})
    return out


# ---------------------------------------------------------------------------- report
def markdown(rows: list[dict], fits: list[dict], meta: dict) -> str:
    lines = [
        "# Discrete sites: gradient variance against TraceGraph_ELBO",
        "",
        f"- {meta['date']}; {meta['machine']}; torch {meta['torch']}, pyro {meta['pyro']}; "
        "torch.set_num_threads(1)",
        f"- {meta['draws']} single-particle gradient draws per cell at the starting "
        "parameters, the same seed for every estimator; variance = trace of the covariance "
        "of the gradient wrt the discrete sites' logits; ratio = variance / TraceGraph_ELBO's "
        "(the same baselines) +- paired SE; baselines warmed up for "
        f"{meta['warmup']} calls",
        f"- command: `{meta['command']}`; last run's wall time {meta['wall_seconds']:.0f} s",
        "",
        "| structure | baselines | estimator | tr Var[grad] | ratio vs TraceGraph_ELBO | "
        "ratio vs sample-order rule | ms/draw |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        order = r.get("ratio_vs_sample_order")
        ratio = ("1" if r["estimator"] == "TraceGraph_ELBO"
                 else f"{r['ratio_vs_tracegraph']:.3g} ± {r['ratio_se_paired']:.2g}")
        lines.append(
            f"| {r['structure']} | {'yes' if r['baselines'] else 'no'} | {r['estimator']} | "
            f"{r['total_variance']:.4g} ± {r['total_variance_se']:.2g} | {ratio} | "
            f"{'' if order is None else f'{order:.3g}'} | {r['ms_per_draw']:.3g} |")
    if fits:
        lines += ["", "Two-cluster mixture trained from its collapsed start (Adam, lr 0.05; "
                  "data around -2 and +2):", "",
                  "| estimator | steps | fitted locations | separated | CPU s |",
                  "|---|---|---|---|---|"]
        for f in fits:
            locs = ", ".join(f"{v:.2f}" for v in f["locations"])
            lines.append(f"| {f['estimator']} | {f['steps']} | {locs} | "
                         f"{'yes' if f['separated'] else 'no'} | {f['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--structures", nargs="*", default=None,
                        help="names to run (default: all but binary_vae_digits)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--fit", action="store_true", help="also train the mixture")
    parser.add_argument("--out", type=Path, default=RESULTS / "discrete_variance")
    parser.add_argument("--append", action="store_true",
                        help="keep the other structures' rows (and the fit) of the results "
                             "file, replacing those of the structures run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.time()
    rows = []
    chosen = args.structures or [name for name in STRUCTURES if name != "binary_vae_digits"]
    for name in chosen:
        structure = STRUCTURES[name]()
        for baselines in (False,) if args.no_baselines else (False, True):
            rows += measure(structure, baselines, args.draws, args.warmup, args.seed)
            for r in rows[-len(contestants(structure, baselines)):]:
                print(f"{r['structure']:<20} {'b' if baselines else '-'} {r['estimator']:<32} "
                      f"{r['total_variance']:10.4g} ratio {r['ratio_vs_tracegraph']:.3g} "
                      f"+- {r['ratio_se_paired']:.2g}  {r['ms_per_draw']:.3g} ms")
    fits = fit_mixture(seed=args.seed) if args.fit else []
    previous = args.out.with_suffix(".json")
    commands = []
    if args.append and previous.exists():
        old = json.loads(previous.read_text())
        rows = [r for r in old["rows"] if r["structure"] not in chosen] + rows
        fits = fits or old.get("fits", [])
        commands = old["meta"]["command"].split("; ")
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} torch thread",
            "torch": torch.__version__, "pyro": pyro.__version__, "draws": args.draws,
            "warmup": args.warmup, "wall_seconds": time.time() - start,
            "command": "; ".join(commands + ["python -m benchmarks.discrete_variance " + " ".join(
                argv if argv is not None else sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "fits": fits}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows, fits, meta))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
