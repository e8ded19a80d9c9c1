"""The pyro-elbo-ext command line: list / compare / fit end to end, files, and readable errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pandas as pd
import pytest
import torch

from pyro_elbo_ext.cli import SUBCOMMANDS, main
from pyro_elbo_ext.problems import get_problem


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_list_names_problems_and_estimators(capsys):
    assert main(["list", "--problem", "normal_normal"]) == 0
    out = capsys.readouterr().out
    for name in ("normal_normal", "tiny_discrete", "vae_digits", "logistic_breast_cancer",
                 "jensen_path", "trace_elbo", "traceenum_elbo", "renyi_elbo"):
        assert name in out
    assert "does not apply: the problem has no discrete latent site" in out


def test_compare_writes_table_and_files(tmp_path, capsys):
    argv = ["compare", "normal_normal", "-e", "jensen_path,trace_elbo", "-R", "20",
            "--at", "posterior", "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reference gradient: exact" in out and "log p(X) = " in out
    assert "grad var" in out and "jensen_path" in out and "wrote:" in out
    # 99% quantile of the largest of 2 |N(0,1)|: Phi^-1(1 - (1 - 0.99^(1/2)) / 2) = 2.806
    assert "over 2 gradient element(s): an unbiased estimator stays below 2.81" in out
    stem = tmp_path / "compare_normal_normal"
    for suffix in ("_summary.csv", "_params.csv", ".json", "_variance.png", "_bound.png"):
        path = stem.parent / (stem.name + suffix)
        assert path.exists() and path.stat().st_size > 0, path
        assert str(path) in out
    summary = pd.read_csv(stem.parent / (stem.name + "_summary.csv"))
    assert list(summary["estimator"]) == ["jensen_path", "trace_elbo"]
    assert (summary["num_repeats"] == 20).all()
    path, trace = summary.set_index("estimator")["grad_var_total"]
    assert path < 1e-6 * trace


def test_compare_without_exact_answers_uses_an_estimated_reference(tmp_path, capsys):
    argv = ["compare", "logistic_breast_cancer", "-P", "num_data=50", "-e", "trace_elbo",
            "-R", "5", "--reference-repeats", "10", "--out", str(tmp_path), "-q", "--no-plots"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "reference gradient: estimate: jensen_analytic x 10" in out
    assert not list(tmp_path.glob("*.png"))


def test_fit_writes_curves(tmp_path, capsys):
    argv = ["fit", "normal_normal", "-e", "trace_elbo", "-e", "jensen_path", "--steps", "20",
            "--eval-particles", "5", "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "final L (exact)" in out and "wrote:" in out
    curves = pd.read_csv(tmp_path / "fit_normal_normal_curves.csv")
    assert curves.groupby("estimator").size().to_dict() == {"jensen_path": 20, "trace_elbo": 20}
    assert (tmp_path / "fit_normal_normal_final.csv").exists()
    assert (tmp_path / "fit_normal_normal_curves.png").stat().st_size > 1000


def test_diagnose_fits_and_compares_with_the_closed_form(tmp_path, capsys):
    argv = ["diagnose", "normal_normal", "--steps", "300", "--num-samples", "500",
            "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "PSIS k-hat" in out and "against the closed-form posterior" in out
    table = pd.read_csv(tmp_path / "diagnose_normal_normal.csv", index_col=0)
    # after 300 path-gradient steps the guide sits at the exact posterior: the guide's mean is
    # within 4 of its own Monte Carlo standard errors of the closed-form posterior mean
    assert abs(table.loc["z", "mean_error_z"]) < 4
    assert table.loc["z", "ref_sd"] == pytest.approx(
        get_problem("normal_normal").notes["posterior_sd"], rel=1e-6)
    assert (tmp_path / "diagnose_normal_normal.nc").stat().st_size > 0
    assert (tmp_path / "diagnose_normal_normal_posterior.png").stat().st_size > 1000


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_on_every_subcommand(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    assert main(argv) == 0
    assert "usage: pyro-elbo-ext" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["compare", "no_such_problem"], "unknown problem 'no_such_problem'; known problems:"),
    (["compare", "-e", "no_such_estimator"], "unknown estimator 'no_such_estimator'"),
    (["compare", "normal_normal", "-e", "traceenum_elbo"],
     "'traceenum_elbo' does not apply to problem 'normal_normal'"),
    (["fit", "tiny_discrete", "-e", "tracemeanfield_elbo"], "not reparameterizable"),
    (["compare", "-R", "0"], "argument -R/--repeats: expected a positive integer, got '0'"),
    (["compare", "-R", "many"], "expected a positive integer, got 'many'"),
    (["fit", "--lr", "-0.1"], "argument --lr: expected a positive number"),
    (["fit", "--steps", "1.5"], "argument --steps: expected a positive integer"),
    (["compare", "vae_digits", "--at", "posterior"], "has no closed-form posterior"),
    (["compare", "-P", "bogus=1"], "has no option(s) ['bogus']"),
    (["compare", "-P", "num_data"], "expected KEY=VALUE"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["diagnose", "--num-samples", "0"], "argument --num-samples: expected a positive integer"),
    (["diagnose", "random_attention", "--steps", "1"], "does not apply to problem"),
])
def test_bad_arguments_exit_nonzero_with_one_readable_line(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pyro-elbo-ext: error: ")
    assert message in err
    assert "Traceback" not in captured.err + captured.out


def test_console_script_runs_the_main_job(tmp_path):
    """The README's main job, as a real process: ``pyro-elbo-ext compare`` with defaults."""
    script = shutil.which("pyro-elbo-ext")
    command = [script] if script else [sys.executable, "-m", "pyro_elbo_ext"]
    done = subprocess.run([*command, "compare", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "problem: normal_normal" in done.stdout and "trace_elbo" in done.stdout
    assert "Traceback" not in done.stderr
    assert (tmp_path / "compare_normal_normal_summary.csv").exists()
    assert (tmp_path / "compare_normal_normal_variance.png").exists()
