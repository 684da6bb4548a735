"""PNG charts for evaluation and training: prediction scatter, error histogram, loss curves.

Uses matplotlib's non-interactive "Agg" backend (works on headless machines). Every function
writes one PNG (creating the parent directory), closes its figure and returns the path as a
``Path``; each has a ``build_*`` twin that returns the open matplotlib ``Figure`` instead (what the
tests inspect: the plotted points, lines, bars and labels). Empty inputs or all-unparseable
predictions draw an empty panel with a note instead of failing, so a bad run still gets its report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from train.eval import metrics  # noqa: E402

DPI = 110
COLOURS = {"hit": "tab:green", "near": "tab:orange", "miss": "tab:red"}
# Keys the Hugging Face Trainer logs with an "eval_" prefix that are timings, not task metrics.


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    plt.close(fig)
    return out


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="grey")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _parsed_pairs(truths: Sequence[float], preds: Sequence[float | None]) -> list[tuple[float, float]]:
    if len(truths) != len(preds):
        raise ValueError(f"truths and predictions differ in length: {len(truths)} != {len(preds)}")
    return [(float(t), float(p)) for t, p in zip(truths, preds) if p is not None and _is_number(p)]


def _use_log(values: list[float]) -> bool:
    """Log axes only when every value is positive and they span more than two decades."""
    return bool(values) and min(values) > 0 and math.log10(max(values) / min(values)) > 2


def _panel_title(name: str, result: dict[str, Any], unit: str) -> str:
    """Name, then MAE on the rows both models parsed and hits over all rows (metrics.scores_on_rows' result)."""
    unit = unit.replace("$", r"\$")  # a bare "$" would start matplotlib mathtext
    parts = [name]
    if result["mae"] is not None:
        parts.append(f" \u2014 MAE {unit}{result['mae']:,.1f} on {result['common_rows']} common rows")
    if result["hit_rate"] is not None:
        parts.append(f", hits {result['hit_rate'] * 100:.0f}%")
    if result["unparseable"]:
        parts.append(f" ({result['unparseable']} unparseable)")
    return "".join(parts)


OWN_ONLY = "parsed by this model only"  # legend of the points outside the common rows (grey)


def _scatter_panel(ax: Axes, name: str, truths: Sequence[float], preds: Sequence[float | None],
                   thresholds: dict[str, float], unit: str, common: list[int], baseline: float | None = None) -> None:
    """Points of the rows both models parsed, coloured hit/near/miss; the model's other parsed rows in grey."""
    result = metrics.scores_on_rows(truths, preds, common, stats=False, **thresholds)
    ax.set_title(_panel_title(name, result, unit), fontsize=10)
    ax.set_xlabel("truth")
    ax.set_ylabel("prediction")
    pairs = _parsed_pairs(truths, preds)
    if not pairs:
        _note(ax, "no parseable predictions")
        return
    shared = set(common)
    for cat, colour in COLOURS.items():
        pts = [(float(truths[i]), float(preds[i])) for i in common
               if metrics.category(truths[i], preds[i], **thresholds) == cat]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=12, c=colour, alpha=0.7, label=f"{cat} ({len(pts)})")
    own = [(float(truths[i]), float(preds[i])) for i in range(len(preds)) if i not in shared and _is_number(preds[i])]
    if own:
        xs, ys = zip(*own)
        ax.scatter(xs, ys, s=12, c="lightgrey", alpha=0.7, label=f"{OWN_ONLY} ({len(own)})")
    if baseline is not None:
        label = f"constant baseline {unit}{baseline:,.2f}".replace("$", r"\$")
        ax.axhline(baseline, color="tab:blue", linestyle=":", linewidth=1.5, label=label)
    ax.legend(loc="upper left", fontsize=8)


def _common_title(common: int, total: int) -> str:
    """The figure's title: how many rows the two models are compared on, and the few-rows flag (metrics.FEW_ROWS)."""
    reason = metrics.few_rows_reason(common, total)
    return f"the {common} of {total} rows both models parsed" + (f"\nFEW ROWS: {reason}" if reason else "")


def numeric_scatter(path: str | Path, truths: Sequence[float], base_preds: Sequence[float | None],
                    adapter_preds: Sequence[float | None], thresholds: dict[str, float] | None = None,
                    unit: str = "$", baseline: float | None = None) -> Path:
    """build_numeric_scatter, saved to ``path`` as a PNG."""
    return _save(build_numeric_scatter(truths, base_preds, adapter_preds, thresholds, unit, baseline), path)


def build_numeric_scatter(truths: Sequence[float], base_preds: Sequence[float | None],
                          adapter_preds: Sequence[float | None], thresholds: dict[str, float] | None = None,
                          unit: str = "$", baseline: float | None = None) -> Figure:
    """Prediction vs truth for "base" and "base + adapter", side by side, coloured hit/near/miss.

    ``thresholds`` are metrics.category's hit_abs/hit_rel/near_abs/near_rel (missing keys use the
    defaults). The MAE in each title is on the rows BOTH models parsed (metrics.common_rows), the same
    rows for both; their points are coloured, a model's other parsed rows grey; hits are over all rows.
    Unparseable predictions (None) are omitted from the plot and counted in the title. The figure's
    title gives the common rows and flags few of them (metrics.few_rows_reason).
    ``baseline``: the constant baseline's answer (e.g. the train median), drawn as a dotted
    horizontal line in both panels; None (default) draws none.
    Both panels share axes; log-log when all plotted values are positive and span > 2 decades.
    """
    thresholds = {k: v for k, v in (thresholds or {}).items() if k in metrics.THRESHOLD_KEYS}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), sharex=True, sharey=True)
    panels = [("base", base_preds), ("base + adapter", adapter_preds)]
    values = [v for _, preds in panels for pair in _parsed_pairs(truths, preds) for v in pair]
    if baseline is not None and not _is_number(baseline):
        baseline = None
    if baseline is not None and values and _use_log(values) and baseline <= 0:
        baseline = None  # a log axis cannot show it
    common = metrics.common_rows({"base": base_preds, "adapter": adapter_preds})
    for ax, (name, preds) in zip(axes, panels):
        _scatter_panel(ax, name, truths, preds, thresholds, unit, common, baseline)
    fig.suptitle(f"MAE on {_common_title(len(common), len(truths))}", fontsize=10)
    if values and baseline is not None:
        values.append(baseline)  # keep the line inside the axes
    if values:
        log = _use_log(values)
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.05 or 1.0
        lo, hi = (lo / 1.2, hi * 1.2) if log else (lo - pad, hi + pad)
        for ax in axes:
            ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, label="_y = x")
            if log:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
    fig.tight_layout()
    return fig


def _abs_errors(truths: Sequence[float], preds: Sequence[float | None], rows: list[int]) -> np.ndarray:
    return np.array([abs(float(preds[i]) - float(truths[i])) for i in rows], dtype=float)


def error_histogram(path: str | Path, truths: Sequence[float], base_preds: Sequence[float | None],
                    adapter_preds: Sequence[float | None]) -> Path:
    """build_error_histogram, saved to ``path`` as a PNG."""
    return _save(build_error_histogram(truths, base_preds, adapter_preds), path)


def build_error_histogram(truths: Sequence[float], base_preds: Sequence[float | None],
                          adapter_preds: Sequence[float | None]) -> Figure:
    """Overlaid histograms of |prediction - truth| for base and adapter on the rows BOTH parsed
    (metrics.common_rows): the same rows for both, so the two MAEs compare.

    Both use the same bins; the legend gives each one's MAE and its own parsed count; the title says how
    many rows are compared and flags few of them (metrics.few_rows_reason).
    """
    _parsed_pairs(truths, base_preds), _parsed_pairs(truths, adapter_preds)  # length checks
    common = metrics.common_rows({"base": base_preds, "adapter": adapter_preds})
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.set_xlabel("absolute error")
    ax.set_ylabel("rows")
    ax.set_title(f"Absolute error on {_common_title(len(common), len(truths))}", fontsize=9)
    if not common:
        _note(ax, "no row that both models parsed")
        return fig
    panels = {"base": base_preds, "base + adapter": adapter_preds}
    errors = {name: _abs_errors(truths, preds, common) for name, preds in panels.items()}
    bins = np.histogram_bin_edges(np.concatenate(list(errors.values())), bins=30)
    for (name, err), colour in zip(errors.items(), ("tab:blue", "tab:purple")):
        parsed = len(_parsed_pairs(truths, panels[name]))
        ax.hist(err, bins=bins, alpha=0.5, color=colour,
                label=f"{name}: MAE {err.mean():,.1f} (n={err.size}; parsed {parsed} of {len(truths)})")
    ax.legend()
    return fig


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) for rows that have a numeric step and a finite numeric ``key``."""
    pts = [(float(r["step"]), float(r[key])) for r in rows
           if _is_number(r.get("step")) and _is_number(r.get(key))]
    return [s for s, _ in pts], [v for _, v in pts]


# The headline task metrics, in the units a user reads: an error or accuracy on the left axis,
# a rate on the right. Counters (eval_n, eval_num_tokens, ...) are never plotted.
_LEFT_METRICS = ("eval_mae", "eval_accuracy")
_RIGHT_METRICS = ("eval_hit_rate",)


def _task_metric_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    present = {k for r in rows for k, v in r.items() if _is_number(v)}
    return [k for k in _LEFT_METRICS + _RIGHT_METRICS if k in present]


def _task_panel(ax, rows: Sequence[dict[str, Any]], keys: list[str]) -> None:
    ax.set_title("Task metric during training")
    ax.set_xlabel("step")
    right = ax.twinx() if any(k in _RIGHT_METRICS for k in keys) else None
    lines = []
    for key, colour in zip(keys, ("tab:red", "tab:green", "tab:blue")):
        target = right if key in _RIGHT_METRICS else ax
        steps, values = _series(rows, key)
        lines += target.plot(steps, values, "o-", color=colour, label=key.removeprefix("eval_"), markersize=4)
        target.set_ylabel(", ".join(k.removeprefix("eval_") for k in keys if (k in _RIGHT_METRICS) == (target is right)))
    ax.legend(lines, [line.get_label() for line in lines], loc="best")


def loss_curves(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """build_loss_curves, saved to ``path`` as a PNG."""
    return _save(build_loss_curves(rows), path)


def build_loss_curves(rows: Sequence[dict[str, Any]]) -> Figure:
    """Train "loss" and "eval_loss" against "step"; other eval_* metrics on a second subplot.

    ``rows`` are metrics.jsonl records. Rows without a numeric step, and missing or non-finite
    values, are skipped. Trainer timing keys (eval_runtime, eval_*_per_second) are not plotted.
    """
    extra = _task_metric_keys(rows)
    fig, axes = plt.subplots(1, 2 if extra else 1, figsize=(12 if extra else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    ax.set_title("Loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    drawn = False
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=4)
            drawn = True
    if drawn:
        ax.legend()
    else:
        _note(ax, "no loss values logged")
    if extra:
        _task_panel(axes[0][1], rows, extra)
    fig.tight_layout()
    return fig
