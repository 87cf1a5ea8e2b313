"""The comparison against the baseline: cost to reach the baseline's final loss, ratios and spreads."""

from __future__ import annotations

import pytest

from growlib.train.compare import cost_to_reach, curve_figure, markdown_table, plot_curves, summarize, write_summary
from growlib.train.metrics import Evaluation, RunResult


def result(points, flops, wall):
    """points: (step, flops, wall, val_loss[, parameters]) evaluations; 100 parameters unless given."""
    evals = [Evaluation(*p) if len(p) == 5 else Evaluation(*p, parameters=100) for p in points]
    return RunResult(steps=points[-1][0], flops=flops, wall_seconds=wall, final_val_loss=points[-1][3],
                     evals=evals)


def test_cost_to_reach_interpolates_between_evaluations():
    run = result([(1, 10.0, 1.0, 4.0), (2, 20.0, 2.0, 3.0), (3, 30.0, 3.0, 2.0)], 30.0, 3.0)
    assert cost_to_reach(run, 2.5) == pytest.approx((25.0, 2.5))
    assert cost_to_reach(run, 5.0) == (10.0, 1.0)
    assert cost_to_reach(run, 1.0) is None


def test_only_evaluations_of_the_final_models_size_reach_the_target():
    """A coarse level (fewer parameters) passes the target first; the run only reaches it later, once the
    full-size model gets there, interpolated from the full-size evaluation before it, never from the coarse."""
    run = result([(1, 10.0, 1.0, 2.0, 25), (2, 20.0, 2.0, 4.0, 100), (3, 30.0, 3.0, 2.0, 100)], 30.0, 3.0)
    assert cost_to_reach(run, 3.0) == pytest.approx((25.0, 2.5))
    assert cost_to_reach(run, 5.0) == (20.0, 2.0)
    assert cost_to_reach(run, 1.5) is None
    coarse_only = result([(1, 10.0, 1.0, 2.0, 25), (2, 20.0, 2.0, 4.0, 100)], 20.0, 2.0)
    assert cost_to_reach(coarse_only, 3.0) is None


def test_summary_ratios_against_the_baseline_of_the_same_seed(tmp_path):
    base = [result([(1, 50.0, 5.0, 3.0), (2, 100.0, 10.0, 2.0)], 100.0, 10.0),
            result([(1, 50.0, 5.0, 3.2), (2, 100.0, 10.0, 2.2)], 100.0, 10.0)]
    fast = [result([(1, 30.0, 4.0, 2.0), (2, 60.0, 8.0, 1.8)], 60.0, 8.0),
            result([(1, 30.0, 4.0, 2.6), (2, 60.0, 8.0, 2.0)], 60.0, 8.0)]
    never = [result([(1, 10.0, 1.0, 9.0)], 10.0, 1.0), result([(1, 10.0, 1.0, 9.0)], 10.0, 1.0)]
    rows = {r.schedule: r for r in summarize({"baseline": base, "fast": fast, "never": never})}
    assert rows["baseline"].flops_ratio == pytest.approx(1.0)
    # seed 0: reaches 2.0 at 30 FLOPs (0.3); seed 1: 2.2 between 2.6@30 and 2.0@60 -> 50 FLOPs (0.5)
    assert rows["fast"].flops_ratio == pytest.approx(0.4)
    assert rows["fast"].flops_ratio_spread == pytest.approx((0.3, 0.5))
    assert rows["fast"].total_flops_ratio == pytest.approx(0.6)
    assert rows["never"].flops_ratio is None and rows["never"].reached == 0
    table = write_summary(list(rows.values()), str(tmp_path))
    assert "not reached" in table and (tmp_path / "summary.csv").exists()
    assert (tmp_path / "summary.md").read_text().strip().endswith(markdown_table(list(rows.values())).splitlines()[-1])


def test_summary_needs_the_baseline_and_matching_seeds():
    run = result([(1, 1.0, 1.0, 1.0)], 1.0, 1.0)
    with pytest.raises(ValueError, match="baseline"):
        summarize({"fast": [run]})
    with pytest.raises(ValueError, match="seeds"):
        summarize({"baseline": [run], "fast": [run, run]})


# Two seeds per schedule: same steps, slightly different FLOPs / wall; vcycle's step 20 is a coarse level (25
# parameters, its final model has 100); its seed 1 also evaluated step 35, which seed 0 did not (not shared).
PLOTTED = {
    "baseline": [result([(10, 100.0, 1.0, 3.0), (20, 200.0, 2.0, 2.5), (30, 300.0, 3.0, 2.2)], 300.0, 3.0),
                 result([(10, 104.0, 1.2, 3.2), (20, 204.0, 2.2, 2.7), (30, 304.0, 3.2, 2.4)], 304.0, 3.2)],
    "vcycle": [result([(10, 50.0, 0.5, 3.5, 100), (20, 60.0, 0.6, 2.9, 25), (30, 110.0, 1.1, 2.6, 100),
                       (40, 160.0, 1.6, 2.1, 100)], 160.0, 1.6),
               result([(10, 54.0, 0.7, 3.9, 100), (20, 66.0, 0.8, 3.1, 25), (30, 118.0, 1.3, 2.4, 100),
                       (35, 140.0, 1.5, 2.3, 100), (40, 170.0, 1.9, 2.3, 100)], 170.0, 1.9)],
}
VCYCLE_X = {"flops": [52.0, 63.0, 114.0, 165.0], "wall": [0.6, 0.7, 1.2, 1.75]}  # seeds' mean at shared steps
VCYCLE_LOSS = {"mean": [3.7, 3.0, 2.5, 2.2], "low": [3.5, 2.9, 2.4, 2.1], "high": [3.9, 3.1, 2.6, 2.3]}


def _artists(ax):
    return {artist.get_gid(): artist for artist in [*ax.lines, *ax.collections] if artist.get_gid()}


@pytest.mark.parametrize("axis", ["flops", "wall"])
def test_plot_draws_every_seeds_mean_and_min_max_band(axis):
    pytest.importorskip("matplotlib")
    fig = curve_figure(PLOTTED, axis, title="t")
    artists = _artists(fig.axes[0])
    mean = artists["vcycle mean"]
    assert list(mean.get_xdata()) == pytest.approx(VCYCLE_X[axis])
    assert list(mean.get_ydata()) == pytest.approx(VCYCLE_LOSS["mean"])
    band = artists["vcycle band"].get_paths()[0].vertices
    for x, low, high in zip(VCYCLE_X[axis], VCYCLE_LOSS["low"], VCYCLE_LOSS["high"]):
        for y in (low, high):
            assert any(v == pytest.approx((x, y)) for v in band), f"band misses ({x}, {y})"
    assert band[:, 1].min() == pytest.approx(2.1) and band[:, 1].max() == pytest.approx(3.9)
    assert list(artists["baseline mean"].get_ydata()) == pytest.approx([3.1, 2.6, 2.3])
    assert "baseline band" in artists
    assert list(artists["target"].get_ydata()) == pytest.approx([2.3, 2.3])  # mean of the baseline's finals


def test_plot_draws_the_coarse_evaluations_as_their_own_artist():
    pytest.importorskip("matplotlib")
    fig = curve_figure(PLOTTED, "flops", title="t")
    ax = fig.axes[0]
    artists = _artists(ax)
    coarse, mean = artists["vcycle coarse"], artists["vcycle mean"]
    assert list(coarse.get_xdata()) == pytest.approx([63.0]) and list(coarse.get_ydata()) == pytest.approx([3.0])
    assert coarse.get_linestyle() == "None" and coarse.get_markerfacecolor() != mean.get_markerfacecolor()
    assert mean.get_markevery() == [True, False, True, True]  # the mean line's own markers skip the coarse point
    assert len(artists["baseline coarse"].get_xdata()) == 0
    assert any("coarse" in text.get_text() for text in ax.get_legend().get_texts())


def test_plot_is_titled_with_the_legend_outside_the_axes(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    title = "gpt2 tiny: baseline, vcycle; budget: same flops; seeds [0, 1]\nUNTUNED"
    fig = curve_figure(PLOTTED, "flops", title=title)
    ax = fig.axes[0]
    assert ax.get_title() == title
    renderer = fig.canvas.get_renderer()
    legend, axes_box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= axes_box.x1 and not legend.overlaps(axes_box)
    plt.close(fig)
    figures = plt.get_fignums()
    written = plot_curves(PLOTTED, str(tmp_path), title=title)
    assert [p.rsplit("/", 1)[-1] for p in written] == ["loss_vs_flops.png", "loss_vs_time.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in ("loss_vs_flops.png", "loss_vs_time.png"))
    assert plt.get_fignums() == figures  # closed after saving
