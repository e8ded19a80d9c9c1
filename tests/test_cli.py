"""The pyro-elbo-ext command line: list / compare / fit / diagnose end to end, files, readable
errors and their exit codes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

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
    assert "reference gradient at posterior: exact" in out and "log p(X) = " in out
    assert "grad var" in out and "jensen_path" in out and "wrote:" in out
    # 99% quantile of the largest of 2 |t_19|: t_19^-1(1 - (1 - 0.99^(1/2)) / 2)
    threshold = stats.t.isf((1 - 0.99 ** 0.5) / 2, 19)
    assert (f"worst of 2 gradient element(s): at R = 20 an unbiased estimator stays below "
            f"{threshold:.2f} in 99% of runs") in out
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
    assert "reference gradient at init: estimate: jensen_analytic x 10" in out
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


def _spy(monkeypatch, module, name: str) -> list:
    """Replace ``module.name`` (a figure-making function) by one that records its figures."""
    figures = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        figures.append(original(*args, **kwargs))
        return figures[-1]

    monkeypatch.setattr(module, name, spy)
    return figures


def test_diagnose_many_latents_prints_a_summary_and_plots_a_few(tmp_path, capsys, monkeypatch):
    """vae_digits with 30 images has 60 latent elements: the terminal gets one line per site
    and 16 rows with a note naming the full CSV, the figure 8 legible panels (not 40 tiny ones
    of ArviZ's cap) and says how many it shows."""
    from pyro_elbo_ext.diagnostics import workflow

    figures = _spy(monkeypatch, workflow, "plot_posterior")
    argv = ["diagnose", "vae_digits", "-P", "num_data=30", "--steps", "3", "--num-samples", "50",
            "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    csv = tmp_path / "diagnose_vae_digits.csv"
    assert "60 rows over 1 site(s); per site:" in out
    assert f"16 of 60 rows, the first rows of each site (all 60: {csv}):" in out
    assert len(out.splitlines()) < 45
    assert len(pd.read_csv(csv, index_col=0)) == 60
    (fig,) = figures
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 8
    assert [ax.get_title() for ax in panels] == [f"z[{i // 2}, {i % 2}]" for i in range(8)]
    assert "8 of 60 elements" in fig._suptitle.get_text()
    width, height = fig.get_size_inches()
    assert width * height / len(panels) > 5  # square inches per panel


def test_diagnose_draws_the_nuts_reference_on_the_posterior_plot(tmp_path, capsys, monkeypatch):
    """--reference nuts: each panel carries the NUTS draws' histogram (the same draws as the
    table's ref_mean) beside the guide's, and the legend names it."""
    from pyro_elbo_ext.diagnostics import workflow

    figures = _spy(monkeypatch, workflow, "plot_posterior")
    argv = ["diagnose", "normal_normal", "--steps", "50", "--num-samples", "200", "--reference",
            "nuts", "--nuts-samples", "30", "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    assert "against NUTS (30 draws)" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "diagnose_normal_normal.csv", index_col=0)
    (fig,) = figures
    (ax,) = [ax for ax in fig.axes if ax.axison]
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels == ["guide", "NUTS (30 draws)"]
    reference = [p for p in ax.patches if p.get_label() == "NUTS (30 draws)"]
    assert len(reference) == 1
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [table.loc["z", "ref_mean"]]


def test_fit_curves_show_the_start_and_zoom_on_the_end(tmp_path, capsys, monkeypatch):
    """The learning-curve figure's top row holds the whole run (the first evaluation inside
    the axis), the bottom row the second half zoomed (a narrower range than the whole run's)."""
    from pyro_elbo_ext.compare import plots

    figures = _spy(monkeypatch, plots, "plot_learning_curves")
    argv = ["fit", "normal_normal", "-e", "trace_elbo,jensen_path", "--steps", "60",
            "--eval-every", "3", "--eval-particles", "5", "--out", str(tmp_path), "-q"]
    assert main(argv) == 0
    curves = pd.read_csv(tmp_path / "fit_normal_normal_curves.csv").dropna(subset=["exact_elbo"])
    (fig,) = figures
    whole, _, zoom, _ = fig.axes[:4]
    low, high = whole.get_ylim()
    assert low <= curves["exact_elbo"].min() and curves["exact_elbo"].max() <= high
    zoom_low, zoom_high = zoom.get_ylim()
    assert zoom_high - zoom_low < 0.2 * (high - low)
    late = curves[curves["step"] >= 30]["exact_elbo"]
    assert zoom_low <= late.min() and late.max() <= zoom_high


def test_fit_evaluations_share_their_random_draws(tmp_path, capsys):
    """Evaluations of L use the same draws at every step (common random numbers): with the
    parameters held still (lr 1e-12) the 5-particle estimates agree to rounding, where fresh
    draws would differ by the estimate's noise."""
    argv = ["fit", "vae_digits", "-P", "num_data=20", "-e", "jensen_path", "--steps", "20",
            "--eval-every", "5", "--eval-particles", "5", "--lr", "1e-12", "--out",
            str(tmp_path), "-q", "--no-plots"]
    assert main(argv) == 0
    evals = pd.read_csv(tmp_path / "fit_vae_digits_curves.csv")["eval_elbo"].dropna()
    assert len(evals) == 4
    assert np.ptp(evals) < 1e-6 * abs(evals.mean())


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
    (["compare", "-P", "num_data=abc"], "argument -P/--problem-option: problem 'normal_normal': "
                                        "option num_data takes an integer (default 20), got 'abc'"),
    (["fit", "logistic_regression", "-P", "prior_scale=wide"],
     "option prior_scale takes a number (default 1.0), got 'wide'"),
    (["diagnose", "-P", "dtype=int32"], "argument -P/--problem-option: problem 'normal_normal': "
                                        "option dtype must be a torch floating-point dtype"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["diagnose", "--num-samples", "0"], "argument --num-samples: expected a positive integer"),
    (["diagnose", "random_attention", "--steps", "1"], "does not apply to problem"),
    (["compare", "-e", "jensen_path", "-e", "jensen_path", "-R", "3"],
     "['jensen_path'] named more than once"),
    (["diagnose", "-e", "analytic_kl,trace_elbo", "--steps", "1"],
     "fits one guide with one estimator; -e names 2 (analytic_kl, trace_elbo): give one"),
    (["diagnose", "--num-samples", "5", "--steps", "1"], "PSIS needs at least 21 draws"),
    (["compare", "tiny_discrete", "--at", "posterior"], "has no closed-form posterior"),
    (["compare", "--at", "start"], "argument --at: expected 'auto' or points"),
    (["compare", "-P", "dtype=int64"], "dtype must be a torch floating-point dtype"),
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
    """The main job, as a real process: ``python -m pyro_elbo_ext compare`` with defaults
    measures every estimator at the start and at the exact posterior and says what it shows."""
    done = subprocess.run([sys.executable, "-m", "pyro_elbo_ext", "compare", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=_env_with_this_checkout())
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "problem: normal_normal" in out and "parameters: init and posterior" in out
    assert "Traceback" not in done.stderr
    summary = pd.read_csv(tmp_path / "compare_normal_normal_summary.csv")
    assert list(dict.fromkeys(summary["at"])) == ["init", "posterior"]
    assert {"jensen_path", "trace_elbo"} <= set(summary["estimator"])
    # the story: at the posterior the path gradient has (rounding-level) zero variance
    at_posterior = summary[summary["at"] == "posterior"].set_index("estimator")
    assert at_posterior.loc["jensen_path", "grad_var_total"] < \
        1e-9 * at_posterior.loc["trace_elbo", "grad_var_total"]
    assert "at posterior: jensen_path's gradient variance is" in out
    assert "var / trace_elbo" in out and "grad var is the total variance" in out
    assert (tmp_path / "compare_normal_normal_variance.png").exists()
    assert (tmp_path / "compare_normal_normal_bound.png").exists()


def _env_with_this_checkout() -> dict[str, str]:
    """The environment with this checkout first on PYTHONPATH (the subprocess runs its code)."""
    import os
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    return env


# ---------------------------------------------------------------------------- error contract
@pytest.mark.parametrize("where, message", [
    ("file", "is an existing file, not a directory"),
    ("file/sub", "which is a file; give a directory"),
    ("unwritable", "is not writable"),
])
def test_an_unusable_out_location_exits_2_before_any_computation(where, message, tmp_path,
                                                                 capsys, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    target = tmp_path / where
    if where == "unwritable":  # the tests may run as root, whom permissions do not stop
        import os

        real_access = os.access
        monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).startswith(
            str(tmp_path)) else real_access(path, mode))
    import pyro_elbo_ext.compare as compare

    def no_computation(*args, **kwargs):
        raise AssertionError("the computation ran before the output location was checked")

    monkeypatch.setattr(compare, "compare_at_points", no_computation, raising=False)
    monkeypatch.setattr(compare, "compare_estimators", no_computation)
    argv = ["compare", "-e", "trace_elbo", "-R", "3", "--out", str(target), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_problem_dtype_by_name(tmp_path, capsys):
    """``-P dtype=float64`` builds the problem in float64: the path gradient's variance at the
    posterior drops from float32 rounding (~1e-13 relative) to float64 rounding."""
    argv = ["compare", "-P", "dtype=float64", "-e", "jensen_path,trace_elbo", "-R", "10",
            "--at", "posterior", "--out", str(tmp_path), "-q", "--no-plots"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = pd.read_csv(tmp_path / "compare_normal_normal_summary.csv").set_index("estimator")
    assert summary.loc["jensen_path", "grad_var_total"] < \
        1e-25 * summary.loc["trace_elbo", "grad_var_total"]


def test_diagnose_with_nuts_on_a_discrete_model_says_why_and_exits_2(tmp_path, capsys):
    argv = ["diagnose", "tiny_discrete", "--reference", "nuts", "--steps", "1",
            "--num-samples", "50", "--nuts-samples", "5", "--out", str(tmp_path), "-q"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "NUTS drew no latent of problem 'tiny_discrete'" in err and "all discrete" in err


def test_small_r_says_the_threshold_needs_more_draws(tmp_path, capsys):
    """At R = 10 the moving-average baseline's skewed draws gave max |bias|/SE = 19.8 beside
    "stays below 3.38": the table now says R is too small for that reading."""
    argv = ["compare", "random_attention", "-e", "hard_attention_reinforce_ma", "-R", "10",
            "--out", str(tmp_path), "-q", "--no-plots"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    threshold = stats.t.isf((1 - 0.99 ** (1 / 14)) / 2, 9)
    assert f"at R = 10 an unbiased estimator stays below {threshold:.2f}" in out
    assert "R is too small for that threshold to hold for hard_attention_reinforce_ma" in out
    assert "Cochran's rule" in out
