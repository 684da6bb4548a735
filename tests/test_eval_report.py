"""`train eval` baselines and collapse warnings, seeded eval-row samples, and `train generate` prompts
wrapped in the run's training template (issue #15)."""

import json
import logging

import numpy as np
import pytest

from conftest import small_config
from train import data
from train.eval import evaluate, metrics
from train.errors import UserError

TEMPLATE = "How much does this cost?\n\n{text}\n\nPrice is $"


def _examples(n):
    return [{"id": i + 1, "truth": str(i)} for i in range(n)]


# ---------------------------------------------------------------- which eval rows

def test_random_sample_is_seeded_stable_in_file_order_and_not_the_head():
    rows = _examples(50)
    a, rec = evaluate.sample_examples(rows, 10, "random", seed=7)
    b, _ = evaluate.sample_examples(rows, 10, "random", seed=7)
    ids = [e["id"] for e in a]
    assert ids == [e["id"] for e in b]  # stable across calls
    assert ids == sorted(ids) and len(set(ids)) == 10  # file order, no repeats
    assert ids != list(range(1, 11))  # not the head
    assert rec == {"count": 10, "of": 50, "how": "random", "seed": 7, "row_ids": ids}
    other, _ = evaluate.sample_examples(rows, 10, "random", seed=8)
    assert [e["id"] for e in other] != ids  # the seed matters
    small, _ = evaluate.sample_examples(rows, 4, "random", seed=7)
    assert {e["id"] for e in small} <= set(ids)  # a smaller limit is a subset (during-training rows)


def test_first_and_all():
    rows = _examples(20)
    head, rec = evaluate.sample_examples(rows, 5, "first", seed=7)
    assert [e["id"] for e in head] == [1, 2, 3, 4, 5] and rec["how"] == "first" and rec["seed"] is None
    for limit in (None, 20, 99):
        every, rec = evaluate.sample_examples(rows, limit, "random", seed=7)
        assert every == rows and rec["how"] == "all" and rec["count"] == rec["of"] == 20


def test_sample_setting(tmp_path):
    cfg = small_config(tmp_path)
    assert evaluate.sample_how(cfg) == "random"  # the default
    cfg.eval.sample = "first"
    assert evaluate.sample_how(cfg) == "first"
    cfg.eval.sample = "head"
    with pytest.raises(UserError, match="eval.sample"):
        evaluate.sample_how(cfg)


def _eval_split(cfg, tok):
    _, split = data.load_splits(cfg, tok)
    return split


def test_training_scorer_scores_the_seeded_sample(tmp_path, tiny_tok, monkeypatch):
    cfg = small_config(tmp_path, eval={"during_training_limit": 5})
    split = _eval_split(cfg, tiny_tok)
    seen = []

    def fake_scores(model, tok, examples, cfg):
        seen.append([e["id"] for e in examples])
        return {"mae": 1.0, "collapsed": False}, []

    monkeypatch.setattr(evaluate, "task_scores", fake_scores)

    class Model:
        training = True

        def eval(self):
            self.training = False

        def train(self, mode):
            self.training = mode

    out = evaluate.training_scorer(cfg, tiny_tok, split)(Model())
    assert out == {"eval_mae": 1.0}  # flat scalars; the collapse flag is no scalar
    expected, _ = evaluate.sample_examples(evaluate.eval_examples(split, tiny_tok, cfg), 5, "random", cfg.run.seed)
    assert seen == [[e["id"] for e in expected]] and seen[0] != split.row_ids[:5]
    cfg.eval.sample = "first"
    evaluate.training_scorer(cfg, tiny_tok, split)(Model())
    assert seen[1] == split.row_ids[:5]


# ---------------------------------------------------------------- baselines

def _train_truths(cfg):
    sel = data.select_rows(cfg)
    return [metrics.parse_number(data.to_example(r, cfg.data, "t")["completion"]) for r in sel["train"]]


def test_train_answers_come_from_the_train_split(tmp_path):
    cfg = small_config(tmp_path)
    answers = evaluate.find_train_answers(cfg, tmp_path, examples=[])
    truths = _train_truths(cfg)
    assert len(truths) == 64  # 80 rows minus the 16 held out for eval
    assert answers["median"] == pytest.approx(float(np.median(truths)))
    assert answers["rows"] == answers["median_parsed"] == 64 and answers["note"] is None
    assert "train split" in answers["from"]


def test_train_answers_fall_back_to_saved_meta_then_eval_rows(tmp_path):
    cfg = small_config(tmp_path, data={"train": str(tmp_path / "gone.jsonl")})
    rows = [{"truth": "10.00", "completion": "10.00"}, {"completion": "30.00"}, {"completion": "20.00"}]
    answers = evaluate.find_train_answers(cfg, tmp_path, rows)
    assert answers["median"] == 20.0 and answers["from"] == "the evaluated rows themselves"
    assert "gone.jsonl" in answers["note"] and "optimistic" in answers["note"]
    saved = {"rows": 64, "median": 99.0, "median_parsed": 64, "majority": "99.00", "majority_count": 3}
    (tmp_path / "training_meta.json").write_text(json.dumps({"train_answers": saved}))
    answers = evaluate.find_train_answers(cfg, tmp_path, rows)
    assert answers["median"] == 99.0 and "saved at fit time" in answers["from"] and "gone.jsonl" in answers["note"]


def test_baseline_report_majority_for_exact(tmp_path):
    cfg = small_config(tmp_path, eval={"task": "exact"})
    answers = metrics.train_answers([{"completion": "b"}, {"completion": "a"}, {"completion": "B."}])
    answers.update({"from": "test", "note": None})
    report = evaluate.baseline_report(cfg, answers, ["b", "a", "c", "b"])
    assert report["answer"] == "b" and report["kind"].startswith("constant majority")
    assert report["task"]["accuracy"] == 0.5


def _fake_report(adapter_preds, truths, baseline=49.0):
    """A report as evaluate_run builds it, for summary_lines / warn_collapse."""
    report = {"rows": len(truths), "source": "eval.jsonl", "task": "numeric",
              "sample": {"count": len(truths), "of": 40, "how": "random", "seed": 7, "row_ids": []},
              "baseline": {"kind": "constant median of the train answers", "answer": baseline, "from": "train split",
                           "note": None, "task": metrics.baseline_metrics("numeric", truths, baseline)}}
    for name, preds in (("base", [t * 3 for t in truths]), ("adapter", adapter_preds)):
        scores = metrics.numeric_metrics(truths, preds)
        stats = metrics.prediction_stats(truths, preds)
        stats.pop("r2")
        report[name] = {"loss": 1.0, "perplexity": 2.7, "collapsed": stats.pop("collapsed"),
                        "collapse_reasons": stats.pop("collapse_reasons"), "task": {**scores, **stats},
                        "rows_detail": [{"parsed": p} for p in preds]}
    report["compared"] = metrics.compare_on_common_rows(report, truths, list(range(1, len(truths) + 1)), "numeric")
    return report


def test_collapsed_adapter_warns_once_and_table_shows_the_baseline(caplog):
    truths = [float(t) for t in range(10, 210, 10)]
    report = _fake_report([49.0] * 20, truths)
    assert report["adapter"]["collapsed"] and not report["base"]["collapsed"]
    with caplog.at_level(logging.WARNING, logger="train"):
        for name in ("base", "adapter"):
            evaluate.warn_collapse(name, report[name])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("adapter: PREDICTION COLLAPSE: 1 distinct answers, spread 0.0% of the truths' "
                                  "(fewer than 10 distinct answers; spread under 25% of the truths')")
    assert "constant answer, not learning" in warnings[0]
    lines = evaluate.summary_lines(report)
    assert lines[0] == "20 of 40 eval rows (a random sample, seed 7) from eval.jsonl"
    assert lines[1].startswith("baseline: constant median of the train answers = 49")
    assert lines[2] == ("compared on 20 of 20 rows: the rows every model parsed (parsed: baseline 20, base 20, "
                        "adapter 20); hit/near/miss rates over all rows, an unparseable answer a miss")
    assert lines[3] == "FEW ROWS: only 20 rows compared (under 30): the differences between models are mostly noise"
    header = lines[4].split()
    assert header == ["metric", "baseline", "base", "adapter"]
    mae = next(line.split() for line in lines if line.startswith("mae "))
    assert float(mae[1]) == pytest.approx(report["baseline"]["task"]["mae"], rel=1e-3)
    assert mae[1] == mae[3]  # the collapsed adapter answers the baseline's constant: same MAE
    distinct = next(line.split() for line in lines if line.startswith("distinct "))
    assert distinct == ["distinct", "-", "20", "1"]


def test_summary_table_compares_on_the_rows_every_model_parsed():
    """The base parses 4 of 40 rows: the table's MAE is on those 4 for every column, the parsed counts show."""
    truths = [10.0 * (i + 1) for i in range(40)]
    report = _fake_report([t + 1 for t in truths], truths, baseline=205.0)
    few = {0, 13, 26, 39}
    outputs = [f"{t + 5}" if i in few else "no idea" for i, t in enumerate(truths)]
    scores = metrics.summarize("numeric", truths, outputs)
    report["base"] = {"loss": 1.0, "perplexity": 2.7, "collapsed": False, "collapse_reasons": [],
                      "rows_detail": scores.pop("rows"), "task": scores}
    for name in ("base", "adapter"):
        report[name]["task"] = {k: v for k, v in report[name]["task"].items() if k != "common_rows"}
    report["baseline"]["task"] = report["baseline"].pop("own_rows")
    report["compared"] = metrics.compare_on_common_rows(report, truths, list(range(1, 41)), "numeric")
    lines = evaluate.summary_lines(report)
    assert "(parsed: baseline 40, base 4, adapter 40)" in lines[2] and lines[3].startswith("FEW ROWS: only 4 rows")
    mae = next(line.split() for line in lines if line.startswith("mae "))
    assert [float(x) for x in mae[1:]] == pytest.approx([130.0, 5.0, 1.0])  # the 4 rows: constant 205, +5, +1
    assert report["adapter"]["own_rows"]["mae"] == pytest.approx(1.0) and report["base"]["own_rows"]["parsed"] == 4
    unparseable = next(line.split() for line in lines if line.startswith("unparseable "))
    assert unparseable == ["unparseable", "0", "36", "0"]


# ---------------------------------------------------------------- `train generate` prompts

TEXT = "Give three tips for staying healthy."


def test_prompt_completion_fills_the_one_template_field(tmp_path, tiny_tok):
    cfg = small_config(tmp_path)
    ids, how = evaluate.build_prompt_ids(TEXT, cfg, tiny_tok)
    assert ids == tiny_tok(TEMPLATE.format(text=TEXT))["input_ids"] and "{text}" in how
    assert tiny_tok.decode(ids, skip_special_tokens=True) == TEMPLATE.format(text=TEXT)


def test_prompt_completion_cuts_like_training(tmp_path, tiny_tok):
    cfg = small_config(tmp_path, data={"completion_budget": 16})  # max_length 96 -> prompts of 80 tokens
    ids, how = evaluate.build_prompt_ids("word " * 200, cfg, tiny_tok)
    assert len(ids) == 80 and "cut" in how


def test_prompt_completion_template_with_several_fields_says_use_raw(tmp_path, tiny_tok):
    cfg = small_config(tmp_path, data={"prompt": "{title}: {text}\nPrice is $"})
    with pytest.raises(UserError, match=r"data.prompt .* has fields \['title', 'text'\].*--raw"):
        evaluate.build_prompt_ids(TEXT, cfg, tiny_tok)
    ids, how = evaluate.build_prompt_ids(TEXT, cfg, tiny_tok, wrap="raw")
    assert ids == tiny_tok(TEXT)["input_ids"] and "--raw" in how


def test_alpaca_prompt_as_training_builds_it(tmp_path, tiny_tok):
    cfg = small_config(tmp_path, data={"format": "alpaca"}, eval={"task": "none"})
    ids, _ = evaluate.build_prompt_ids(TEXT, cfg, tiny_tok)
    expected = data.ALPACA_PROMPT.format(has_input="", instruction=TEXT, input_block="")
    assert ids == tiny_tok(expected)["input_ids"]
    assert tiny_tok.decode(ids, skip_special_tokens=True).endswith(f"### Instruction:\n{TEXT}\n\n### Response:\n")


def test_messages_prompt_is_one_user_turn_with_generation_prompt(tmp_path, tiny_tok):
    cfg = small_config(tmp_path, data={"format": "messages"}, eval={"task": "none"})
    ids, _ = evaluate.build_prompt_ids(TEXT, cfg, tiny_tok)
    assert tiny_tok.decode(ids).endswith(f"<|user|>{TEXT}<|end|><|assistant|>")
    raw, _ = evaluate.build_prompt_ids(TEXT, cfg, tiny_tok, wrap="raw")
    assert raw == tiny_tok(TEXT)["input_ids"]


def test_chat_wraps_in_the_chat_template_whatever_the_format(tmp_path, tiny_tok):
    """--chat on a prompt_completion run: one user turn of the chat template, not the data.prompt template."""
    cfg = small_config(tmp_path, eval={"task": "none"})
    ids, how = evaluate.build_prompt_ids(TEXT, cfg, tiny_tok, wrap="chat")
    assert tiny_tok.decode(ids).endswith(f"<|user|>{TEXT}<|end|><|assistant|>") and "Price is" not in tiny_tok.decode(ids)
    assert ids != evaluate.build_prompt_ids(TEXT, cfg, tiny_tok)[0]


def test_text_format_sends_the_text_unchanged(tmp_path, tiny_tok):
    cfg = small_config(tmp_path, data={"format": "text", "text": "{text}"}, eval={"task": "none"})
    assert evaluate.build_prompt_ids(TEXT, cfg, tiny_tok)[0] == tiny_tok(TEXT)["input_ids"]


# ---------------------------------------------------------------- on a tiny trained run

@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from train.fit import fit

    return fit(small_config(tmp_path_factory.mktemp("eval-run") / "run")).run


def test_eval_report_has_baseline_distribution_and_sample(run):
    report = evaluate.evaluate_run(str(run))
    saved = json.loads((run / "eval" / "report.json").read_text())
    assert saved["sample"]["count"] == saved["rows"] == 12 and saved["sample"]["of"] == 16
    assert saved["sample"]["how"] == "random" and saved["sample"]["seed"] == 7
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    ids = [p["id"] for p in preds]
    assert saved["sample"]["row_ids"] == ids == sorted(ids)
    cfg = small_config(run)
    baseline = saved["baseline"]
    assert baseline["answer"] == pytest.approx(float(np.median(_train_truths(cfg))))
    truths = [metrics.parse_number(p["truth"]) for p in preds]
    parsed = {name: [p[f"{name}_parsed"]["parsed"] for p in preds] for name in ("base", "adapter")}
    common = metrics.common_rows(parsed)  # every model is scored on the rows all of them parsed
    compared = saved["compared"]
    assert compared["rows"] == len(common) and compared["of"] == 12 and compared["row_ids"] == [ids[i] for i in common]
    assert compared["parsed"] == {"baseline": 12, **{n: sum(v is not None for v in parsed[n]) for n in parsed}}
    assert compared["few_rows"] is True and compared["min_rows"] == metrics.FEW_ROWS  # 12 rows are few
    constant = [baseline["answer"]] * 12
    assert baseline["own_rows"] == pytest.approx({"note": baseline["own_rows"]["note"],
                                                  **metrics.numeric_metrics(truths, constant)})
    assert baseline["task"] == pytest.approx(metrics.scores_on_rows(truths, constant, common, stats=False))
    for name in ("base", "adapter"):
        task = saved[name]["task"]
        on_common = metrics.scores_on_rows(truths, parsed[name], common)
        for key in ("mae", "r2", "distinct", "spread_ratio", "pearson", "spearman", "hit_rate", "unparseable"):
            assert task[key] == pytest.approx(on_common[key]), key
        stats = metrics.prediction_stats(truths, parsed[name])  # its own rows: labelled, and what collapse reads
        assert saved[name]["own_rows"]["distinct"] == stats["distinct"]
        assert saved[name]["own_rows"]["pearson"] == stats["pearson"] and "NOT comparable" in saved[name]["own_rows"]["note"]
        assert saved[name]["collapsed"] == stats["collapsed"] and "r2" in task
    assert report["baseline"]["answer"] == baseline["answer"]


def test_eval_with_other_data_keeps_the_trained_train_split_for_the_baseline(run):
    other = str(evaluate.Path(__file__).resolve().parent.parent / "data/demo/eval.jsonl")
    _, _, _, examples, report = evaluate.prepare_eval(str(run), other, 5, ())  # no weights loaded
    assert report["sample"]["count"] == 5 and report["sample"]["of"] == 100 and report["sample"]["how"] == "random"
    assert [e["id"] for e in examples] == report["sample"]["row_ids"] != [1, 2, 3, 4, 5]
    # --data drops data.eval_fraction, but the baseline still comes from the 64 rows fit trained on
    assert report["baseline"]["train_rows"] == 64
    assert report["baseline"]["answer"] == pytest.approx(float(np.median(_train_truths(small_config(run)))))


def test_eval_flags_and_warns_a_collapsed_adapter(run, monkeypatch, caplog, capsys):
    median = float(np.median(_train_truths(small_config(run))))
    real = metrics.summarize
    calls = []

    def base_real_adapter_constant(task, truths, outputs, **options):
        """The answers as scored, however evaluate_run generated them: the base's real ones (scored first), then
        the adapter answering the train median for every row."""
        calls.append(1)
        return real(task, truths, outputs if len(calls) == 1 else [f"{median:.2f}"] * len(outputs), **options)

    monkeypatch.setattr(metrics, "summarize", base_real_adapter_constant)
    with caplog.at_level(logging.WARNING, logger="train"):
        report = evaluate.evaluate_run(str(run))
    assert len(calls) == 2  # base, then adapter: nothing else is scored through summarize
    saved = json.loads((run / "eval" / "report.json").read_text())
    assert saved["adapter"]["collapsed"] is True and saved["adapter"]["own_rows"]["distinct"] == 1
    assert any("distinct" in r for r in saved["adapter"]["collapse_reasons"])
    assert saved["adapter"]["task"]["mae"] == pytest.approx(saved["baseline"]["task"]["mae"])
    warned = [r.getMessage() for r in caplog.records if "PREDICTION COLLAPSE" in r.getMessage()]
    assert any(w.startswith("adapter: PREDICTION COLLAPSE: 1 distinct answers") for w in warned)
    assert report["adapter"]["collapsed"] is True
    out = capsys.readouterr().out
    assert "baseline" in out and "\ncompared on " in out and "\nFEW ROWS: only " in out  # at most 12 rows


def test_eval_of_a_missing_folder_says_no_such_folder(tmp_path, capsys):
    from train.cli import main

    missing = tmp_path / "no" / "such" / "folder"
    assert main(["eval", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {missing}: no such folder; pass the run directory `train fit` wrote (run.output_dir)"]
    assert main(["generate", str(missing), "--prompt", "x"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_generate_cli_wraps_the_prompt_in_the_runs_template(run, capsys, caplog):
    from train.cli import main

    with caplog.at_level(logging.INFO, logger="train"):
        assert main(["generate", str(run), "--prompt", "Large steel drill.", "--prompt", "Small tent.",
                     "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("\n=====\n")
    head = "Large steel drill.\n--- answer ---\n"
    assert first.startswith(head) and len(first) > len(head)
    assert second.startswith("Small tent.\n--- answer ---\n")
    sent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("prompt sent")]
    assert len(sent) == 2 and repr(TEMPLATE.format(text="Large steel drill."))[1:-1] in sent[0]


def test_generate_raw_sends_the_prompt_unchanged(run, monkeypatch):
    seen = []
    real = evaluate.generate

    def spy(model, tok, examples, max_new_tokens, batch_size):
        seen.extend(e["prompt_ids"] for e in examples)
        return real(model, tok, examples, max_new_tokens, batch_size)

    monkeypatch.setattr(evaluate, "generate", spy)
    answers = evaluate.generate_text(str(run), [TEXT], max_new_tokens=2, wrap="raw")
    templated = evaluate.generate_text(str(run), [TEXT], max_new_tokens=2)
    tok = evaluate.model_lib.load_tokenizer(str(run / "adapter"), small_config(run).model)
    assert seen == [tok(TEXT)["input_ids"], tok(TEMPLATE.format(text=TEXT))["input_ids"]]
    assert len(answers) == len(templated) == 1


def test_fit_records_its_data_and_eval_refuses_a_changed_file(run, capsys, caplog):
    """fit writes data_record.json beside config.yaml (a file fit owns: --overwrite may remove it); eval of held-out
    rows whose data.train no longer matches exits 2 in one line, and eval.on_data_change=warn accepts it."""
    from train.checkpoints import OUR_ARTIFACTS
    from train.cli import main

    path = run / data.DATA_RECORD
    record = json.loads(path.read_text())
    train = small_config(run).data.train
    assert record == {"data.train": {"path": train, "sha256": data.file_sha256(evaluate.Path(train))}}
    assert {p.name for p in run.iterdir()} <= set(OUR_ARTIFACTS)
    original = path.read_text()
    try:  # the repo's data file stays as it is: the record says it was another file
        path.write_text(json.dumps({"data.train": {"path": train, "sha256": "0" * 64}}))
        assert main(["eval", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {train} changed since this run was fit (sha256 000000000000")
        with caplog.at_level(logging.WARNING, logger="train"):
            _, _, _, examples, _ = evaluate.prepare_eval(str(run), None, 3, ["eval.on_data_change=warn"])
        assert len(examples) == 3 and any("changed since this run was fit" in r.getMessage() for r in caplog.records)
    finally:
        path.write_text(original)
