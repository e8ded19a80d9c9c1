"""The ``pyro-elbo-ext`` command line: a thin layer over :mod:`pyro_elbo_ext.compare`.

Subcommands::

    pyro-elbo-ext list     [--problem NAME]             problems, estimators, what applies
    pyro-elbo-ext compare  [PROBLEM] [-e EST ...] ...    gradient statistics table + files
    pyro-elbo-ext fit      [PROBLEM] [-e EST ...] ...    training comparison + learning curves

Every subcommand has ``--help``.  Errors in the input (unknown names, an estimator that does
not apply to the problem, bad numbers) print one line on stderr and exit with status 2;
an unexpected failure prints one line and exits with status 1 (``--debug`` shows the
traceback).

New subcommands are added by writing an ``add_arguments`` and a
``run`` function and listing them in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pyro
import torch

PROG = "pyro-elbo-ext"
DEFAULT_PROBLEM = "normal_normal"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise :class:`CLIError` instead of printing usage."""

    def error(self, message: str):  # type: ignore[override]
        command = self.prog[len(PROG):].strip()
        raise CLIError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


# ---------------------------------------------------------------------------- argument types
def _number_type(convert: Callable[[str], float], ok: Callable[[float], bool], what: str):
    """An argparse ``type``: ``convert`` the text, check it with ``ok``, else say ``what``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


#: an integer >= 1
positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
#: an integer >= 0 (seeds, step counts)
nonnegative_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
#: a finite float > 0
positive_float = _number_type(float, lambda v: math.isfinite(v) and v > 0, "a positive number")


def repeats(text: str) -> int:
    """An integer >= 3 (a variance and its standard error need three draws)."""
    value = positive_int(text)
    if value < 3:
        raise argparse.ArgumentTypeError(f"expected an integer >= 3, got {text!r}")
    return value


def problem_option(text: str) -> tuple[str, object]:
    """``KEY=VALUE``; VALUE is read as a Python literal where it is one, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _estimator_names(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


# ---------------------------------------------------------------------------- shared options
def _add_problem_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM,
                        help=f"problem name (default: {DEFAULT_PROBLEM}; see '{PROG} list')")
    parser.add_argument("-P", "--problem-option", type=problem_option, action="append",
                        default=[], metavar="KEY=VALUE",
                        help="option of the problem's factory, e.g. -P num_data=50 (repeatable)")
    parser.add_argument("-e", "--estimators", action="append", metavar="NAMES",
                        help="estimator names, comma-separated or repeated "
                             "(default: every estimator that applies to the problem)")
    parser.add_argument("--particles", type=positive_int, default=1,
                        help="particles per evaluation (default: 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="first seed (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="directory for the CSV/JSON/PNG files (default: ./out)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _build_problem(args):
    from .compare import build_problem, get_estimator

    options = dict(args.problem_option)
    try:
        problem = build_problem(args.problem, **options)
    except (KeyError, ValueError):
        raise
    except Exception as exc:  # a factory rejecting an option value
        raise CLIError(f"could not build problem {args.problem!r} with options {options}: "
                       f"{type(exc).__name__}: {exc}") from exc
    names = _estimator_names(args.estimators)
    if names:
        for name in names:
            get_estimator(name).build(problem, args.particles)  # unknown / incompatible -> error
    return problem, names


def _progress(args) -> bool | None:
    return False if args.quiet else None


# ---------------------------------------------------------------------------- list
def _add_list(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problem", metavar="NAME",
                        help="also say which estimators apply to this problem, and why not")


def _run_list(args) -> int:
    from .compare import ESTIMATORS, all_problems, build_problem
    from .compare.problems import describe_problem, problem_options

    print("problems:")
    for name in all_problems():
        options = ", ".join(f"{k}={v!r}" for k, v in problem_options(name).items())
        print(f"  {name:<24} {describe_problem(name)}")
        print(f"  {'':<24}   options: {options}")
    print("\nestimators:")
    for name, spec in ESTIMATORS.items():
        print(f"  {name:<34} [{spec.family}] {spec.description}")
    if args.problem:
        problem = build_problem(args.problem)
        print(f"\non problem {args.problem!r}:")
        for name, spec in ESTIMATORS.items():
            ok, reason = spec.applies_to(problem)
            print(f"  {name:<34} {'applies' if ok else 'does not apply: ' + reason}")
    return 0


# ---------------------------------------------------------------------------- compare
def _add_compare(parser: argparse.ArgumentParser) -> None:
    _add_problem_arguments(parser)
    parser.add_argument("-R", "--repeats", type=repeats, default=200,
                        help="evaluations per estimator (default: 200)")
    parser.add_argument("--at", choices=("init", "posterior"), default="init",
                        help="parameter point: the problem's start (default) or its exact "
                             "posterior (conjugate problems)")
    parser.add_argument("--reference", default="auto",
                        help="reference gradient: 'auto' (exact where the problem has a closed "
                             "form, else a many-sample estimate), 'none', or an estimator name")
    parser.add_argument("--reference-repeats", type=repeats, default=2000,
                        help="draws of the reference estimate when it is not exact "
                             "(default: 2000)")


def format_compare_table(summary: pd.DataFrame) -> str:
    """The terminal table of a comparison summary."""
    def num(x, spec=".4g"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

    rows = []
    for _, r in summary.iterrows():
        rows.append({
            "estimator": r["estimator"],
            "L mean": f"{num(r['elbo_mean'], '.4f')} ± {num(r['elbo_se'], '.2g')}",
            "gap to log p(X)": num(r["gap"], ".4g"),
            "grad var": f"{num(r['grad_var_total'], '.3g')} ± {num(r['grad_var_total_se'], '.2g')}",
            "SNR (median)": num(r["snr_median"], ".3g"),
            "max |bias|/SE": num(r["bias_max_z"], ".2f"),
            "ms/eval": num(1e3 * r["time_per_eval_s"], ".3g"),
            "efficiency": num(r["efficiency"], ".3g"),
        })
    return pd.DataFrame(rows).to_string(index=False)


def _max_z_under_null(num_elements: int, level: float = 0.99) -> float:
    """The ``level`` quantile of the largest of P independent |N(0, 1)| values (Sidak):
    z with (1 - 2 (1 - Phi(z)))^P = level."""
    tail = (1.0 - level ** (1.0 / max(num_elements, 1))) / 2.0
    return NormalDist().inv_cdf(1.0 - tail)


def _run_compare(args) -> int:
    from .compare import compare_estimators, get_estimator
    from .compare.plots import plot_bound, plot_gradient_variance

    problem, names = _build_problem(args)
    if args.reference not in ("auto", "none"):
        get_estimator(args.reference).build(problem, 1)
    if args.at == "posterior" and problem.posterior_params is None:
        raise CLIError(f"problem {problem.name!r} has no closed-form posterior; use --at init")
    comparison = compare_estimators(
        problem, names, num_repeats=args.repeats, num_particles=args.particles, seed=args.seed,
        at=args.at, reference=args.reference, reference_repeats=args.reference_repeats,
        progress=_progress(args),
    )
    summary = comparison.summary()
    print(f"problem: {problem.name} ({problem.description})")
    print(f"parameters: {comparison.at}; R = {args.repeats} evaluations per estimator, "
          f"{args.particles} particle(s) each, seeds {args.seed}..{args.seed + args.repeats - 1} "
          "shared by all estimators")
    facts = [f"reference gradient: {comparison.reference.label}"]
    if problem.exact_elbo is not None and comparison.reference.elbo is not None:
        facts.append(f"exact L = {comparison.reference.elbo:.4f}")
    if problem.log_evidence is not None:
        facts.append(f"log p(X) = {problem.log_evidence:.4f}")
    print("; ".join(facts))
    print()
    print(format_compare_table(summary))
    if comparison.reference.kind != "none" and comparison.records:
        size = sum(p.grad_mean.size for p in comparison.records[0].params)
        print(f"max |bias|/SE is taken over {size} gradient element(s): an unbiased estimator "
              f"stays below {_max_z_under_null(size):.2f} in 99% of runs (independent elements)")
        for record in comparison.records:
            if record.bias_unassessed:
                print(f"note: {record.estimator}: {record.bias_unassessed} element(s) took one "
                      f"value in all {record.num_repeats} draws while the reference differs "
                      "(a rare event not drawn): left out of max |bias|/SE; raise --repeats "
                      "to assess them")
    biased = summary.loc[summary["objective"] != "L", ["estimator", "objective"]]
    for _, r in biased.iterrows():
        print(f"note: {r['estimator']} estimates the gradient of the {r['objective']}, not of L")
    paths = comparison.save(args.out)
    if not args.no_plots:
        stem = f"compare_{problem.name}"
        paths["variance_png"] = _save(plot_gradient_variance(summary), args.out,
                                      f"{stem}_variance.png")
        paths["bound_png"] = _save(plot_bound(summary), args.out, f"{stem}_bound.png")
    _print_paths(paths)
    return 0


# ---------------------------------------------------------------------------- fit
def _add_fit(parser: argparse.ArgumentParser) -> None:
    _add_problem_arguments(parser)
    parser.add_argument("--steps", type=positive_int, default=300,
                        help="SVI steps per estimator (default: 300)")
    parser.add_argument("--lr", type=positive_float, default=0.05,
                        help="Adam learning rate (default: 0.05)")
    parser.add_argument("--eval-every", type=positive_int, default=None,
                        help="steps between evaluations of L (default: steps // 25)")
    parser.add_argument("--eval-particles", type=positive_int, default=50,
                        help="particles of each evaluation of L (default: 50)")


def _run_fit(args) -> int:
    from .compare import fit_estimators
    from .compare.plots import plot_learning_curves

    problem, names = _build_problem(args)
    result = fit_estimators(
        problem, names, num_steps=args.steps, lr=args.lr, seed=args.seed,
        num_particles=args.particles, eval_every=args.eval_every,
        num_eval_particles=args.eval_particles, progress=_progress(args),
    )
    final = result.final()
    print(f"problem: {problem.name} ({problem.description})")
    print(f"{args.steps} SVI steps per estimator, Adam lr {args.lr}, {args.particles} "
          f"particle(s), seed {args.seed} (step t uses seed + t for every estimator)")
    if result.log_evidence is not None:
        print(f"log p(X) = {result.log_evidence:.4f}")
    print()
    table = pd.DataFrame({
        "estimator": final["estimator"],
        "final L (exact)": final["exact_elbo"].map(lambda v: "-" if pd.isna(v) else f"{v:.4f}"),
        f"final L ({args.eval_particles}-sample)": final["eval_elbo"].map(lambda v: f"{v:.4f}"),
        "wall time (s)": final["wall_time_s"].map(lambda v: f"{v:.2f}"),
        "ms/step": (1e3 * final["wall_time_s"] / final["step"]).map(lambda v: f"{v:.3g}"),
    })
    print(table.to_string(index=False))
    paths = result.save(args.out)
    if not args.no_plots:
        paths["curves_png"] = _save(plot_learning_curves(result.frame, result.log_evidence),
                                    args.out, f"fit_{problem.name}_curves.png")
    _print_paths(paths)
    return 0


# ---------------------------------------------------------------------------- diagnose
def _add_diagnose(parser: argparse.ArgumentParser) -> None:
    _add_problem_arguments(parser)
    parser.add_argument("--steps", type=nonnegative_int, default=500,
                        help="SVI steps that fit the guide first (default: 500; 0: diagnose the "
                             "guide at its starting parameters)")
    parser.add_argument("--lr", type=positive_float, default=0.05,
                        help="Adam learning rate (default: 0.05)")
    parser.add_argument("--num-samples", type=positive_int, default=2000,
                        help="draws from the guide (default: 2000)")
    parser.add_argument("--reference", choices=("auto", "nuts", "none"), default="auto",
                        help="reference posterior: 'auto' = the closed form where the problem "
                             "has one, 'nuts' = a Pyro NUTS run, 'none' (default: auto)")
    parser.add_argument("--nuts-samples", type=positive_int, default=500,
                        help="NUTS warm-up steps and draws for --reference nuts (default: 500)")


def _run_diagnose(args) -> int:
    import arviz as az

    from .compare import get_estimator
    from .diagnostics import compare_posterior, psis_from_inference_data, to_inference_data

    problem, names = _build_problem(args)
    name = (names or ["jensen_path"])[0]
    loss, model, guide = get_estimator(name).build(problem, args.particles)
    pyro.set_rng_seed(args.seed)
    problem.set_params()
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": args.lr}), loss=loss)
    for _ in range(args.steps):
        svi.step(*problem.args, **problem.kwargs)
    idata = to_inference_data(problem.model, problem.guide, *problem.args,
                              num_samples=args.num_samples, **problem.kwargs)
    psis = psis_from_inference_data(idata)
    print(f"problem: {problem.name} ({problem.description})")
    print(f"guide fitted with {name} for {args.steps} steps (Adam lr {args.lr}); "
          f"{args.num_samples} draws from the guide")
    khat = (f"{psis.khat:.3f}" if math.isfinite(psis.khat)
            else "-inf (all importance weights equal: q matches the posterior)")
    print(f"PSIS k-hat = {khat}; verdict {psis.verdict} (k < 0.5 good, < 0.7 ok, else "
          f"unreliable; Yao et al. 2018); importance-sampling ESS = {psis.ess:.0f}")
    reference = None
    if args.reference == "nuts" or (args.reference == "auto"
                                    and problem.posterior_params is None):
        if args.reference == "nuts":
            kernel = pyro.infer.NUTS(problem.model)
            mcmc = pyro.infer.MCMC(kernel, num_samples=args.nuts_samples,
                                   warmup_steps=args.nuts_samples, disable_progbar=args.quiet)
            mcmc.run(*problem.args, **problem.kwargs)
            reference = az.from_pyro(mcmc, log_likelihood=False)
            source = f"NUTS ({args.nuts_samples} draws)"
    elif args.reference == "auto":
        reference, source = problem, "the closed-form posterior"
    if reference is None:
        table = az.summary(idata, kind="stats")
        print("\nthe guide's posterior (no reference; --reference nuts runs one):")
    else:
        table = compare_posterior(idata, reference)
        print(f"\nthe guide's posterior against {source} (mean_error_z: error / its MC SE):")
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    args.out.mkdir(parents=True, exist_ok=True)
    paths = {"table": args.out / f"diagnose_{problem.name}.csv",
             "idata": args.out / f"diagnose_{problem.name}.nc"}
    table.to_csv(paths["table"])
    idata.to_netcdf(str(paths["idata"]))
    if not args.no_plots:
        axes = az.plot_posterior(idata, var_names=list(idata.posterior.data_vars)[:6])
        figure = np.atleast_1d(axes).ravel()[0].get_figure()
        paths["posterior_png"] = _save(figure, args.out, f"diagnose_{problem.name}_posterior.png")
    _print_paths(paths)
    return 0


# ---------------------------------------------------------------------------- plumbing
def _save(fig, out: Path, name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fig.savefig(path, dpi=110)
    return path


def _print_paths(paths: dict[str, Path]) -> None:
    print()
    print("wrote:")
    for path in paths.values():
        print(f"  {path}")


@dataclass(frozen=True)
class Subcommand:
    """A subcommand: its one-line help, its arguments and what it runs."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: the subcommands, in ``--help`` order
SUBCOMMANDS: dict[str, Subcommand] = {
    "list": Subcommand("list the problems and the estimators (and which apply)", _add_list,
                       _run_list),
    "compare": Subcommand("gradient statistics of estimators on a problem: table, CSV/JSON, PNG",
                          _add_compare, _run_compare),
    "fit": Subcommand("train a problem's guide with several estimators: learning curves",
                      _add_fit, _run_fit),
    "diagnose": Subcommand("fit a guide, then ArviZ diagnostics: PSIS k-hat and the posterior "
                           "against a reference", _add_diagnose, _run_diagnose),
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per :data:`SUBCOMMANDS` entry."""
    from . import __version__

    parser = _Parser(
        prog=PROG,
        description="Compare ELBO estimators for Pyro models: gradient variance, bias, speed.",
        epilog=f"main job: {PROG} compare {DEFAULT_PROBLEM}",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch intra-op threads (default: 1; small models run fastest, and "
                             "time most steadily, on one)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, sub in SUBCOMMANDS.items():
        sub_parser = subparsers.add_parser(name, help=sub.help, description=sub.help)
        sub.add_arguments(sub_parser)
        sub_parser.set_defaults(_run=sub.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); return the exit status.

    Returns
    -------
    int
        0 on success, 2 for a user error (one line on stderr), 1 for an unexpected failure.
    """
    from .compare import IncompatibleEstimatorError, UnknownEstimatorError, UnknownProblemError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            return args._run(args)
        finally:
            torch.set_num_threads(threads)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else 0
    except (CLIError, UnknownProblemError, UnknownEstimatorError,
            IncompatibleEstimatorError, ValueError, TypeError) as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything else: still one line, unless --debug
        if debug:
            raise
        print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} "
              "(run with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
