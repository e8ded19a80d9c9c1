"""The ``pyro-elbo-ext`` command line: a thin argparse layer over :mod:`pyro_elbo_ext.compare`
and :mod:`pyro_elbo_ext.diagnostics`.

Subcommands::

    pyro-elbo-ext list     [--problem NAME]             problems, estimators, what applies
    pyro-elbo-ext compare  [PROBLEM] [-e EST ...] ...    gradient statistics table + files
    pyro-elbo-ext fit      [PROBLEM] [-e EST ...] ...    training comparison + learning curves
    pyro-elbo-ext diagnose [PROBLEM] [-e EST] ...        fit a guide, then ArviZ diagnostics

Every subcommand has ``--help``.  Errors in the input (unknown names, an estimator that does
not apply to the problem, bad numbers, an output location that cannot be written) print one
line on stderr and exit with status 2 before any computation; a missing optional dependency
prints the ``pip install`` line and exits with status 1, as does an unexpected failure
(``--debug`` shows the traceback).

New subcommands are added by writing an ``add_arguments`` and a
``run`` function and listing them in :data:`SUBCOMMANDS`.
"""

from __future__ import annotations

import argparse
import ast
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ._extras import MissingExtraError
from .problems import PROBLEMS, describe_problem, get_problem, problem_options
from .problems.registry import ProblemOptionError, UnknownProblemError

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


def writable_directory(path: Path) -> Path:
    """``path`` if it is, or can be made, a writable directory; else a :class:`CLIError`.

    Checked before any computation: an existing file, a path under a file, or a place without
    write permission is reported at once, not after the run.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLIError(f"--out {path} is an existing file, not a directory; give a directory")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"--out {path} lies under {existing}, which is a file; give a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {path}: {existing} is not writable; give a directory you can "
                       "write to")
    return path


# ---------------------------------------------------------------------------- shared options
def _add_problem_arguments(parser: argparse.ArgumentParser, several: bool = True) -> None:
    parser.add_argument("problem", nargs="?", default=DEFAULT_PROBLEM,
                        help=f"problem name (default: {DEFAULT_PROBLEM}; see '{PROG} list')")
    parser.add_argument("-P", "--problem-option", type=problem_option, action="append",
                        default=[], metavar="KEY=VALUE",
                        help="option of the problem's factory, e.g. -P num_data=50 or "
                             "-P dtype=float64 (repeatable)")
    if several:
        parser.add_argument("-e", "--estimators", action="append", metavar="NAMES",
                            help="estimator names, comma-separated or repeated, each once "
                                 "(default: every estimator that applies to the problem)")
    else:
        parser.add_argument("-e", "--estimators", action="append", metavar="NAME",
                            help="the one estimator that fits the guide (default: jensen_path)")
    parser.add_argument("--particles", type=positive_int, default=1,
                        help="particles per evaluation (default: 1)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="first seed (default: 0)")
    parser.add_argument("--out", type=Path, default=Path("out"),
                        help="directory for the output files (default: ./out)")
    parser.add_argument("--no-plots", action="store_true", help="write no PNG files")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _build_problem(args):
    """The problem and the estimator names of ``args``, all checked before any computation."""
    from .compare import get_estimator
    from .compare.estimators import chosen_estimators

    writable_directory(args.out)
    options = dict(args.problem_option)
    try:
        problem = get_problem(args.problem, **options)
    except ProblemOptionError as exc:
        raise CLIError(f"argument -P/--problem-option: {exc}") from exc
    except (KeyError, ValueError):
        raise
    except Exception as exc:  # a factory rejecting an option value
        raise CLIError(f"could not build problem {args.problem!r} with options {options}: "
                       f"{type(exc).__name__}: {exc}") from exc
    names = _estimator_names(args.estimators)
    if names:
        chosen_estimators(problem, names)  # a name given twice -> error
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
    from .compare import ESTIMATORS

    print("problems:")
    for name in PROBLEMS:
        options = ", ".join(f"{k}={v!r}" for k, v in problem_options(name).items())
        print(f"  {name:<24} {describe_problem(name)}")
        print(f"  {'':<24}   options: {options}")
    print("\nestimators:")
    for name, spec in ESTIMATORS.items():
        print(f"  {name:<34} [{spec.family}] {spec.description}")
    if args.problem:
        problem = get_problem(args.problem)
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
    parser.add_argument("--at", default="auto", metavar="POINTS",
                        help="parameter point(s), comma-separated: 'init' (the problem's start), "
                             "'posterior' (its exact posterior, conjugate problems); default "
                             "'auto': both where the problem has a posterior, else init")
    parser.add_argument("--reference", default="auto",
                        help="reference gradient: 'auto' (exact where the problem has a closed "
                             "form, else a many-sample estimate), 'none', or an estimator name")
    parser.add_argument("--reference-repeats", type=repeats, default=2000,
                        help="draws of the reference estimate when it is not exact "
                             "(default: 2000)")


def _points(text: str, problem) -> list[str]:
    if text == "auto":
        return ["init"] if problem.posterior_params is None else ["init", "posterior"]
    points = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in points if p not in ("init", "posterior")]
    if bad or not points:
        raise CLIError(f"compare: argument --at: expected 'auto' or points from init, posterior "
                       f"(comma-separated), got {text!r}")
    if len(set(points)) != len(points):
        raise CLIError(f"compare: argument --at: each point once, got {text!r}")
    if "posterior" in points and problem.posterior_params is None:
        raise CLIError(f"problem {problem.name!r} has no closed-form posterior; use --at init")
    return points


def _run_compare(args) -> int:
    from .compare import compare_at_points, get_estimator
    from .compare.plots import plot_bound, plot_gradient_variance
    from .compare.report import format_table, notes

    problem, names = _build_problem(args)
    points = _points(args.at, problem)
    if args.reference not in ("auto", "none"):
        get_estimator(args.reference).build(problem, 1)
    comparison = compare_at_points(
        problem, names, points, num_repeats=args.repeats, num_particles=args.particles,
        seed=args.seed, reference=args.reference, reference_repeats=args.reference_repeats,
        progress=_progress(args),
    )
    summary = comparison.summary()
    print(f"problem: {problem.name} ({problem.description})")
    print(f"parameters: {' and '.join(points)}; R = {args.repeats} evaluations per estimator, "
          f"{args.particles} particle(s) each unless an estimator needs more, seeds "
          f"{args.seed}..{args.seed + args.repeats - 1} shared by all estimators")
    for at, ref in comparison.references.items():
        facts = [f"reference gradient at {at}: {ref.label}"]
        if problem.exact_elbo is not None and ref.kind == "exact":
            facts.append(f"exact L = {ref.elbo:.4f}")
        print("; ".join(facts))
    if problem.log_evidence is not None:
        print(f"log p(X) = {problem.log_evidence:.4f}")
    print()
    print(format_table(summary))
    print()
    for line in notes(comparison):
        print(line)
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
    print(f"problem: {problem.name} ({problem.description})")
    print(f"{args.steps} SVI steps per estimator, Adam lr {args.lr}, {args.particles} "
          f"particle(s), seed {args.seed} (step t uses seed + t for every estimator)")
    if result.log_evidence is not None:
        print(f"log p(X) = {result.log_evidence:.4f}")
    print()
    print(result.final_table(args.eval_particles))
    paths = result.save(args.out)
    if not args.no_plots:
        paths["curves_png"] = _save(plot_learning_curves(result.frame, result.log_evidence),
                                    args.out, f"fit_{problem.name}_curves.png")
    _print_paths(paths)
    return 0


# ---------------------------------------------------------------------------- diagnose
def _add_diagnose(parser: argparse.ArgumentParser) -> None:
    _add_problem_arguments(parser, several=False)
    parser.add_argument("--steps", type=nonnegative_int, default=500,
                        help="SVI steps that fit the guide first (default: 500; 0: diagnose the "
                             "guide at its starting parameters)")
    parser.add_argument("--lr", type=positive_float, default=0.05,
                        help="Adam learning rate (default: 0.05)")
    parser.add_argument("--num-samples", type=positive_int, default=2000,
                        help="draws from the guide (default: 2000; at least 21 for PSIS)")
    parser.add_argument("--reference", choices=("auto", "nuts", "none"), default="auto",
                        help="reference posterior: 'auto' = the closed form where the problem "
                             "has one, 'nuts' = a Pyro NUTS run, 'none' (default: auto)")
    parser.add_argument("--nuts-samples", type=positive_int, default=500,
                        help="NUTS warm-up steps and draws for --reference nuts (default: 500)")


def _run_diagnose(args) -> int:
    from .diagnostics import MIN_PSIS_SAMPLES, diagnose

    problem, names = _build_problem(args)
    if names and len(names) > 1:
        raise CLIError(f"diagnose: fits one guide with one estimator; -e names {len(names)} "
                       f"({', '.join(names)}): give one")
    if args.num_samples < MIN_PSIS_SAMPLES:
        raise CLIError(f"diagnose: argument --num-samples: PSIS needs at least "
                       f"{MIN_PSIS_SAMPLES} draws, got {args.num_samples}")
    name = (names or ["jensen_path"])[0]
    result = diagnose(problem, name, num_steps=args.steps, lr=args.lr,
                      num_particles=args.particles, num_samples=args.num_samples,
                      reference=args.reference, nuts_samples=args.nuts_samples,
                      seed=args.seed, progress=not args.quiet)
    psis = result.psis
    print(f"problem: {problem.name} ({problem.description})")
    print(f"guide fitted with {name} for {args.steps} steps (Adam lr {args.lr}); "
          f"{args.num_samples} draws from the guide")
    khat = (f"{psis.khat:.3f}" if math.isfinite(psis.khat)
            else "-inf (all importance weights equal: q matches the posterior)")
    print(f"PSIS k-hat = {khat}; verdict {psis.verdict} (k < 0.5 good, < 0.7 ok, else "
          f"unreliable; Yao et al. 2018); importance-sampling ESS = {psis.ess:.0f}")
    if result.reference is None:
        print("\nthe guide's posterior (no reference; --reference nuts runs one):")
    else:
        print(f"\nthe guide's posterior against {result.reference} "
              "(mean_error_z: error / its MC SE):")
    paths = result.save(args.out, plots=not args.no_plots)
    print(result.table_text(full_table=paths["table"]))
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
    argv = list(sys.argv[1:] if argv is None else argv)
    user_errors = _user_errors()
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
    except MissingExtraError as exc:
        if debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except user_errors as exc:
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's input errors (exit status 2)."""
    errors: tuple[type[BaseException], ...] = (CLIError, UnknownProblemError, ValueError,
                                                TypeError)
    try:
        from .compare.estimators import UnknownEstimatorError
    except ImportError:  # the compare extra is missing: its commands say so when run
        return errors
    return (*errors, UnknownEstimatorError)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
