"""pyro_elbo_ext.compare.plots: every figure is built, titled, and legible (no tick labels
overlap), for one parameter point and for two."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from pyro_elbo_ext.compare import compare_estimators, fit_estimators
from pyro_elbo_ext.compare.plots import plot_bound, plot_gradient_variance, plot_learning_curves
from pyro_elbo_ext.problems import get_problem

F64 = {"dtype": torch.float64}


def test_plots_return_figures(tmp_path):
    problem = get_problem("normal_normal", num_data=5, **F64)
    summary = compare_estimators(problem, ["jensen_path", "trace_elbo"], num_repeats=10,
                                 at="posterior").summary()
    fit = fit_estimators(problem, ["trace_elbo"], num_steps=10, progress=False)
    figures = [plot_gradient_variance(summary), plot_bound(summary),
               plot_learning_curves(fit.frame, fit.log_evidence)]
    assert all(isinstance(f, Figure) for f in figures)
    assert [len(f.axes) for f in figures] == [3, 1, 4]  # curves: whole run, second half
    assert figures[0].axes[0].get_xscale() == "log"
    for i, fig in enumerate(figures):
        fig.savefig(tmp_path / f"{i}.png")
        assert (tmp_path / f"{i}.png").stat().st_size > 1000
        assert _overlapping_tick_labels(fig) == []
        assert fig.get_suptitle()


def _overlapping_tick_labels(figure) -> list[str]:
    """Pairs of tick labels on one axis whose drawn boxes intersect."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure).draw()
    renderer = figure.canvas.get_renderer()
    clashes = []
    for ax in figure.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            ticks = [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            labels = [tick.label1 for tick in ticks
                      if tick.label1.get_visible() and tick.label1.get_text()
                      and low <= tick.get_loc() <= high]
            boxes = [(label.get_text(), label.get_window_extent(renderer)) for label in labels]
            for i, (a, box_a) in enumerate(boxes):
                for b, box_b in boxes[i + 1:]:
                    if box_a.overlaps(box_b):
                        clashes.append(f"{a!r} / {b!r}")
    return clashes


def test_the_variance_plot_of_two_points_is_titled_and_legible():
    """The main job's figure: init and posterior rows, a rounding-level variance and its
    near-infinite efficiency; no tick labels overlap, every row says its point."""
    problem = get_problem("normal_normal", **F64)
    from pyro_elbo_ext.compare import compare_at_points

    summary = compare_at_points(problem, ["jensen_path", "trace_elbo", "jensen_analytic",
                                          "renyi_elbo"], num_repeats=10).summary()
    for figure in (plot_gradient_variance(summary), plot_bound(summary)):
        assert _overlapping_tick_labels(figure) == []
        assert "normal_normal" in figure.get_suptitle()
        assert "init and posterior" in figure.get_suptitle()
        titles = [ax.get_title(loc="left") for ax in figure.axes]
        assert "at init parameters" in titles and "at posterior parameters" in titles
    assert len(plot_gradient_variance(summary).axes) == 6


def test_a_narrow_log_range_gets_readable_ticks():
    """Efficiencies from 1.5 to 40 (a decade and a half) on a third of a figure's width: the
    log axis used to label minor ticks (2x10^0, 3x10^0, ...) on top of each other."""
    import pandas as pd

    rows = [{"problem": "p", "estimator": f"estimator_{i}", "family": "ours", "at": "init",
             "num_repeats": 200, "reference": "exact", "grad_var_total": v,
             "grad_var_total_se": 0.1 * v, "snr_median": 1.0, "efficiency": e}
            for i, (v, e) in enumerate([(1.0, 1.5), (2.0, 3.0), (5.0, 7.0), (9.0, 12.0),
                                        (20.0, 25.0), (31.0, 40.0)])]
    figure = plot_gradient_variance(pd.DataFrame(rows))
    assert _overlapping_tick_labels(figure) == []
