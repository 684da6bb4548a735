"""Evaluation: completion loss/perplexity and task metrics, base alone vs base + adapter, same rows.

Base and adapter share one loaded model: the base numbers come from `disable_adapter()`, so both
see the identical 4-bit weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from train import adapter as adapter_lib
from train import checkpoints, data
from train.eval import metrics, one_pass
from train import model as model_lib
from train.config import Config, from_dict, parse_override, set_dotted, template_fields
from train.errors import UserError
from train.loss import row_nll
from train.precision import precision_context

log = logging.getLogger("train")


# --------------------------------------------------------------------------------------------
# Eval examples: prompt tokens to generate from, truth text, tokens+labels for the loss


def eval_examples(split: data.Split, tok, cfg: Config) -> list[dict[str, Any]]:
    out = []
    for ex, enc, row_id in zip(split.examples, split.encoded, split.row_ids):
        truth = metrics.truth_of(ex)
        if "messages" in ex:
            last = max(i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant")
            prompt_ids = data.chat_ids(tok, ex["messages"][:last], True, split.source)
            prompt_text = tok.decode(prompt_ids)
        elif "prompt" in ex:
            prompt_ids, prompt_text = enc.prompt_ids, ex["prompt"]
        else:
            prompt_ids, prompt_text = None, None
        out.append({"id": row_id, "prompt_ids": prompt_ids, "prompt": prompt_text, "truth": truth, "enc": enc,
                    "source": split.source})
    return out


# --------------------------------------------------------------------------------------------
# Loss


@torch.no_grad()
def completion_loss(model, examples: list[dict[str, Any]], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted mean NLL over label tokens (completion/assistant tokens only) and perplexity: loss.row_nll,
    the definition of the Trainer's eval loss too (tests/test_eval_loss.py checks they agree)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = [e["enc"] for e in examples[start : start + batch_size]]
        width = max(len(b.input_ids) for b in batch)
        ids = torch.tensor([b.input_ids + [pad_id] * (width - len(b.input_ids)) for b in batch], device=device)
        att = torch.tensor([[1] * len(b.input_ids) + [0] * (width - len(b.input_ids)) for b in batch], device=device)
        labels = torch.tensor([b.labels + [data.IGNORE] * (width - len(b.labels)) for b in batch], device=device)
        rows = row_nll(model, {"input_ids": ids, "attention_mask": att, "labels": labels})
        total += rows[:, 0].double().sum().item()
        count += int(rows[:, 1].sum())
    return loss_summary(total, count)


def loss_summary(total: float, count: int) -> dict[str, float]:
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def loss_and_answers(model, tok, examples: list[dict[str, Any]], cfg: Config, answers: bool):
    """completion_loss and (when `answers`) generate's outputs. Where every row is generated from the prefix its
    loss tokens follow, one forward per batch gives both (one_pass.py: the prompt runs once, not twice)."""
    if not all(one_pass.shares_prompt(e) for e in examples):
        loss = completion_loss(model, examples, tok.pad_token_id, cfg.eval.batch_size)
        return loss, generate(model, tok, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size) if answers else None
    stops, size = stop_ids(model, tok), cfg.eval.batch_size
    total, count, outputs = 0.0, 0, []
    for start in range(0, len(examples), size):
        rows, gen = one_pass.loss_and_answers(model, examples[start : start + size], tok.pad_token_id, stops,
                                              cfg.eval.max_new_tokens if answers else None)
        total += rows[:, 0].double().sum().item()
        count += int(rows[:, 1].sum())
        outputs += tok.batch_decode(gen, skip_special_tokens=True) if answers else []
    return loss_summary(total, count), outputs if answers else None


# --------------------------------------------------------------------------------------------
# Generation and task metrics


END_OF_TURN_PROBE = "\u2063answer\u2063"  # assistant text no template alters: what follows it closes the turn


def end_of_turn_id(tok) -> int | None:
    """The special token the chat template writes right after an assistant message (<|im_end|>,
    <end_of_turn>, <|eot_id|>, <|end|>, </s>); None without a template or where plain text follows."""
    from jinja2 import TemplateError

    if not getattr(tok, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_OF_TURN_PROBE}]
    try:
        text = tok.apply_chat_template(turns, tokenize=False)
    except (TemplateError, ValueError, TypeError, KeyError):  # a template that wants other turns: no stop from it
        return None
    if END_OF_TURN_PROBE not in text:
        return None
    after = text[text.index(END_OF_TURN_PROBE) + len(END_OF_TURN_PROBE):].lstrip()
    ids = tok(after, add_special_tokens=False)["input_ids"] if after else []
    return ids[0] if ids and ids[0] in tok.all_special_ids else None


def stop_ids(model, tok) -> list[int]:
    """Every token that ends an answer: the model's generation_config EOS ids (instruct models list their
    end-of-turn ids there), the tokenizer's EOS (what prompt_completion training appends) and the chat
    template's end of turn (end_of_turn_id)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return list(dict.fromkeys(i for i in [*listed, tok.eos_token_id, end_of_turn_id(tok)] if i is not None))


@torch.no_grad()
def generate(model, tok, examples: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Batched greedy decoding with left padding (so every row's last prompt token is aligned), each row
    stopping at any of stop_ids."""
    device = next(model.parameters()).device
    stops = stop_ids(model, tok)
    outputs = []
    for start in range(0, len(examples), batch_size):
        prompts = [e["prompt_ids"] for e in examples[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=stops)
        outputs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outputs


def thresholds(cfg: Config) -> dict[str, float]:
    e = cfg.eval
    return {"hit_abs": e.hit_abs, "hit_rel": e.hit_rel, "near_abs": e.near_abs, "near_rel": e.near_rel}


def task_options(cfg: Config) -> dict[str, Any]:
    """Keyword options of metrics.summarize for the run's task: thresholds, plus labels for choice."""
    extra = {"labels": cfg.eval.labels} if cfg.eval.task == "choice" else {}
    return {**thresholds(cfg), **extra}


def truths_for_task(examples: list[dict[str, Any]], cfg: Config) -> list[Any]:
    task = cfg.eval.task
    if any(e["prompt_ids"] is None for e in examples):
        raise UserError(f"eval.task={task} needs prompts to generate from; data.format=text has none (set task: none)")
    if task != "numeric":
        return [e["truth"] for e in examples]
    truths = []
    for e in examples:
        value = metrics.parse_number(e["truth"])
        if value is None:
            raise UserError(f"{e['source']}: row {e['id']}: truth {e['truth']!r} has no number; eval.task=numeric needs "
                            "numeric completions (or set eval.task: exact)")
        truths.append(value)
    return truths


def task_scores(model, tok, examples, cfg: Config,
                outputs: list[str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """summarize()'s metrics and rows, plus how the answers spread (metrics.prediction_stats /
    answer_stats: distinct, spread_ratio, pearson, spearman, collapsed, collapse_reasons). `outputs`: the
    answers when already generated (loss_and_answers), else they are generated here."""
    if outputs is None:
        outputs = generate(model, tok, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    truths = truths_for_task(examples, cfg)
    scores = metrics.summarize(cfg.eval.task, truths, outputs, **task_options(cfg))
    parsed = [row["parsed"] for row in scores["rows"]]
    if cfg.eval.task == "numeric":
        stats = metrics.prediction_stats(truths, parsed)
        stats.pop("r2")  # the same number summarize already gives
    else:
        stats = metrics.answer_stats(truths, parsed)
    scores.update(stats)
    return scores, outputs


# --------------------------------------------------------------------------------------------
# Which eval rows: eval.limit / eval.during_training_limit rows, a seeded sample or the first ones

SAMPLE_CHOICES = ("random", "first")


def sample_how(cfg: Config) -> str:
    how = getattr(cfg.eval, "sample", "random")  # default random: the file's head is often not typical
    if how not in SAMPLE_CHOICES:
        raise UserError(f"eval.sample: {how!r} is not one of {', '.join(SAMPLE_CHOICES)}; set eval.sample: random")
    return how


def sample_examples(examples: list[dict[str, Any]], limit: int | None, how: str,
                    seed: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """At most `limit` examples (None = all), kept in file order, and a record of which.

    how "random": a seeded sample: the first `limit` of one seeded shuffle, so the same seed always
    gives the same rows and a smaller limit gives a subset of a larger one (the during-training rows
    are among `train eval`'s). how "first": the first `limit` rows."""
    n = len(examples)
    keep = data.sample_indices(n, limit, how, seed)
    if len(keep) == n:
        how = "all"
    chosen = [examples[i] for i in keep]
    record = {"count": len(chosen), "of": n, "how": how, "seed": seed if how == "random" else None,
              "row_ids": [e["id"] for e in chosen]}
    return chosen, record


def training_scorer(cfg: Config, tok, split: data.Split | None):
    """Task metric on eval.during_training_limit eval rows (sampled as eval.sample), as flat eval_* scalars."""
    if cfg.eval.task == "none" or split is None:
        return None
    examples, _ = sample_examples(eval_examples(split, tok, cfg), cfg.eval.during_training_limit,
                                  sample_how(cfg), cfg.run.seed)
    truths_for_task(examples, cfg)  # bad truths fail now, before training, not at the first eval

    def score(model) -> dict[str, float]:
        was_training = model.training
        model.eval()
        with precision_context(cfg):
            scores, _ = task_scores(model, tok, examples, cfg)
        model.train(was_training)
        return {f"eval_{k}": float(v) for k, v in scores.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None}

    return score


@contextlib.contextmanager
def adapter_off(model):
    with model.disable_adapter():
        yield


# --------------------------------------------------------------------------------------------
# Baselines: what a model that learned nothing but the answers' distribution scores


def read_train_answers(cfg: Config) -> dict[str, Any]:
    """train_answers of the run's train split (data.train minus held-out rows, as rendered for training;
    rows later dropped for length are still counted). Raises UserError when data.train cannot be read."""
    sel = data.select_rows(cfg)
    examples = [data.to_example(row, cfg.data, f"{cfg.data.train}: row {n}")
                for row, n in zip(sel["train"], sel["train_ids"])]
    return {**metrics.train_answers(examples), "from": f"train split of {cfg.data.train}", "note": None}


def find_train_answers(cfg: Config, adapter_dir: Path, examples: list[dict[str, Any]]) -> dict[str, Any]:
    """The train split's answers; else those saved at fit time (training_meta.json "train_answers");
    else the evaluated rows' own, with a note saying so (an optimistic baseline: it has seen the answers)."""
    try:
        return read_train_answers(cfg)
    except UserError as e:
        why = str(e)
    meta_path = adapter_dir / adapter_lib.META
    saved = json.loads(meta_path.read_text()).get("train_answers") if meta_path.is_file() else None
    if saved:
        return {**saved, "from": f"{meta_path} (saved at fit time)", "note": f"train data not readable: {why}"}
    return {**metrics.train_answers(examples), "from": "the evaluated rows themselves",
            "note": f"train data not readable ({why}) and {meta_path.name} keeps no train answers: the baseline "
                    "uses the eval rows' own answers, so it is optimistic (it has seen the truths)"}


def baseline_report(cfg: Config, answers: dict[str, Any], truths: list[Any]) -> dict[str, Any]:
    """The constant baseline scored like the models: train median (numeric) or majority answer."""
    task = cfg.eval.task
    kind, answer = ("median", answers["median"]) if task == "numeric" else ("majority", answers["majority"])
    report = {"kind": f"constant {kind} of the train answers", "answer": answer, "from": answers["from"],
              "note": answers["note"], "train_rows": answers["rows"]}
    if answer is None:
        report["note"] = f"no train answer to take the {kind} of ({answers['from']}); baseline not scored"
        return report
    report["task"] = metrics.baseline_metrics(task, truths, answer, **task_options(cfg))
    return report


def warn_collapse(name: str, entry: dict[str, Any]) -> None:
    """One loud line when a model's answers look constant (metrics.collapse_reasons)."""
    if not entry.get("collapsed"):
        return
    task = entry.get("own_rows") or entry["task"]  # collapse is about a model's own answers, all it parsed
    spread = task.get("spread_ratio")
    log.warning("%s: PREDICTION COLLAPSE: %d distinct answers, spread %s of the truths' (%s); the metric gains "
                "may be a constant answer, not learning: compare with the baseline column", name,
                task["distinct"], "n/a" if spread is None else f"{spread:.1%}", "; ".join(entry["collapse_reasons"]))


# --------------------------------------------------------------------------------------------
# `train eval RUN_DIR`


def find_run(target: str) -> Path:
    """RUN_DIR or ADAPTER_DIR -> the adapter directory; a missing path says so, before looking inside."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{target}: no such folder; pass the run directory `train fit` wrote (run.output_dir)")
    if not path.is_dir():
        raise UserError(f"{target}: not a folder; pass the run directory `train fit` wrote (run.output_dir)")
    return adapter_lib.find_adapter(path)


def resolve_eval_config(adapter_dir: Path, data_path: str | None, limit: int | None, overrides) -> Config:
    raw = adapter_lib.load_config_of(adapter_dir).to_dict()
    for item in overrides:
        set_dotted(raw, *parse_override(item))
    if data_path:
        raw["data"].update({"eval": data_path, "eval_fraction": 0.0})
    if limit is not None:  # evaluate_run has checked it is >= 1
        raw["eval"]["limit"] = limit
    return from_dict(raw, source=f"{adapter_dir / 'config.yaml'}")


def load_eval_split(cfg: Config, tok) -> data.Split:
    if cfg.data.eval is None and cfg.data.eval_fraction == 0:
        raise UserError("no eval data: set data.eval or data.eval_fraction, or pass --data FILE")
    _, split = data.load_splits_eval_only(cfg, tok)
    return split


def prepare_eval(target: str, data_path: str | None, limit: int | None, overrides):
    """Everything before the weights load, so a wrong base or bad data fails in milliseconds:
    (adapter_dir, cfg, tok, examples, report with rows/sample/baseline)."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    adapter_dir = find_run(target)
    cfg = resolve_eval_config(adapter_dir, data_path, limit, overrides)
    data.check_data_record(cfg, adapter_dir)  # a data file changed since fit: refuse or warn (eval.on_data_change)
    adapter_lib.check_same_base(adapter_dir, model_lib.resolve_model_path(cfg.model))
    tok = model_lib.load_tokenizer(str(adapter_dir), cfg.model, padding_side="left")
    split = load_eval_split(cfg, tok)
    examples, sample = sample_examples(eval_examples(split, tok, cfg), cfg.eval.limit, sample_how(cfg), cfg.run.seed)
    report: dict[str, Any] = {"rows": len(examples), "sample": sample, "source": split.source, "task": cfg.eval.task,
                              "settings": {"max_new_tokens": cfg.eval.max_new_tokens, **thresholds(cfg)}}
    if cfg.eval.task != "none":
        truths = truths_for_task(examples, cfg)
        trained = adapter_lib.load_config_of(adapter_dir)  # the train split as fit saw it, whatever --data/--set say
        report["baseline"] = baseline_report(cfg, find_train_answers(trained, adapter_dir, examples), truths)
    return adapter_dir, cfg, tok, examples, report


def evaluate_run(target: str, data: str | None = None, limit: int | None = None, overrides=()) -> dict[str, Any]:
    adapter_dir, cfg, tok, examples, report = prepare_eval(target, data, limit, overrides)
    run = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
    model, tok, _ = adapter_lib.load(adapter_dir, cfg, tok)
    log.info("evaluating %d of %d rows (%s, %s), base vs base + adapter", len(examples), report["sample"]["of"],
             report["sample"]["how"], report["source"])
    outputs = {}
    for name, ctx in (("base", adapter_off(model)), ("adapter", contextlib.nullcontext())):
        with ctx, precision_context(cfg):
            report[name], answers = loss_and_answers(model, tok, examples, cfg, cfg.eval.task != "none")
            if cfg.eval.task != "none":
                scores, outputs[name] = task_scores(model, tok, examples, cfg, answers)
                report[name]["rows_detail"] = scores.pop("rows")
                report[name]["collapsed"] = scores.pop("collapsed")
                report[name]["collapse_reasons"] = scores.pop("collapse_reasons")
                report[name]["task"] = scores
    if cfg.eval.task != "none":  # base, adapter and baseline on the rows all of them parsed (issue #22)
        report["compared"] = metrics.compare_on_common_rows(report, truths_for_task(examples, cfg),
                                                            [e["id"] for e in examples], cfg.eval.task, **thresholds(cfg))
    write_outputs(run / "eval", report, examples, outputs, cfg)
    print_summary(report)
    for name in ("base", "adapter"):
        warn_collapse(name, report[name])
    return report


def write_outputs(out: Path, report: dict[str, Any], examples, outputs: dict[str, list[str]], cfg: Config) -> None:
    from train.eval import charts

    out.mkdir(parents=True, exist_ok=True)
    details = {name: report[name].pop("rows_detail", None) for name in ("base", "adapter")}
    if outputs:
        lines = []
        for i, e in enumerate(examples):
            row = {"id": e["id"], "prompt": e["prompt"], "truth": e["truth"]}
            for name in ("base", "adapter"):
                row[f"{name}_output"] = outputs[name][i]
                row[f"{name}_parsed"] = details[name][i]
            lines.append(json.dumps(row, default=str))
        checkpoints.write_atomic(out / "predictions.jsonl", "\n".join(lines) + "\n")
    if cfg.eval.task == "numeric":
        truths = truths_for_task(examples, cfg)
        preds = {n: [d["parsed"] for d in details[n]] for n in ("base", "adapter")}
        report["charts"] = [
            str(charts.numeric_scatter(out / "scatter.png", truths, preds["base"], preds["adapter"], thresholds(cfg),
                                       baseline=report["baseline"].get("answer"))),
            str(charts.error_histogram(out / "errors.png", truths, preds["base"], preds["adapter"])),
        ]
    metrics_file = out.parent / "metrics.jsonl"
    if metrics_file.is_file():
        rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        report.setdefault("charts", []).append(str(charts.loss_curves(out / "curves.png", rows)))
    checkpoints.write_atomic(out / "report.json", json.dumps(report, indent=1, default=str))


SUMMARY_KEYS = ("mae", "rmse", "rmsle", "mape", "r2", "hit_rate", "unparseable", "accuracy", "invalid",
                "distinct", "spread_ratio", "pearson", "spearman")  # printed when the task has them


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The printed table: metric rows, columns baseline (when scored), base, adapter."""
    s = report["sample"]
    how = {"random": f"a random sample, seed {s['seed']}", "first": "the first rows", "all": "all rows"}[s["how"]]
    lines = [f"{s['count']} of {s['of']} eval rows ({how}) from {report['source']}"]
    baseline = report.get("baseline")
    if baseline is not None:
        lines.append(f"baseline: {baseline['kind']} = {_fmt(baseline['answer'])} ({baseline['from']})")
        if baseline["note"]:
            lines.append(f"baseline note: {baseline['note']}")
    if report.get("compared"):
        lines += metrics.compared_lines(report["compared"])
    cols = {"baseline": baseline.get("task", {}) if baseline else None, "base": report["base"],
            "adapter": report["adapter"]}
    cols = {k: v for k, v in cols.items() if v is not None}
    task = report["adapter"].get("task", {})
    keys = ["loss", "perplexity"] + [k for k in SUMMARY_KEYS if k in task]
    lines.append(f"{'metric':<12}" + "".join(f" {name:>12}" for name in cols))
    for k in keys:
        cells = [entry.get(k, entry.get("task", {}).get(k)) for entry in cols.values()]
        lines.append(f"{k:<12}" + "".join(f" {_fmt(v):>12}" for v in cells))
    return lines


def print_summary(report: dict[str, Any]) -> None:
    print("\n".join(summary_lines(report)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------------
# `train generate RUN --prompt TEXT`


WRAPS = ("run", "raw", "chat")  # train generate: the run's template (default), --raw, --chat


def build_prompt_ids(text: str, cfg: Config, tok, wrap: str = "run") -> tuple[list[int], str]:
    """The user's text wrapped as the run's training data was: (prompt token ids, how it was wrapped).

    wrap=raw, or data.format=text: the text unchanged. wrap=chat: one user turn through the chat
    template. Else by data.format: prompt_completion puts the text into the data.prompt template's
    one {field} (a template with none or several is an error: use --raw with the whole prompt);
    alpaca: the instruction of the alpaca prompt, no input; messages: one user turn, as chat."""
    d = cfg.data
    if wrap not in WRAPS:
        raise ValueError(f"wrap must be one of {WRAPS}, got {wrap!r}")
    if wrap == "raw" or (wrap == "run" and d.format == "text"):
        return tok(text)["input_ids"], "raw (--raw)" if wrap == "raw" else "raw (data.format=text)"
    if wrap == "chat" and not getattr(tok, "chat_template", None):
        raise UserError("--chat: this tokenizer has no chat template; pass the whole prompt with --raw")
    if wrap == "chat" or d.format == "messages":
        return data.chat_ids(tok, [{"role": "user", "content": text}], True, "--prompt"), "chat template, one user turn"
    if d.format == "alpaca":
        prompt = data.to_example({"instruction": text, "output": ""}, d, "--prompt")["prompt"]
        return tok(prompt)["input_ids"], "alpaca prompt (instruction = --prompt)"
    fields = template_fields(d.prompt)
    if len(fields) != 1:
        has = f"fields {fields}" if fields else "no {field}"
        raise UserError(f"data.prompt {d.prompt!r} has {has}, so --prompt cannot fill it; pass the whole prompt "
                        "text with --raw")
    prompt = data.render(d.prompt, {fields[0]: text}, "--prompt", "data.prompt")
    ids, cut = tok(prompt)["input_ids"], False
    if d.truncation == "prompt_middle" and d.completion_budget is not None:
        ids, cut = data.cut_prompt(ids, d.max_length - d.completion_budget)  # as training cut its prompts
    return ids, f"data.prompt template, --prompt as {{{fields[0]}}}" + (" (middle cut as in training)" if cut else "")


def generate_text(target: str, prompts: list[str], max_new_tokens: int | None = None, wrap: str = "run") -> list[str]:
    """`train generate`: the adapter on its quantized base, greedy, for a quick look. Each prompt is
    wrapped as the run's training prompts were, or as `wrap` says (build_prompt_ids)."""
    adapter_dir = find_run(target)
    cfg = adapter_lib.load_config_of(adapter_dir)
    tok = model_lib.load_tokenizer(str(adapter_dir), cfg.model, padding_side="left")
    examples = []
    for text in prompts:  # built before the weights load: a template error fails at once
        ids, how = build_prompt_ids(text, cfg, tok, wrap)
        log.info("prompt sent (%s): %r", how, tok.decode(ids))
        examples.append({"prompt_ids": ids})
    model, tok, _ = adapter_lib.load(adapter_dir, cfg, tok)
    with precision_context(cfg):
        return generate(model, tok, examples, max_new_tokens or cfg.eval.max_new_tokens, cfg.eval.batch_size)


GENERATION_SEPARATOR = "====="  # the line between two prompts' outputs


def format_generation(prompt: str, answer: str) -> str:
    """What `train generate` prints for one prompt: the text as given, a separator line, the answer."""
    return f"{prompt}\n--- answer ---\n{answer}"
