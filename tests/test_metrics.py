"""Unit tests for train.eval.metrics (hand-computed expectations) and train.eval.charts (the plotted data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train.eval import charts
from train.eval.metrics import (
    answer_stats,
    average_ranks,
    baseline_metrics,
    category,
    choice_metrics,
    exact_metrics,
    majority_answer,
    median_answer,
    normalize_text,
    numeric_metrics,
    parse_choice,
    parse_number,
    pearson,
    prediction_stats,
    spearman,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- parse_number

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$1,299.99", 1299.99),
        ("12.5.3", 12.5),
        ("about 40", 40.0),
        ("Price is $ 49.00", 49.0),
        ("-5", -5.0),
        ("1,2", 1.0),  # comma not followed by exactly 3 digits: not a thousands separator
        ("1,234", 1234.0),
        ("1,2345", 1.0),
        ("12,345,678.5", 12345678.5),
        ("1e3", 1.0),  # no scientific notation
        (".5", 0.5),
        ("The price is -$7.25.", -7.25),
        ("item-5 costs 3", 5.0),  # hyphen after a word is not a minus sign
        ("3.", 3.0),
        ("-0", 0.0),
        ("Price: $12 or $15", 12.0),
    ],
)
def test_parse_number(text: str, expected: float) -> None:
    assert parse_number(text) == expected


@pytest.mark.parametrize("text", ["", "no digits here", "nan", "inf", "-inf", "NaN dollars", None, 42, b"12", "9" * 400])
def test_parse_number_none(text: object) -> None:
    assert parse_number(text) is None


# ---------------------------------------------------------------- category

def test_category_boundaries_are_strict() -> None:
    # truth 1000: abs rule decides (rel thresholds are 200 / 400 there)
    assert category(1000, 1039.99) == "hit"
    # truth 100: err 40 is not < 40, rel 0.4 not < 0.2 -> not a hit; 40 < 80 -> near
    assert category(100, 140) == "near"
    # truth 1000: err 200 -> rel exactly 0.2, not < 0.2; 200 >= 80 but rel 0.2 < 0.4 -> near
    assert category(1000, 1200) == "near"
    assert category(1000, 1199.99) == "hit"
    # truth 100: err 80, rel 0.8 -> miss (exactly at near_abs)
    assert category(100, 180) == "miss"
    assert category(100, 179.99) == "near"
    # truth 1000: err 400 -> rel exactly 0.4 -> miss
    assert category(1000, 1400) == "miss"
    assert category(1000, 600) == "miss"
    assert category(1000, 601) == "near"


def test_category_relative_rule_and_special_cases() -> None:
    # truth 500, err 90: abs fails (>=40), rel 0.18 < 0.2 -> hit
    assert category(500, 590) == "hit"
    # truth 0: relative rule skipped, abs rule only
    assert category(0, 39) == "hit"
    assert category(0, 79) == "near"
    assert category(0, 80) == "miss"
    assert category(100, None) == "miss"
    assert category(100, float("nan")) == "miss"
    # custom thresholds: err 5 < 10 -> hit
    assert category(100, 105, hit_abs=10, hit_rel=0.01, near_abs=20, near_rel=0.02) == "hit"
    assert category(100, 110, hit_abs=10, hit_rel=0.01, near_abs=20, near_rel=0.02) == "near"


# ---------------------------------------------------------------- numeric_metrics

def test_numeric_metrics_two_rows() -> None:
    # truths [100, 50], preds [110, 40]: errors +10, -10
    # mae = 10, rmse = sqrt((100 + 100) / 2) = 10
    # mape = (10/100 + 10/50) / 2 * 100 = (10% + 20%) / 2 = 15%
    # r2: mean 75, ss_tot = 25^2 + 25^2 = 1250, ss_res = 200 -> 1 - 200/1250 = 0.84
    # rmsle = sqrt((ln(111/101)^2 + ln(41/51)^2) / 2) = sqrt((0.0089129 + 0.0476344) / 2) = 0.168148
    # both errors < 40 -> two hits
    m = numeric_metrics([100, 50], [110, 40])
    assert m["n"] == 2 and m["parsed"] == 2 and m["unparseable"] == 0
    assert m["mae"] == pytest.approx(10.0)
    assert m["rmse"] == pytest.approx(10.0)
    assert m["mape"] == pytest.approx(15.0)
    assert m["r2"] == pytest.approx(0.84)
    assert m["rmsle"] == pytest.approx(0.168148, abs=1e-6)
    assert (m["hit_rate"], m["near_rate"], m["miss_rate"]) == (1.0, 0.0, 0.0)


def test_numeric_metrics_with_unparseable_and_zero_truth() -> None:
    # row 1: None          -> unparseable, miss
    # row 2: 200 vs 260    -> err 60, rel 0.30 -> near
    # row 3: 0 vs 30       -> err 30 (< 40; rel rule skipped) -> hit
    # row 4: 10 vs 100     -> err 90, rel 9.0 -> miss
    # parsed rows 2-4: mae = (60 + 30 + 90) / 3 = 60
    # rmse = sqrt((3600 + 900 + 8100) / 3) = sqrt(4200) = 64.80741
    # mape over truth != 0 (rows 2, 4): (30% + 900%) / 2 = 465%
    # r2: truths [200, 0, 10], mean 70, ss_tot = 130^2 + 70^2 + 60^2 = 25400,
    #     ss_res = 12600 -> 1 - 12600/25400 = 0.503937
    # rates over all 4 rows: hit 1/4, near 1/4, miss 2/4
    m = numeric_metrics([100, 200, 0, 10], [None, 260, 30, 100])
    assert (m["n"], m["parsed"], m["unparseable"]) == (4, 3, 1)
    assert m["mae"] == pytest.approx(60.0)
    assert m["rmse"] == pytest.approx(64.80741, abs=1e-5)
    assert m["mape"] == pytest.approx(465.0)
    assert m["r2"] == pytest.approx(0.503937, abs=1e-6)
    assert (m["hit_rate"], m["near_rate"], m["miss_rate"]) == (0.25, 0.25, 0.5)


def test_numeric_metrics_negative_prediction_clipped_for_rmsle() -> None:
    # truth 10, pred -5: rmsle = |log1p(0) - log1p(10)| = ln 11 = 2.397895; one row -> r2 None
    # mae 15, mape 150%
    m = numeric_metrics([10], [-5])
    assert m["rmsle"] == pytest.approx(2.397895, abs=1e-6)
    assert m["mae"] == pytest.approx(15.0)
    assert m["mape"] == pytest.approx(150.0)
    assert m["r2"] is None


def test_numeric_metrics_none_cases() -> None:
    m = numeric_metrics([1.0, 2.0], [None, None])
    assert (m["parsed"], m["unparseable"], m["miss_rate"], m["hit_rate"]) == (0, 2, 1.0, 0.0)
    for key in ("mae", "rmse", "rmsle", "mape", "r2"):
        assert m[key] is None
    # constant truths -> r2 None; all truths 0 -> mape None
    m = numeric_metrics([0, 0, 0], [1, 2, 3])
    assert m["r2"] is None and m["mape"] is None and m["mae"] == pytest.approx(2.0)
    # float truths equal but not bit-identical after averaging still count as constant
    assert numeric_metrics([0.1, 0.1, 0.1], [0.2, 0.3, 0.4])["r2"] is None
    empty = numeric_metrics([], [])
    assert empty["n"] == 0 and empty["hit_rate"] is None and empty["mae"] is None


def test_numeric_metrics_json_serialisable_and_length_check() -> None:
    import numpy as np

    m = numeric_metrics(np.array([100.0, 50.0]), [np.float32(110.0), 40])
    json.dumps(m)
    assert all(isinstance(v, (int, float)) and not isinstance(v, np.generic) for v in m.values())
    with pytest.raises(ValueError):
        numeric_metrics([1, 2], [1])
    with pytest.raises(ValueError):
        numeric_metrics([float("nan")], [1])


# ---------------------------------------------------------------- exact / choice

def test_normalize_text() -> None:
    assert normalize_text('  "Paris."  ') == "paris"
    assert normalize_text("**New   York**\n") == "new york"
    assert normalize_text("'It's fine!'") == "it's fine"
    assert normalize_text("-5") == "-5"
    assert normalize_text("50%.") == "50%"
    assert normalize_text(None) == ""


def test_exact_metrics() -> None:
    # "Paris." == "paris"; "Rome" != "Roma"; None is wrong -> 1/3
    m = exact_metrics(["paris", "Rome", "x"], ["Paris.", "Roma", None])
    assert m == {"n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3)}
    assert exact_metrics([], [])["accuracy"] is None
    with pytest.raises(ValueError):
        exact_metrics(["a"], [])


def test_parse_choice() -> None:
    labels = ["positive", "negative", "neutral"]
    assert parse_choice("Negative. The review is not positive.", labels) == "negative"
    assert parse_choice("I think it is positive", labels) == "positive"
    assert parse_choice("unclear", labels) is None
    assert parse_choice(None, labels) is None
    # whole words only: "a" does not match inside "answer"
    assert parse_choice("Answer: B", ["A", "B"]) == "B"
    # same position -> longest label wins
    assert parse_choice("New York is big", ["New", "New York"]) == "New York"


def test_choice_metrics_confusion() -> None:
    labels = ["yes", "no"]
    truths = ["yes", "yes", "no", "no", "Yes"]
    outputs = ["Yes.", "no", "No!", "maybe", "yes, definitely"]
    # rows: yes->yes ok, yes->no, no->no ok, no-><invalid>, yes->yes ok: accuracy 3/5, invalid 1
    m = choice_metrics(truths, outputs, labels)
    assert m["n"] == 5 and m["invalid"] == 1
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["confusion"] == {
        "yes": {"yes": 2, "no": 1, "<invalid>": 0},
        "no": {"yes": 0, "no": 1, "<invalid>": 1},
    }
    # every label is a row even without examples
    m = choice_metrics(["yes"], ["yes"], ["yes", "no", "maybe"])
    assert set(m["confusion"]) == {"yes", "no", "maybe"}
    with pytest.raises(ValueError):
        choice_metrics(["perhaps"], ["yes"], labels)


# ---------------------------------------------------------------- summarize

def test_summarize_numeric() -> None:
    s = summarize("numeric", [100, 50], ["$110", "no idea"], hit_abs=5)
    # row 1: err +10, 10 >= 5 but rel 0.1 < 0.2 -> hit; row 2 unparseable -> miss
    assert s["rows"] == [
        {"parsed": 110.0, "error": 10.0, "category": "hit"},
        {"parsed": None, "error": None, "category": "miss"},
    ]
    assert s["mae"] == pytest.approx(10.0) and s["hit_rate"] == 0.5
    json.dumps(s)


def test_summarize_exact_and_choice() -> None:
    s = summarize("exact", ["Paris"], [" paris. "], hit_abs=1)  # numeric thresholds ignored
    assert s["accuracy"] == 1.0 and s["rows"] == [{"parsed": "paris", "correct": True}]
    s = summarize("choice", ["yes", "no"], ["yes", "??"], labels=["yes", "no"])
    assert s["rows"] == [{"parsed": "yes", "correct": True}, {"parsed": None, "correct": False}]
    assert s["invalid"] == 1


def test_summarize_errors() -> None:
    with pytest.raises(ValueError):
        summarize("regression", [1], ["1"])
    with pytest.raises(ValueError):
        summarize("choice", ["yes"], ["yes"])
    with pytest.raises(ValueError):
        summarize("numeric", [1], ["1"], hit_absolute=3)


# ---------------------------------------------------------------- charts
# Each chart is checked through its build_* twin (the open Figure): the plotted points, bars and lines
# must be the data given, in the right colours, axes and labels. The public functions write the PNG.

def _assert_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert len(data) > 0 and data.startswith(PNG_MAGIC)


def _rgba(colour: str, alpha: float | None = None) -> tuple:
    from matplotlib.colors import to_rgba

    return to_rgba(colour, alpha)


def _scatters(ax) -> dict[str, tuple[np.ndarray, tuple]]:
    """label -> (plotted (x, y) points, face colour) of every scatter in ax."""
    from matplotlib.collections import PathCollection

    out = {}
    for coll in ax.collections:
        assert isinstance(coll, PathCollection)
        faces = {tuple(np.round(c, 6)) for c in coll.get_facecolors()}
        assert len(faces) == 1, "one colour per category"
        out[coll.get_label()] = (np.asarray(coll.get_offsets(), dtype=float), faces.pop())
    return out


def _lines(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def _notes(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _close(fig) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_numeric_scatter_plots_each_point_in_its_category_colour(tmp_path: Path) -> None:
    truths = [5.0, 50.0, 500.0, 5000.0]
    base = [6.0, None, 300.0, 4000.0]
    adapter = [5.0, 56.0, 480.0, 5100.0]
    fig = charts.build_numeric_scatter(truths, base, adapter, {"hit_abs": 40.0, "unknown_key": 1.0})
    left, right = fig.axes
    assert (left.get_xlabel(), left.get_ylabel()) == ("truth", "prediction")
    assert (right.get_xlabel(), right.get_ylabel()) == ("truth", "prediction")
    # base: |6-5| = 1 < 40 hit; 300 vs 500: err 200, rel 0.4 (not < 0.4), not < 80: miss;
    # 4000 vs 5000: err 1000, rel 0.2 (not < 0.2) but < 0.4: near; None: left out, counted in the title.
    # MAE (1 + 200 + 1000) / 3 = 400.3; hits over all 4 rows: 25%
    assert left.get_title() == "base \u2014 MAE \\$400.3 on 3 common rows, hits 25% (1 unparseable)"
    got = _scatters(left)
    assert list(got) == ["hit (1)", "near (1)", "miss (1)"]
    np.testing.assert_array_equal(got["hit (1)"][0], [[5.0, 6.0]])
    np.testing.assert_array_equal(got["near (1)"][0], [[5000.0, 4000.0]])
    np.testing.assert_array_equal(got["miss (1)"][0], [[500.0, 300.0]])
    for label, colour in (("hit (1)", "tab:green"), ("near (1)", "tab:orange"), ("miss (1)", "tab:red")):
        assert got[label][1] == tuple(np.round(_rgba(colour, 0.7), 6)), label
    # adapter: errors 0, 6, 20, 100 (rel 0.02): all hits over the 4 rows; its MAE is on the 3 rows the base
    # parsed too (rows 1, 3, 4): (0 + 20 + 100) / 3 = 40.0 (126 / 4 = 31.5 on its own rows); row 2 is grey
    assert right.get_title() == "base + adapter \u2014 MAE \\$40.0 on 3 common rows, hits 100%"
    got = _scatters(right)
    assert list(got) == ["hit (3)", "parsed by this model only (1)"]
    np.testing.assert_array_equal(got["hit (3)"][0], [[5.0, 5.0], [500.0, 480.0], [5000.0, 5100.0]])
    np.testing.assert_array_equal(got["parsed by this model only (1)"][0], [[50.0, 56.0]])
    assert got["parsed by this model only (1)"][1] == tuple(np.round(_rgba("lightgrey", 0.7), 6))
    assert fig._suptitle.get_text() == ("MAE on the 3 of 4 rows both models parsed\nFEW ROWS: only 3 rows compared "
                                        "(under 30): the differences between models are mostly noise")
    # 5 .. 5100 spans 3 decades: log-log, shared limits padded by 1.2x, and the y = x diagonal across them
    for ax in (left, right):
        assert (ax.get_xscale(), ax.get_yscale()) == ("log", "log")
        np.testing.assert_allclose(ax.get_xlim(), (5.0 / 1.2, 5100.0 * 1.2))
        np.testing.assert_allclose(ax.get_ylim(), (5.0 / 1.2, 5100.0 * 1.2))
        assert _lines(ax) == {"_y = x": ([5.0 / 1.2, 5100.0 * 1.2], [5.0 / 1.2, 5100.0 * 1.2])}
        assert [t.get_text() for t in ax.get_legend().get_texts()] == list(_scatters(ax))  # no diagonal entry
    _close(fig)
    _assert_png(charts.numeric_scatter(tmp_path / "a" / "scatter.png", truths, base, adapter, {"hit_abs": 40.0}))


def test_numeric_scatter_linear_axes() -> None:
    # a negative prediction: no log axes; limits are the data range padded by 5% of it (28 * 0.05 = 1.4)
    fig = charts.build_numeric_scatter([10, 20], [-3, 25], [11, 19], {})
    left, right = fig.axes
    np.testing.assert_array_equal(_scatters(left)["hit (2)"][0], [[10, -3], [20, 25]])  # 13 and 5 < 40
    np.testing.assert_array_equal(_scatters(right)["hit (2)"][0], [[10, 11], [20, 19]])
    for ax in (left, right):
        assert (ax.get_xscale(), ax.get_yscale()) == ("linear", "linear")
        np.testing.assert_allclose(ax.get_xlim(), (-4.4, 26.4))
        np.testing.assert_allclose(_lines(ax)["_y = x"], [[-4.4, 26.4], [-4.4, 26.4]])
    _close(fig)


def test_numeric_scatter_thresholds_move_points_between_categories() -> None:
    # the same point (truth 100, prediction 130: err 30, rel 0.3) under three threshold sets
    cases = (({}, "hit"), ({"hit_abs": 10}, "near"), ({"hit_abs": 10, "near_abs": 20, "near_rel": 0.25}, "miss"))
    for thresholds, want in cases:
        fig = charts.build_numeric_scatter([100.0], [130.0], [130.0], thresholds)
        (label, (points, colour)), = _scatters(fig.axes[0]).items()
        assert label == f"{want} (1)" and points.tolist() == [[100.0, 130.0]]
        assert colour == tuple(np.round(_rgba(charts.COLOURS[want], 0.7), 6))
        _close(fig)


def test_numeric_scatter_with_baseline_line(tmp_path: Path) -> None:
    truths = [10.0, 20.0, 30.0]
    fig = charts.build_numeric_scatter(truths, [15, 15, 15], [11, 19, 31], {}, baseline=15.0)
    for ax in fig.axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == {"_y = x", "constant baseline \\$15.00"}
        line = lines["constant baseline \\$15.00"]
        assert list(line.get_ydata()) == [15.0, 15.0] and line.get_linestyle() == ":"
        assert _rgba(line.get_color()) == _rgba("tab:blue")
        assert "constant baseline \\$15.00" in [t.get_text() for t in ax.get_legend().get_texts()]
    _close(fig)
    # log axes (3 decades) and a non-positive baseline: the line is left out, the points still drawn
    fig = charts.build_numeric_scatter([1, 1000], [2, 900], [1, 1100], {}, baseline=0.0)
    for ax in fig.axes:
        assert ax.get_xscale() == "log" and list(_lines(ax)) == ["_y = x"]
        assert sum(len(points) for points, _ in _scatters(ax).values()) == 2
    _close(fig)
    # a baseline above every point widens the limits so that its line shows
    fig = charts.build_numeric_scatter([10, 20], [11, 19], [11, 19], {}, baseline=40.0)
    assert fig.axes[0].get_ylim()[1] > 40.0
    _close(fig)
    _assert_png(charts.numeric_scatter(tmp_path / "b.png", truths, [15, 15, 15], [11, 19, 31], {}, baseline=15.0))


@pytest.mark.parametrize(
    ("truths", "base", "adapter", "empty_panels"),
    [([], [], [], 2), ([1.0, 2.0], [None, None], [None, None], 2), ([1.0, 2.0], [None, None], [1.5, 2.0], 1)],
)
def test_charts_empty_inputs(tmp_path: Path, truths: list, base: list, adapter: list, empty_panels: int) -> None:
    fig = charts.build_numeric_scatter(truths, base, adapter, {})
    noted = [ax for ax in fig.axes if _notes(ax) == ["no parseable predictions"]]
    assert len(noted) == empty_panels
    for ax in noted:
        assert not ax.collections
    if empty_panels == 1:  # no row both parsed: the adapter's points are all its own, grey, and no MAE is compared
        assert list(_scatters(fig.axes[1])) == ["parsed by this model only (2)"]
        np.testing.assert_array_equal(_scatters(fig.axes[1])["parsed by this model only (2)"][0], [[1.0, 1.5], [2.0, 2.0]])
        assert fig.axes[1].get_title() == "base + adapter, hits 100%"
    _close(fig)
    fig = charts.build_error_histogram(truths, base, adapter)
    ax, = fig.axes  # nothing both models parsed: no errors to compare, whatever the adapter parsed
    assert _notes(ax) == ["no row that both models parsed"] and not ax.patches and ax.get_legend() is None
    _close(fig)
    _assert_png(charts.numeric_scatter(tmp_path / "s.png", truths, base, adapter, {}))
    _assert_png(charts.error_histogram(tmp_path / "h.png", truths, base, adapter))


def test_error_histogram_bars_count_the_absolute_errors(tmp_path: Path) -> None:
    truths, base, adapter = [100, 50, 10], [110, 40, None], [101, 49, 12]
    fig = charts.build_error_histogram(truths, base, adapter)
    ax, = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("absolute error", "rows")
    assert ax.get_title() == ("Absolute error on the 2 of 3 rows both models parsed\nFEW ROWS: only 2 rows compared "
                              "(under 30): the differences between models are mostly noise")
    # the rows both parsed are the first two (the base gave nothing for the third): base errors [10, 10],
    # adapter [1, 1] (its third row, error 2, is not compared); shared 30 bins over 1..10 (width 0.3)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "base: MAE 10.0 (n=2; parsed 2 of 3)", "base + adapter: MAE 1.0 (n=2; parsed 3 of 3)"]
    bars = ax.patches
    assert len(bars) == 60
    base_bars, adapter_bars = bars[:30], bars[30:]
    for group in (base_bars, adapter_bars):  # the same bins for both
        np.testing.assert_allclose([b.get_x() for b in group], np.linspace(1, 10, 31)[:-1])
        np.testing.assert_allclose([b.get_width() for b in group], [0.3] * 30)
    assert [b.get_height() for b in base_bars] == [0] * 29 + [2]
    # 1 and 1 in the first bin; the 2 of the row the base did not parse is not drawn
    assert {i: b.get_height() for i, b in enumerate(adapter_bars) if b.get_height()} == {0: 2}
    assert _rgba(base_bars[0].get_facecolor()) == _rgba("tab:blue", 0.5)
    assert _rgba(adapter_bars[0].get_facecolor()) == _rgba("tab:purple", 0.5)
    _close(fig)
    _assert_png(charts.error_histogram(tmp_path / "h.png", truths, base, adapter))


def test_loss_curves_plot_the_logged_values(tmp_path: Path) -> None:
    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "loss": 1.5, "learning_rate": 1e-4},
        {"step": 2, "eval_loss": 1.7, "eval_mae": 80.0, "eval_runtime": 3.2},
        {"step": 3, "loss": None},
        {"step": 3, "loss": float("nan")},
        {"loss": 1.0},  # no step: skipped
        {"step": 4, "eval_loss": 1.4, "eval_mae": 60.0, "eval_hit_rate": 0.4},
    ]
    fig = charts.build_loss_curves(rows)
    loss_ax, task_ax, rate_ax = fig.axes  # the rate is on a twin axis of the task panel
    assert (loss_ax.get_title(), loss_ax.get_xlabel(), loss_ax.get_ylabel()) == ("Loss", "step", "loss")
    assert _lines(loss_ax) == {"train loss": ([1.0, 2.0], [2.0, 1.5]), "eval loss": ([2.0, 4.0], [1.7, 1.4])}
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["train loss", "eval loss"]
    assert (task_ax.get_title(), task_ax.get_xlabel()) == ("Task metric during training", "step")
    assert _lines(task_ax) == {"mae": ([2.0, 4.0], [80.0, 60.0])}  # timings (eval_runtime) are not plotted
    assert _lines(rate_ax) == {"hit_rate": ([4.0], [0.4])}
    assert (task_ax.get_ylabel(), rate_ax.get_ylabel()) == ("mae", "hit_rate")
    assert [t.get_text() for t in task_ax.get_legend().get_texts()] == ["mae", "hit_rate"]
    _close(fig)

    fig = charts.build_loss_curves(rows[:2])  # train loss only: one panel, one line
    ax, = fig.axes
    assert _lines(ax) == {"train loss": ([1.0, 2.0], [2.0, 1.5])}
    _close(fig)
    fig = charts.build_loss_curves([])
    ax, = fig.axes
    assert not ax.get_lines() and _notes(ax) == ["no loss values logged"] and ax.get_legend() is None
    _close(fig)

    # the curves of a real metrics.jsonl, as evaluate.py reads it back
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if "step" in r and r.get("loss") == r.get("loss")))
    logged = [json.loads(line) for line in path.read_text().splitlines()]
    fig = charts.build_loss_curves(logged)
    assert _lines(fig.axes[0])["train loss"] == ([1.0, 2.0], [2.0, 1.5])
    _close(fig)
    for name, rs in (("loss.png", rows), ("only_loss.png", rows[:2]), ("empty.png", [])):
        _assert_png(charts.loss_curves(tmp_path / name, rs))
    assert charts._task_metric_keys(rows) == ["eval_mae", "eval_hit_rate"]  # headline metrics, left then right
    counters = [{"step": 1, "eval_n": 25, "eval_num_tokens": 9e5, "eval_entropy": 1.2, "eval_accuracy": 0.5}]
    assert charts._task_metric_keys(counters) == ["eval_accuracy"]  # counters are never plotted


def test_chart_files_are_the_built_figures(tmp_path: Path) -> None:
    """The saved PNG is the figure build_* returns, drawn at charts.DPI (pixel size = inches x DPI)."""
    import matplotlib.image as mpimg

    out = charts.numeric_scatter(tmp_path / "deep" / "dir" / "s.png", [1, 2], [1, 2], [1, 2], {})
    assert out == tmp_path / "deep" / "dir" / "s.png"
    height, width = mpimg.imread(out).shape[:2]
    assert (width, height) == (12 * charts.DPI, round(5.5 * charts.DPI))


# ---------------------------------------------------------------- correlation, spread, collapse

def test_average_ranks_ties_share_the_mean_position() -> None:
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]
    assert average_ranks([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]


def test_pearson_and_spearman_by_hand() -> None:
    # x [1,2,3,4], y [2,4,5,9]: dx [-1.5,-.5,.5,1.5], dy [-3,-1,0,4]; sum dx*dy = 11,
    # sum dx^2 = 5, sum dy^2 = 26 -> r = 11 / sqrt(130) = 0.964764
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / 130**0.5)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(0.964764, abs=1e-6)
    # ties: ranks x [1,2.5,2.5,4], y [1,3,2,4]; dx [-1.5,0,0,1.5], dy [-1.5,.5,-.5,1.5]
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(22.5) = 0.948683
    assert spearman([10, 20, 20, 30], [1, 3, 2, 4]) == pytest.approx(4.5 / 22.5**0.5)
    # monotone but not linear: Spearman 1, Pearson below 1; reversed order: -1
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 0.99
    assert spearman([1, 2, 3], [9, 5, 1]) == pytest.approx(-1.0)
    # undefined: constant side or fewer than 2 points
    assert pearson([1, 2, 3], [4, 4, 4]) is None and spearman([1, 2, 3], [4, 4, 4]) is None
    assert pearson([1], [2]) is None and spearman([1], [2]) is None
    with pytest.raises(ValueError):
        pearson([1, 2], [1])


def test_prediction_stats_by_hand() -> None:
    # truths [10,20,30,40]: population std sqrt(125); preds [20,25,25,30]: std sqrt(12.5)
    # spread = sqrt(12.5 / 125) = 0.316228; errors [10,5,-5,-10]: ss_res 250, ss_tot 500 -> r2 0.5
    # pearson: dt [-15,-5,5,15], dp [-5,0,0,5] -> 150 / sqrt(500 * 50) = 0.948683
    s = prediction_stats([10, 20, 30, 40], [20, 25, 25, 30])
    assert s["distinct"] == 3 and s["truth_distinct"] == 4
    assert s["spread_ratio"] == pytest.approx(0.1**0.5)
    assert s["r2"] == pytest.approx(0.5)
    assert s["pearson"] == pytest.approx(150 / (500 * 50) ** 0.5)
    assert s["spearman"] == pytest.approx(0.948683, abs=1e-6)  # ranks [1,2,3,4] vs [1,2.5,2.5,4]
    # 3 distinct answers for 4 distinct truths: collapsed on the count, not on the spread (32% >= 25%)
    assert s["collapsed"] is True and s["collapse_reasons"] == ["fewer than 4 distinct answers"]
    json.dumps(s)


def test_prediction_stats_constant_answer_is_collapsed() -> None:
    truths = [float(t) for t in range(1, 21)]
    s = prediction_stats(truths, [49.0] * 20)
    assert s["distinct"] == 1 and s["spread_ratio"] == 0.0
    assert s["pearson"] is None and s["spearman"] is None
    assert s["collapsed"] is True
    assert any("distinct" in r for r in s["collapse_reasons"]) and any("spread" in r for r in s["collapse_reasons"])
    # a narrow but varied answer: 20 distinct values with 10% of the truths' spread -> collapsed on spread
    narrow = prediction_stats(truths, [100 + 0.1 * t for t in truths])
    assert narrow["distinct"] == 20 and narrow["spread_ratio"] == pytest.approx(0.1)
    assert narrow["collapse_reasons"] == ["spread under 25% of the truths'"]
    # two answers over 20 rows (the rest unparseable): the count is against all 20 truths
    few = prediction_stats(truths, [5.0, 15.0] + [None] * 18)
    assert few["distinct"] == 2 and few["truth_distinct"] == 20
    assert few["collapse_reasons"] == ["fewer than 10 distinct answers"]
    # nothing parsed: no answer to be constant, so no collapse (the unparseable count tells)
    none = prediction_stats([1.0, 2.0], [None, None])
    assert not none["collapsed"] and none["collapse_reasons"] == [] and none["distinct"] == 0


def test_prediction_stats_healthy_model_is_not_collapsed() -> None:
    truths = [float(t) for t in range(1, 31)]
    preds = [t + (0.25 if i % 2 else -0.25) for i, t in enumerate(truths)]
    s = prediction_stats(truths, preds)
    assert s["distinct"] == 30 and s["collapsed"] is False and s["collapse_reasons"] == []
    assert s["spread_ratio"] == pytest.approx(float(np.std(preds) / np.std(truths)))
    assert s["pearson"] > 0.99 and s["spearman"] > 0.99 and s["r2"] > 0.97


def test_answer_stats_for_exact_and_choice() -> None:
    assert answer_stats(["yes", "no", "no"], ["yes", "yes", "yes"])["collapsed"] is True
    assert answer_stats(["yes", "no", "no"], ["yes", "no", "yes"])["collapsed"] is False
    assert answer_stats(["yes", "yes"], ["yes", "yes"])["collapsed"] is False  # one truth, one answer: fine
    assert answer_stats(["yes", "no", "no"], ["yes", None, "yes"])["collapse_reasons"] == [
        "one answer for 2 distinct truths"]
    assert answer_stats(["yes", "no"], [None, ""])["collapsed"] is False  # nothing answered


# ---------------------------------------------------------------- baselines

def test_median_and_majority_answers() -> None:
    assert median_answer(["10.00", "$30", "20", "no number"]) == (20.0, 3)
    assert median_answer(["1", "2", "3", "4"]) == (2.5, 4)
    assert median_answer(["none"]) == (None, 0)
    # "yes"/"Yes." are one answer; ties go to the answer seen first, in its first spelling
    assert majority_answer(["no", "Yes", "yes.", "maybe"]) == ("Yes", 2)
    assert majority_answer(["b", "a", "a", "b"]) == ("b", 2)
    assert majority_answer([]) == (None, 0)


def test_baseline_scored_like_the_models() -> None:
    truths = [100.0, 50.0, 10.0]
    b = baseline_metrics("numeric", truths, 50.0, hit_abs=40.0, hit_rel=0.2, near_abs=80.0, near_rel=0.4)
    # errors [-50, 0, 40]: mae 30; hits: row 2 (0) only, row 3 err 40 not < 40 -> near; row 1 rel .5 -> near
    assert b == numeric_metrics(truths, [50.0] * 3)
    assert b["mae"] == pytest.approx(30.0) and b["hit_rate"] == pytest.approx(1 / 3)
    assert b["near_rate"] == pytest.approx(2 / 3)
    assert "rows" not in b
    c = baseline_metrics("choice", ["yes", "no", "no"], "no", labels=["yes", "no"], hit_abs=1.0)
    assert c["accuracy"] == pytest.approx(2 / 3) and c["invalid"] == 0
    e = baseline_metrics("exact", ["Paris", "Rome"], "paris")
    assert e == {"n": 2, "correct": 1, "accuracy": 0.5}


# ---------------------------------------------------------------- one comparison, on the same rows (issue #22)

def _model_entry(truths, outputs):
    """A report entry as evaluate_run builds it: task scores with the spread stats, and the per-row details."""
    scores = summarize("numeric", truths, outputs)
    rows = scores.pop("rows")
    stats = prediction_stats(truths, [r["parsed"] for r in rows])
    stats.pop("r2")
    return {"task": {**scores, **{k: v for k, v in stats.items() if not k.startswith("collapse")}},
            "collapsed": stats["collapsed"], "rows_detail": rows}


def test_base_parsing_4_of_40_rows_is_compared_on_those_4() -> None:
    """The issue's case: the base parses 4 of 40 rows and looks better on its own rows than the adapter on its
    40; on the 4 rows both parsed the adapter is the better one, and the comparison is flagged as few rows."""
    from train.eval import metrics

    truths = [10.0 * (i + 1) for i in range(40)]  # 10 .. 400
    few = (0, 13, 26, 39)  # the rows the base answers with a number, 5 off each
    base = [f"{truths[i] + 5:.2f}" if i in few else "I cannot say" for i in range(40)]
    adapter = [f"{t + (1 if i in few else 150 * (-1) ** i):.2f}" for i, t in enumerate(truths)]
    report = {"base": _model_entry(truths, base), "adapter": _model_entry(truths, adapter),
              "baseline": {"answer": 205.0, "task": baseline_metrics("numeric", truths, 205.0)}}
    own = {m: dict(report[m]["task"]) for m in ("base", "adapter")}
    assert own["base"]["mae"] == pytest.approx(5.0) and own["base"]["pearson"] == pytest.approx(1.0)
    assert own["adapter"]["mae"] > 100 and own["adapter"]["pearson"] < 0.7  # the base looks far better alone
    ids = [100 + i for i in range(40)]
    compared = metrics.compare_on_common_rows(report, truths, ids, "numeric")
    assert compared["rows"] == 4 and compared["of"] == 40 and compared["row_ids"] == [100, 113, 126, 139]
    assert compared["parsed"] == {"baseline": 40, "base": 4, "adapter": 40}
    assert compared["few_rows"] is True and compared["few_rows_reason"].startswith("only 4 rows compared (under 30)")
    base_t, adapter_t, constant_t = report["base"]["task"], report["adapter"]["task"], report["baseline"]["task"]
    assert base_t["mae"] == pytest.approx(5.0) and adapter_t["mae"] == pytest.approx(1.0)  # the order flips
    assert base_t["common_rows"] == adapter_t["common_rows"] == constant_t["common_rows"] == 4
    # the baseline on the same 4 rows: |205 - 10|, |205 - 140|, |205 - 270|, |205 - 400| -> 520 / 4
    assert constant_t["mae"] == pytest.approx(130.0) and report["baseline"]["own_rows"]["mae"] == pytest.approx(100.0)
    # counts and rates stay over all 40 rows, an unparseable answer a miss
    assert (base_t["n"], base_t["parsed"], base_t["unparseable"]) == (40, 4, 36)
    assert base_t["hit_rate"] == own["base"]["hit_rate"] == pytest.approx(4 / 40)
    assert adapter_t["hit_rate"] == own["adapter"]["hit_rate"]
    # own-rows numbers are kept, labelled
    for m in ("base", "adapter"):
        assert report[m]["own_rows"]["mae"] == pytest.approx(own[m]["mae"])
        assert report[m]["own_rows"]["pearson"] == pytest.approx(own[m]["pearson"])
        assert report[m]["own_rows"]["parsed"] == own[m]["parsed"]
        assert "NOT comparable" in report[m]["own_rows"]["note"]
    lines = metrics.compared_lines(compared)
    assert lines[0] == ("compared on 4 of 40 rows: the rows every model parsed (parsed: baseline 40, base 4, "
                        "adapter 40); hit/near/miss rates over all rows, an unparseable answer a miss")
    assert lines[1].startswith("FEW ROWS: only 4 rows compared")
    json.dumps(report), json.dumps(compared)


@pytest.mark.parametrize(("common", "total", "flag"), [(30, 40, None), (30, 60, None), (29, 29, "only 29 rows"),
                                                       (30, 61, "30 of 61 rows"), (0, 0, "only 0 rows")])
def test_few_rows_thresholds(common: int, total: int, flag: str | None) -> None:
    from train.eval import metrics

    reason = metrics.few_rows_reason(common, total)
    assert (reason is None) if flag is None else reason.startswith(flag)


def test_common_rows_and_choice_comparison() -> None:
    from train.eval import metrics

    assert metrics.common_rows({"a": [1.0, None, 3.0, float("nan")], "b": [None, 2.0, 3.0, 4.0]}) == [2]
    with pytest.raises(ValueError, match="differ in length"):
        metrics.common_rows({"a": [1.0], "b": [1.0, 2.0]})
    # choice: accuracy counts a non-answer as wrong over all rows: every model is on all rows, nothing moves
    truths = ["yes", "no", "no"]
    report = {}
    for m, outs in (("base", ["maybe", "no", "hm"]), ("adapter", ["yes", "no", "yes"])):
        scores = summarize("choice", truths, outs, labels=["yes", "no"])
        report[m] = {"rows_detail": scores.pop("rows"), "task": scores}
    before = {m: dict(report[m]["task"]) for m in report}
    compared = metrics.compare_on_common_rows(report, truths, [1, 2, 3], "choice", labels=["yes", "no"])
    assert compared["rows"] == 3 and compared["parsed"] == {"base": 1, "adapter": 3}
    assert compared["how"].startswith("all rows") and compared["few_rows"] is True
    assert {m: report[m]["task"] for m in report} == before and "own_rows" not in report["base"]
