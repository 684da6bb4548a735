"""Evaluation metrics for generated answers: parse the model's text, then score it.

Pure functions (numpy only, no torch) so they can be unit-tested by hand and reused by the
evaluation script, the trainer's eval hook and the charts. Three task kinds:

* ``numeric`` -- the output contains a number (e.g. a price). Scored with MAE, RMSE, RMSLE, MAPE,
  R^2 and the course's price "Tester" buckets: hit (green) / near (orange) / miss (red).
* ``exact``   -- the output must equal the reference text after light normalisation.
* ``choice``  -- the output must name one of a fixed set of labels (classification).

Besides the scores: how the predictions spread and follow the truth (distinct answers, spread
ratio, Pearson/Spearman, a collapse flag for a (near-)constant answer) and the constant baselines
(the train median, the majority answer) scored with the very same metrics. Models are compared on
the rows all of them parsed (compare_on_common_rows), with a flag when those are few.

Every value returned is a plain Python ``int``/``float``/``str``/``bool``/``None`` so the
dicts can be written to JSON as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLD_KEYS = ("hit_abs", "hit_rel", "near_abs", "near_rel")
INVALID = "<invalid>"

# The first number in the text. Thousands separators are commas followed by exactly three digits
# ("1,234" -> 1234, "1,2" -> 1, "1,2345" -> 1). A minus sign counts only when it does not follow
# a letter, digit or dot ("item-5" -> 5, "-$5" -> -5). No exponent: "1e3" -> 1, see parse_number.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w.])[-\u2212](?:\$\s*)?)?"
    r"(?:(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?|(?P<bare>\.\d+))",
    re.ASCII,
)

# Stripped from both ends by normalize_text: quotes, brackets, sentence punctuation and markdown
# emphasis. Deliberately NOT "-", "+", "$", "%", "#": they change meaning ("-5", "50%", "C#").
_EDGE_CHARS = "\"'`*.,;:!?()[]{}<>\u201c\u201d\u2018\u2019\u00ab\u00bb"


def parse_number(text: Any) -> float | None:
    """Return the FIRST number in ``text`` as a float, or None if there is none. Never raises.

    "$1,299.99" -> 1299.99, "12.5.3" -> 12.5, ".5" -> 0.5, "-5" -> -5.0, "about 40" -> 40.0.
    Scientific notation is not read ("1e3" -> 1.0): models are asked for prices and amounts, and
    an "e" after a number is almost always the start of a word, not an exponent. Non-string input,
    and text whose number is not finite ("nan", "inf", 400 digits), give None.
    """
    if not isinstance(text, str):
        return None
    match = _NUMBER.search(text)
    if match is None:
        return None
    digits = (match["int"] or "").replace(",", "") + (match["frac"] or match["bare"] or "")
    value = float(digits)
    if match["sign"]:
        value = -value
    if not math.isfinite(value):
        return None
    return value + 0.0  # turns -0.0 into 0.0


def _is_finite_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def category(
    truth: float,
    pred: float | None,
    hit_abs: float = 40.0,
    hit_rel: float = 0.2,
    near_abs: float = 80.0,
    near_rel: float = 0.4,
) -> str:
    """Bucket one prediction as "hit", "near" or "miss" (the course Tester's green/orange/red).

    hit:  |err| < hit_abs  or |err|/|truth| < hit_rel
    near: |err| < near_abs or |err|/|truth| < near_rel
    Comparisons are strict, so an error exactly at a threshold falls in the next bucket. When
    truth is 0 the relative rule is skipped (no division by zero). A missing or non-finite
    prediction is a miss.
    """
    if pred is None or not _is_finite_number(pred):
        return "miss"
    err = abs(float(pred) - float(truth))
    rel = err / abs(truth) if truth != 0 else None
    if err < hit_abs or (rel is not None and rel < hit_rel):
        return "hit"
    if err < near_abs or (rel is not None and rel < near_rel):
        return "near"
    return "miss"


def _check_inputs(truths: Sequence[Any], preds: Sequence[Any]) -> None:
    if len(truths) != len(preds):
        raise ValueError(f"truths and predictions differ in length: {len(truths)} != {len(preds)}")


def _error_metrics(t: np.ndarray, p: np.ndarray) -> dict[str, float | None]:
    """MAE, RMSE, RMSLE, MAPE (%) and R^2 over parsed rows (arrays of equal, possibly zero, length)."""
    if t.size == 0:
        return {"mae": None, "rmse": None, "rmsle": None, "mape": None, "r2": None}
    err = p - t
    log_err = np.log1p(np.maximum(p, 0.0)) - np.log1p(np.maximum(t, 0.0))
    nonzero = t != 0
    mape = float(np.mean(np.abs(err[nonzero]) / np.abs(t[nonzero])) * 100.0) if nonzero.any() else None
    r2 = None
    if t.size >= 2 and t.max() != t.min():
        r2 = float(1.0 - np.sum(err**2) / np.sum((t - t.mean()) ** 2))
    return {
        "mae": float(np.mean(np.abs(err))),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "rmsle": float(np.sqrt(np.mean(log_err**2))),
        "mape": mape,
        "r2": r2,
    }


def numeric_metrics(
    truths: Sequence[float],
    preds: Sequence[float | None],
    hit_abs: float = 40.0,
    hit_rel: float = 0.2,
    near_abs: float = 80.0,
    near_rel: float = 0.4,
) -> dict[str, Any]:
    """Score parsed numeric predictions against true values.

    Keys: n, parsed, unparseable, mae, rmse, rmsle, mape, r2, hit_rate, near_rate, miss_rate.
    Error metrics use the parsed rows only (None when no row parsed). RMSLE is
    sqrt(mean((log1p(max(pred, 0)) - log1p(max(truth, 0)))^2)): negative values are clipped to 0
    because the log is undefined below -1. MAPE is in percent, over parsed rows whose truth != 0
    (None if there are none). R^2 is None with fewer than 2 parsed rows or constant truths.
    Rates are over ALL n rows, an unparseable prediction counting as a miss (None when n == 0).
    A None or non-finite prediction is unparseable; a non-finite truth raises ValueError.
    """
    _check_inputs(truths, preds)
    if not all(_is_finite_number(t) for t in truths):
        raise ValueError("every truth must be a finite number")
    ok = [i for i, p in enumerate(preds) if p is not None and _is_finite_number(p)]
    t = np.array([truths[i] for i in ok], dtype=float)
    p = np.array([preds[i] for i in ok], dtype=float)
    thresholds = {"hit_abs": hit_abs, "hit_rel": hit_rel, "near_abs": near_abs, "near_rel": near_rel}
    cats = [category(tr, pr, **thresholds) for tr, pr in zip(truths, preds)]
    n = len(truths)

    def rate(name: str) -> float | None:
        return cats.count(name) / n if n else None

    return {
        "n": n,
        "parsed": len(ok),
        "unparseable": n - len(ok),
        **_error_metrics(t, p),
        "hit_rate": rate("hit"),
        "near_rate": rate("near"),
        "miss_rate": rate("miss"),
    }


def normalize_text(s: Any) -> str:
    """Lowercase, strip, collapse whitespace and strip surrounding quotes/punctuation.

    Only quotes, brackets, sentence punctuation (.,;:!?) and markdown emphasis (* `) are stripped
    from the ends; "-", "+", "$", "%" and "#" are kept because they change the meaning of an answer.
    None gives "".
    """
    if s is None:
        return ""
    text = " ".join(str(s).lower().split())
    while True:
        stripped = text.strip(_EDGE_CHARS).strip()
        if stripped == text:
            return text
        text = stripped


def exact_metrics(truths: Sequence[str], preds: Sequence[str | None]) -> dict[str, Any]:
    """Normalised exact match: n, correct, accuracy (None when n == 0). A None prediction is wrong."""
    _check_inputs(truths, preds)
    correct = sum(p is not None and normalize_text(t) == normalize_text(p) for t, p in zip(truths, preds))
    n = len(truths)
    return {"n": n, "correct": correct, "accuracy": correct / n if n else None}


def parse_choice(text: Any, labels: Sequence[str]) -> str | None:
    """The label the output names first (as a whole word, after normalisation), else None.

    The earliest mention wins, so an output that starts with a label returns that label; when two
    labels match at the same position (e.g. "new" and "new york") the longest wins. Returns the
    label as given in ``labels``.
    """
    if not isinstance(text, str):
        return None
    norm = normalize_text(text)
    best: tuple[int, int, str] | None = None  # (position, -length, label)
    for label in labels:
        key = normalize_text(label)
        if not key:
            continue
        found = re.search(rf"(?<!\w){re.escape(key)}(?!\w)", norm)
        if found is None:
            continue
        candidate = (found.start(), -len(key), label)
        if best is None or candidate[:2] < best[:2]:
            best = candidate
    return best[2] if best else None


def _truth_label(truth: str, labels: Sequence[str]) -> str:
    for label in labels:
        if normalize_text(label) == normalize_text(truth):
            return label
    raise ValueError(f"true answer {truth!r} is not one of the labels {list(labels)}")


def choice_metrics(truths: Sequence[str], preds_text: Sequence[str | None], labels: Sequence[str]) -> dict[str, Any]:
    """Classification score: n, accuracy, invalid (outputs naming no label) and a confusion table.

    confusion[truth_label][pred_label] counts rows; every label is a row and every row has a
    column for each label plus "<invalid>", zeros included. Truths are matched to labels after
    normalisation; a truth that is not a label raises ValueError.
    """
    _check_inputs(truths, preds_text)
    if not labels:
        raise ValueError("choice_metrics needs at least one label")
    confusion = {label: {col: 0 for col in [*labels, INVALID]} for label in labels}
    correct = invalid = 0
    for truth, text in zip(truths, preds_text):
        row = _truth_label(truth, labels)
        pred = parse_choice(text, labels)
        confusion[row][pred if pred is not None else INVALID] += 1
        invalid += pred is None
        correct += pred == row
    n = len(truths)
    return {"n": n, "accuracy": correct / n if n else None, "invalid": invalid, "confusion": confusion}


def _summarize_numeric(truths: Sequence[float], outputs: Sequence[str], thresholds: dict[str, float]) -> dict[str, Any]:
    parsed = [parse_number(o) for o in outputs]
    result = numeric_metrics(truths, parsed, **thresholds)
    result["rows"] = [
        {
            "parsed": p,
            "error": float(p - t) if p is not None else None,
            "category": category(t, p, **thresholds),
        }
        for t, p in zip(truths, parsed)
    ]
    return result


def summarize(task: str, truths: Sequence[Any], outputs: Sequence[str], **thresholds: Any) -> dict[str, Any]:
    """Parse raw model outputs for ``task`` and return its metrics dict plus per-row "rows".

    task "numeric": rows {"parsed": float|None, "error": pred - truth (signed) or None, "category"};
         accepts hit_abs/hit_rel/near_abs/near_rel.
    task "exact":   rows {"parsed": normalised text, "correct": bool}.
    task "choice":  needs labels=[...]; rows {"parsed": label|None, "correct": bool}.
    Numeric thresholds are ignored by "exact"/"choice" (so one config can feed every task); any
    other keyword, or an unknown task, raises ValueError.
    """
    labels = thresholds.pop("labels", None)
    unknown = set(thresholds) - set(THRESHOLD_KEYS)
    if unknown:
        raise ValueError(f"unknown summarize option(s): {sorted(unknown)}; allowed: labels, {', '.join(THRESHOLD_KEYS)}")
    if task == "numeric":
        return _summarize_numeric(truths, outputs, thresholds)
    if task == "exact":
        result = exact_metrics(truths, outputs)
        result["rows"] = [
            {"parsed": normalize_text(o), "correct": o is not None and normalize_text(t) == normalize_text(o)}
            for t, o in zip(truths, outputs)
        ]
        return result
    if task == "choice":
        if not labels:
            raise ValueError('task "choice" needs labels=[...]')
        result = choice_metrics(truths, outputs, labels)
        parsed = [parse_choice(o, labels) for o in outputs]
        result["rows"] = [{"parsed": p, "correct": p == _truth_label(t, labels)} for t, p in zip(truths, parsed)]
        return result
    raise ValueError(f"unknown task {task!r}; expected one of: numeric, exact, choice")


# --------------------------------------------------------------------------------------------
# Distribution of the predictions: a model that answers (almost) the same number for every row
# can still beat an untrained base on MAE. These numbers and the constant / majority baselines
# below tell that apart from learning.

COLLAPSE_MIN_DISTINCT = 10  # fewer distinct parsed answers than this (or than the truths have) = collapsed
COLLAPSE_MIN_SPREAD = 0.25  # std(predictions) / std(truths) below this = collapsed


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties sharing the mean of their positions ([10, 20, 20, 30] -> [1, 2.5, 2.5, 4])."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(x.size, dtype=float)
    sorted_x = x[order]
    start = 0
    while start < x.size:
        end = start
        while end + 1 < x.size and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; None with fewer than 2 points or when either side is constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.size != b.size:
        raise ValueError(f"pearson: lengths differ: {a.size} != {b.size}")
    if a.size < 2 or a.max() == a.min() or b.max() == b.min():
        return None
    da, db = a - a.mean(), b - b.mean()
    return float(np.sum(da * db) / math.sqrt(float(np.sum(da**2)) * float(np.sum(db**2))))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation: Pearson of the average ranks (ties averaged); None as for pearson."""
    if len(x) != len(y):
        raise ValueError(f"spearman: lengths differ: {len(x)} != {len(y)}")
    if len(x) < 2:
        return None
    return pearson(average_ranks(x), average_ranks(y))


def prediction_stats(truths: Sequence[float], preds: Sequence[float | None]) -> dict[str, Any]:
    """How the parsed predictions spread and follow the truth.

    Keys: distinct (distinct parsed values), truth_distinct (distinct truths, all rows), spread_ratio
    (population std of the parsed predictions / std of their rows' truths; None when those truths are
    constant or nothing parsed), pearson, spearman, r2 (parsed rows, as numeric_metrics), collapsed
    (bool) and collapse_reasons (list of str): fewer than min(COLLAPSE_MIN_DISTINCT, truth_distinct)
    distinct answers, or spread_ratio < COLLAPSE_MIN_SPREAD. Nothing parsed is no collapse (there is
    no answer to be constant; the unparseable count says what happened).
    """
    _check_inputs(truths, preds)
    ok = [i for i, p in enumerate(preds) if p is not None and _is_finite_number(p)]
    t = np.array([truths[i] for i in ok], dtype=float)
    p = np.array([preds[i] for i in ok], dtype=float)
    spread = float(p.std() / t.std()) if t.size and t.std() > 0 else None
    stats = {
        "distinct": int(np.unique(p).size),
        "truth_distinct": len(set(map(float, truths))),
        "spread_ratio": spread,
        "pearson": pearson(t, p),
        "spearman": spearman(t, p),
        "r2": _error_metrics(t, p)["r2"],
    }
    stats["collapse_reasons"] = collapse_reasons(stats) if ok else []
    stats["collapsed"] = bool(stats["collapse_reasons"])
    return stats


def collapse_reasons(stats: dict[str, Any]) -> list[str]:
    """Why prediction_stats' numbers look like a (near-)constant answer; [] when they do not."""
    reasons = []
    need = min(COLLAPSE_MIN_DISTINCT, stats["truth_distinct"])
    if stats["distinct"] < need:
        reasons.append(f"fewer than {need} distinct answers")
    if stats["spread_ratio"] is not None and stats["spread_ratio"] < COLLAPSE_MIN_SPREAD:
        reasons.append(f"spread under {COLLAPSE_MIN_SPREAD:.0%} of the truths'")
    return reasons


def answer_stats(truths: Sequence[str], parsed: Sequence[str | None]) -> dict[str, Any]:
    """exact/choice: distinct parsed (normalised) answers vs distinct truths; collapsed when a model
    gives one answer for every row it answers while the truths have several."""
    _check_inputs(truths, parsed)
    answers = {normalize_text(a) for a in parsed if a is not None and normalize_text(a)}
    truth_set = {normalize_text(t) for t in truths}
    reasons = [f"one answer for {len(truth_set)} distinct truths"] if len(answers) == 1 < len(truth_set) else []
    return {"distinct": len(answers), "truth_distinct": len(truth_set), "spread_ratio": None,
            "collapsed": bool(reasons), "collapse_reasons": reasons}


def median_answer(texts: Sequence[Any]) -> tuple[float | None, int]:
    """(median of the numbers parsed from `texts`, how many parsed): the constant baseline's answer."""
    values = [v for v in (parse_number(t) for t in texts) if v is not None]
    return (float(np.median(values)) if values else None), len(values)


def majority_answer(texts: Sequence[Any]) -> tuple[str | None, int]:
    """(most common answer after normalize_text, its count); a tie goes to the one seen first.
    Returns the first original spelling of that answer."""
    counts: dict[str, int] = {}
    first: dict[str, str] = {}
    for text in texts:
        key = normalize_text(text)
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, str(text))
    if not counts:
        return None, 0
    best = max(counts, key=lambda k: counts[k])  # max keeps the first of equal counts (dict order)
    return first[best], counts[best]


def baseline_metrics(task: str, truths: Sequence[Any], answer: Any, **options: Any) -> dict[str, Any]:
    """Score one constant `answer` for every row with exactly the metrics `summarize` gives the models
    (a float for "numeric", a text for "exact"/"choice"; `options` as for summarize). No "rows"."""
    n = len(truths)
    if task == "numeric":
        thresholds = {k: v for k, v in options.items() if k in THRESHOLD_KEYS}
        return numeric_metrics(truths, [answer] * n, **thresholds)
    result = summarize(task, truths, [answer] * n, **options)
    result.pop("rows")
    return result


# --------------------------------------------------------------------------------------------
# The answers of rendered examples (train/data.py's examples: prompt/completion or messages)


def truth_of(example: dict[str, Any]) -> str | None:
    """The answer a rendered example teaches: its completion, or its last assistant turn; None for text."""
    if "messages" in example:
        return [m["content"] for m in example["messages"] if m["role"] == "assistant"][-1]
    return example.get("completion")


def train_answers(examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The baselines' answers from rendered train examples: the median number (numeric) and the most
    common answer (exact/choice). Also what `adapter.save` can keep in training_meta.json."""
    texts = [t for t in (truth_of(ex) for ex in examples) if t is not None]
    median, parsed = median_answer(texts)
    majority, count = majority_answer(texts)
    return {"rows": len(texts), "median": median, "median_parsed": parsed, "majority": majority,
            "majority_count": count}


# --------------------------------------------------------------------------------------------
# One comparison, on the same rows. A model that parses 4 of 40 rows and one that parses all 40
# cannot be compared on their own rows: the 4 may be the easy ones. So the error and correlation
# metrics of every model (and of the constant baseline) are taken on the rows ALL of them parsed;
# the rates (hit/near/miss) stay over all rows, an unparseable answer a miss, which is the same
# rows for everyone already. Each model's own-rows numbers are kept under "own_rows", labelled.

# Fewer common rows than this is flagged: at 30 rows a Pearson r's 95% interval is still about
# +-0.36 (Fisher z, 1.96 / sqrt(n - 3)), so smaller samples cannot separate models' correlations,
# and a MAE over fewer rows moves with one or two outliers.
FEW_ROWS = 30
# Fewer than this share of the evaluated rows in common is flagged too, whatever the count: the
# comparison is then on the rows the weakest parser could answer, a selection, not the eval set.
FEW_SHARE = 0.5
COMMON_KEYS = ("mae", "rmse", "rmsle", "mape", "r2", "distinct", "truth_distinct", "spread_ratio", "pearson",
               "spearman")  # what moves to the common rows; n, parsed, unparseable and the rates stay over all rows
OWN_ROWS_NOTE = ("this model's own parsed rows: NOT comparable across models (each parsed different rows); "
                 "the comparison is under task")


def common_rows(preds_by_model: dict[str, Sequence[Any]]) -> list[int]:
    """0-based indices of the rows where every model's prediction parsed (a finite number)."""
    lengths = {len(p) for p in preds_by_model.values()}
    if len(lengths) > 1:
        raise ValueError(f"predictions differ in length: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    return [i for i in range(n) if all(_is_finite_number(p[i]) for p in preds_by_model.values())]


def few_rows_reason(common: int, total: int) -> str | None:
    """Why a comparison on `common` of `total` rows rests on few rows (FEW_ROWS, FEW_SHARE); None if it does not."""
    if common < FEW_ROWS:
        return f"only {common} rows compared (under {FEW_ROWS}): the differences between models are mostly noise"
    if common < FEW_SHARE * total:
        return (f"{common} of {total} rows every model parsed (under {FEW_SHARE:.0%}): a selection of the rows "
                "the weakest parser could answer, not the eval set")
    return None


def scores_on_rows(truths: Sequence[float], preds: Sequence[float | None], rows: Sequence[int],
                   stats: bool = True, **thresholds: float) -> dict[str, Any]:
    """numeric_metrics over all rows (n, parsed, unparseable, rates), with COMMON_KEYS taken on `rows` only
    (prediction_stats' spread and correlations too when `stats`); "common_rows" says how many."""
    out = numeric_metrics(truths, preds, **thresholds)
    t = np.array([truths[i] for i in rows], dtype=float)
    p = np.array([preds[i] for i in rows], dtype=float)
    out.update(_error_metrics(t, p))
    if stats:
        s = prediction_stats(t.tolist(), p.tolist())
        out.update({k: s[k] for k in COMMON_KEYS if k in s and k != "r2"})
    out["common_rows"] = len(rows)
    return out


def _parsed_counts(task: str, report: dict[str, Any], models: list[str], n: int) -> dict[str, int]:
    counts = {"baseline": n} if "task" in (report.get("baseline") or {}) else {}  # a constant always answers
    for m in models:
        if task == "numeric":
            counts[m] = sum(_is_finite_number(r["parsed"]) for r in report[m]["rows_detail"])
        else:  # exact: every output is an answer; choice: the ones naming a label
            counts[m] = sum(r["parsed"] is not None for r in report[m]["rows_detail"])
    return counts


def compare_on_common_rows(report: dict[str, Any], truths: Sequence[Any], row_ids: Sequence[Any],
                           task: str, **thresholds: Any) -> dict[str, Any]:
    """Put base, adapter and the baseline of an eval report (as evaluate_run builds it: report[m]["rows_detail"],
    report[m]["task"], report["baseline"]["task"]) on the same rows, and return what report["compared"] keeps:
    rows, of, how, row_ids, parsed (each model's own count), few_rows (bool), few_rows_reason, min_rows.

    numeric: each report[m]["task"] gets COMMON_KEYS on the rows all of them parsed (scores_on_rows); the
    numbers of its own parsed rows move to report[m]["own_rows"], labelled (OWN_ROWS_NOTE). exact/choice:
    accuracy already counts a non-answer as wrong over all rows, so every model is on all rows; nothing moves."""
    models = [m for m in ("base", "adapter") if "rows_detail" in report.get(m, {})]
    n = len(truths)
    counts = _parsed_counts(task, report, models, n)
    rows = list(range(n))
    if task == "numeric":
        preds = {m: [r["parsed"] for r in report[m]["rows_detail"]] for m in models}
        rows = common_rows(preds)
        options = {k: v for k, v in thresholds.items() if k in THRESHOLD_KEYS}
        for m in models:
            own = report[m]["task"]
            report[m]["own_rows"] = {"note": OWN_ROWS_NOTE, "parsed": own["parsed"], **{k: own.get(k) for k in COMMON_KEYS}}
            report[m]["task"] = {**report[m]["task"], **scores_on_rows(truths, preds[m], rows, **options)}
        baseline = report.get("baseline") or {}
        if "task" in baseline:
            constant = [baseline["answer"]] * n
            baseline["own_rows"] = {"note": "every row (a constant always parses)", **baseline["task"]}
            baseline["task"] = scores_on_rows(truths, constant, rows, stats=False, **options)
    reason = few_rows_reason(len(rows), n)
    how = "the rows every model parsed" if task == "numeric" else "all rows, a non-answer counting as wrong"
    return {"rows": len(rows), "of": n, "how": how, "row_ids": [row_ids[i] for i in rows], "parsed": counts,
            "few_rows": reason is not None, "few_rows_reason": reason, "min_rows": FEW_ROWS}


def compared_lines(compared: dict[str, Any]) -> list[str]:
    """The summary's lines about the comparison's rows: how many, each model's parsed count, and the few-rows flag."""
    parsed = ", ".join(f"{m} {c}" for m, c in compared["parsed"].items())
    rates = "; hit/near/miss rates over all rows, an unparseable answer a miss" if "parsed" in compared["how"] else ""
    lines = [f"compared on {compared['rows']} of {compared['of']} rows: {compared['how']} (parsed: {parsed}){rates}"]
    if compared["few_rows"]:
        lines.append(f"FEW ROWS: {compared['few_rows_reason']}")
    return lines
