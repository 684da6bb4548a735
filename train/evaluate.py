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
from train import checkpoints, data, metrics
from train import model as model_lib
from train.config import Config, from_dict, parse_override, set_dotted
from train.errors import UserError
from train.trainer import precision_context

log = logging.getLogger("train")


# --------------------------------------------------------------------------------------------
# Eval examples: prompt tokens to generate from, truth text, tokens+labels for the loss


def eval_examples(split: data.Split, tok, cfg: Config) -> list[dict[str, Any]]:
    out = []
    for ex, enc, row_id in zip(split.examples, split.encoded, split.row_ids):
        if "messages" in ex:
            last = max(i for i, m in enumerate(ex["messages"]) if m["role"] == "assistant")
            prompt_ids = data.chat_ids(tok, ex["messages"][:last], True, split.source)
            prompt_text, truth = tok.decode(prompt_ids), ex["messages"][last]["content"]
        elif "prompt" in ex:
            prompt_ids, prompt_text, truth = enc.prompt_ids, ex["prompt"], ex["completion"]
        else:
            prompt_ids, prompt_text, truth = None, None, None
        out.append({"id": row_id, "prompt_ids": prompt_ids, "prompt": prompt_text, "truth": truth, "enc": enc,
                    "source": split.source})
    return out


# --------------------------------------------------------------------------------------------
# Loss


@torch.no_grad()
def completion_loss(model, examples: list[dict[str, Any]], pad_id: int, batch_size: int) -> dict[str, float]:
    """Token-weighted mean NLL over label tokens (completion/assistant tokens only) and perplexity."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = [e["enc"] for e in examples[start : start + batch_size]]
        width = max(len(b.input_ids) for b in batch)
        ids = torch.tensor([b.input_ids + [pad_id] * (width - len(b.input_ids)) for b in batch], device=device)
        att = torch.tensor([[1] * len(b.input_ids) + [0] * (width - len(b.input_ids)) for b in batch], device=device)
        labels = torch.tensor([b.labels + [data.IGNORE] * (width - len(b.labels)) for b in batch], device=device)
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        target = labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                ignore_index=data.IGNORE, reduction="sum")
        total += nll.item()
        count += int((target != data.IGNORE).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


# --------------------------------------------------------------------------------------------
# Generation and task metrics


@torch.no_grad()
def generate(model, tok, examples: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Batched greedy decoding with left padding (so every row's last prompt token is aligned)."""
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(examples), batch_size):
        prompts = [e["prompt_ids"] for e in examples[start : start + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts], device=device)
        att = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        outputs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outputs


def thresholds(cfg: Config) -> dict[str, float]:
    e = cfg.eval
    return {"hit_abs": e.hit_abs, "hit_rel": e.hit_rel, "near_abs": e.near_abs, "near_rel": e.near_rel}


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


def task_scores(model, tok, examples, cfg: Config) -> tuple[dict[str, Any], list[str]]:
    outputs = generate(model, tok, examples, cfg.eval.max_new_tokens, cfg.eval.batch_size)
    extra = {"labels": cfg.eval.labels} if cfg.eval.task == "choice" else {}
    scores = metrics.summarize(cfg.eval.task, truths_for_task(examples, cfg), outputs, **thresholds(cfg), **extra)
    return scores, outputs


def training_scorer(cfg: Config, tok, split: data.Split | None):
    """Task metric on the first eval.during_training_limit eval rows, as flat eval_* scalars."""
    if cfg.eval.task == "none" or split is None:
        return None
    examples = eval_examples(split, tok, cfg)[: cfg.eval.during_training_limit]
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
# `train eval RUN_DIR`


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


def evaluate_run(target: str, data: str | None = None, limit: int | None = None, overrides=()) -> dict[str, Any]:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    adapter_dir = adapter_lib.find_adapter(target)
    cfg = resolve_eval_config(adapter_dir, data, limit, overrides)
    run = adapter_dir.parent if adapter_dir.name == "adapter" else adapter_dir
    # base and eval rows first: a wrong base or bad data fails in milliseconds, before the weights load
    adapter_lib.check_same_base(adapter_dir, model_lib.resolve_model_path(cfg.model))
    tok = model_lib.load_tokenizer(str(adapter_dir), cfg.model, padding_side="left")
    split = load_eval_split(cfg, tok)
    examples = eval_examples(split, tok, cfg)[: cfg.eval.limit or None]
    if cfg.eval.task != "none":
        truths_for_task(examples, cfg)
    model, tok, _ = adapter_lib.load(adapter_dir, cfg, tok)
    log.info("evaluating %d rows (%s), base vs base + adapter", len(examples), split.source)
    report: dict[str, Any] = {"rows": len(examples), "source": split.source, "task": cfg.eval.task,
                              "settings": {"max_new_tokens": cfg.eval.max_new_tokens, **thresholds(cfg)}}
    outputs = {}
    for name, ctx in (("base", adapter_off(model)), ("adapter", contextlib.nullcontext())):
        with ctx, precision_context(cfg):
            report[name] = completion_loss(model, examples, tok.pad_token_id, cfg.eval.batch_size)
            if cfg.eval.task != "none":
                scores, outputs[name] = task_scores(model, tok, examples, cfg)
                report[name]["rows_detail"] = scores.pop("rows")
                report[name]["task"] = scores
    write_outputs(run / "eval", report, examples, outputs, cfg)
    print_summary(report)
    return report


def write_outputs(out: Path, report: dict[str, Any], examples, outputs: dict[str, list[str]], cfg: Config) -> None:
    from train import charts

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
            str(charts.numeric_scatter(out / "scatter.png", truths, preds["base"], preds["adapter"], thresholds(cfg))),
            str(charts.error_histogram(out / "errors.png", truths, preds["base"], preds["adapter"])),
        ]
    metrics_file = out.parent / "metrics.jsonl"
    if metrics_file.is_file():
        rows = [json.loads(x) for x in metrics_file.read_text().splitlines() if x.strip()]
        report.setdefault("charts", []).append(str(charts.loss_curves(out / "curves.png", rows)))
    checkpoints.write_atomic(out / "report.json", json.dumps(report, indent=1, default=str))


def print_summary(report: dict[str, Any]) -> None:
    keys = ["loss", "perplexity"]
    task = report["adapter"].get("task", {})
    keys += [k for k in ("mae", "rmse", "rmsle", "mape", "r2", "hit_rate", "unparseable", "accuracy") if k in task]
    lines = [f"{'metric':<12} {'base':>12} {'adapter':>12}"]
    for k in keys:
        b = report["base"].get(k, report["base"].get("task", {}).get(k))
        a = report["adapter"].get(k, task.get(k))
        lines.append(f"{k:<12} {_fmt(b):>12} {_fmt(a):>12}")
    print("\n".join(lines))


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def generate_text(target: str, prompts: list[str], max_new_tokens: int | None = None) -> list[str]:
    """`train generate`: the adapter on its quantized base, greedy, for a quick look."""
    adapter_dir = adapter_lib.find_adapter(target)
    cfg = adapter_lib.load_config_of(adapter_dir)
    model, tok, _ = adapter_lib.load(adapter_dir, cfg)
    examples = []
    for text in prompts:
        if cfg.data.format == "messages":
            ids = data.chat_ids(tok, [{"role": "user", "content": text}], True, "--prompt")
        else:
            ids = tok(text)["input_ids"]
        examples.append({"prompt_ids": ids})
    with precision_context(cfg):
        return generate(model, tok, examples, max_new_tokens or cfg.eval.max_new_tokens, cfg.eval.batch_size)
