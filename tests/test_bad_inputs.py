"""Bad inputs through the real CLI: one line `error: ...` naming the key/file/row and the fix, exit 2,
no traceback, and nothing on disk changed (the run dir is not created; data and config files untouched).

Most cases fail before any weights load (milliseconds). The few that need a trained run share one
2-step fit (module fixture), which also checks that API keys never reach saved files.

Set BAD_INPUTS_DUMP=path.jsonl to record every error message (docs/reliability.md is built from it).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.cli import main
from train.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((REPO / "configs/tiny.yaml").read_text(encoding="utf-8"))
STORIES = REPO.parent / "shared/models/stories260K"
FIXED = [REPO / "data/demo", REPO / "configs/tiny.yaml"]  # must never change


# --------------------------------------------------------------------------------------------
# Helpers


def small_eval(tmp_path: Path, n: int = 4) -> str:
    """The first n demo eval rows: keeps the end-of-fit eval of the real fits below short."""
    rows = (REPO / "data/demo/eval.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "small_eval.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


def demo_raw(tmp_path: Path) -> dict:
    """configs/tiny.yaml with absolute data paths, the run under tmp_path, and a tiny budget."""
    raw = copy.deepcopy(DEMO)
    raw["run"]["output_dir"] = str(tmp_path / "run")
    raw["data"].update(train=str(REPO / "data/demo/train.jsonl"), eval=str(REPO / "data/demo/eval.jsonl"),
                       max_rows=16)
    raw["train"].update(max_steps=2, save_every=1, eval_every=None)
    return raw


def write_cfg(tmp_path: Path, raw: dict | str, name: str = "cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return str(path)


def write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def snapshot(*roots: Path) -> dict:
    """Every path under `roots` with its mtime, size and bytes (None for a missing root)."""
    out = {}
    for root in roots:
        if not root.exists():
            out[str(root)] = None
            continue
        for p in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            st = p.lstat()
            out[str(p)] = (st.st_mtime_ns, st.st_size, st.st_mode, p.read_bytes() if p.is_file() else None)
    return out


@pytest.fixture(scope="module", autouse=True)
def _tiny_model_built():
    """Build builtin:tiny-llama up front: its first build draws a progress bar on stderr (train/tiny.py)."""
    from train import tiny

    tiny.materialize("builtin:tiny-llama")


@pytest.fixture
def expect(capsys, tmp_path, request):
    """expect(argv, *needles) -> the error line; asserts exit 2, one `error:` line, disk unchanged."""

    def check(argv: list[str], *needles: str, roots: tuple[Path, ...] = (), after_weights: bool = False) -> str:
        watched = (tmp_path, *FIXED, *roots)
        before = snapshot(*watched)
        capsys.readouterr()
        rc = main(argv)
        err = capsys.readouterr().err
        lines = err.rstrip("\n").splitlines()
        if after_weights:  # transformers' "Loading weights" progress bar comes first; then the one error line
            lines = [line for line in lines if line.strip() and "Loading weights" not in line]
        assert rc == 2, err
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        assert "Traceback" not in err
        for needle in needles:
            assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
        assert snapshot(*watched) == before, "a refused command changed files on disk"
        dump = os.environ.get("BAD_INPUTS_DUMP")
        if dump:
            with open(dump, "a", encoding="utf-8") as f:
                f.write(json.dumps({"test": request.node.name, "error": lines[0]}) + "\n")
        return lines[0]

    return check


def fit_args(tmp_path: Path, raw: dict | str, *extra: str) -> list[str]:
    return ["fit", write_cfg(tmp_path, raw), *extra]


# --------------------------------------------------------------------------------------------
# Config file and --set: caught in train/config.py, before any model code is imported


def _set(raw, section, **kv):
    raw.setdefault(section, {}).update(kv)
    return raw


CONFIG_CASES = {
    # id: (mutate raw config, needles the error must contain)
    "misspelt_key": (lambda r: _set(r, "train", max_step=5), ["train.max_step", "did you mean train.max_steps?"]),
    "hf_key_name": (lambda r: _set(r, "train", learning_rate=1e-4), ["train.learning_rate", "did you mean train.lr?"]),
    "unknown_section": (lambda r: {**r, "trainer": {"lr": 1e-4}}, ["unknown section 'trainer'", "did you mean train?"]),
    "section_not_mapping": (lambda r: {**r, "lora": 16}, ["section 'lora' must be a mapping"]),
    "lr_not_number": (lambda r: _set(r, "train", lr="fast"), ["train.lr must be a number", "'fast'"]),
    "r_not_integer": (lambda r: _set(r, "lora", r=16.5), ["lora.r must be an integer", "16.5"]),
    "bool_not_bool": (lambda r: _set(r, "train", gradient_checkpointing="maybe"),
                      ["train.gradient_checkpointing must be true or false"]),
    "bad_choice": (lambda r: _set(r, "quant", mode="nf5"), ["quant.mode must be one of nf4 | fp4 | int8 | none"]),
    "list_expected": (lambda r: _set(r, "log", report_to="wandb"), ["log.report_to must be a list"]),
    "lr_zero": (lambda r: _set(r, "train", lr=0), ["train.lr must be > 0 (try 2e-4)"]),
    "lr_negative": (lambda r: _set(r, "train", lr=-1e-4), ["train.lr must be > 0"]),
    "r_zero": (lambda r: _set(r, "lora", r=0), ["lora.r must be > 0 (try 16)"]),
    "dropout_one": (lambda r: _set(r, "lora", dropout=1.0), ["lora.dropout must be in [0, 1)"]),
    "max_steps_negative": (lambda r: _set(r, "train", max_steps=-5), ["train.max_steps must be > 0"]),
    "max_length_tiny": (lambda r: _set(r, "data", max_length=4), ["data.max_length must be >= 8"]),
    "steps_and_epochs": (lambda r: _set(r, "train", max_steps=10, epochs=2),
                         ["train.max_steps and train.epochs are exclusive"]),
    "eval_and_fraction": (lambda r: _set(r, "data", eval_fraction=0.1),
                          ["data.eval and data.eval_fraction are exclusive"]),
    "dora_int8": (lambda r: _set(_set(r, "lora", use_dora=True), "quant", mode="int8"), ["lora.use_dora", "int8"]),
    "choice_no_labels": (lambda r: _set(r, "eval", task="choice"), ["eval.task=choice needs eval.labels"]),
    "numeric_task_text_format": (lambda r: _set(r, "data", format="text"), ["eval.task=numeric", "data.format=text"]),
    "template_syntax": (lambda r: _set(r, "data", completion="{price:.0f"), ["data.completion is not a valid template"]),
    "template_no_field": (lambda r: _set(r, "data", completion="$$"), ["data.completion must name at least one"]),
    "template_positional": (lambda r: _set(r, "data", prompt="Price of {}?"), ["data.prompt", "must be a column name"]),
    "model_missing": (lambda r: _set(r, "model", name_or_path=""), ["model.name_or_path is required"]),
    "resume_blank": (lambda r: _set(r, "train", resume="  "), ["train.resume must be auto | never | a path"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_value(case, tmp_path, expect):
    mutate, needles = CONFIG_CASES[case]
    cfg = write_cfg(tmp_path, mutate(demo_raw(tmp_path)))
    expect(["fit", cfg], cfg, *needles)


def test_invalid_yaml(tmp_path, expect):
    cfg = write_cfg(tmp_path, "run:\n  output_dir: x\ntrain:\n  lr: [1e-4\n")
    expect(["fit", cfg], cfg, "line 5", "not valid YAML", "fix the syntax")


def test_duplicate_yaml_key(tmp_path, expect):
    text = yaml.safe_dump(demo_raw(tmp_path), sort_keys=False) + "train:\n  lr: 1.0e-4\n"
    cfg = write_cfg(tmp_path, text)
    expect(["fit", cfg], cfg, "has a duplicate key 'train'", "merge the two into one")


def test_unhashable_yaml_key(tmp_path, expect):
    cfg = write_cfg(tmp_path, "run:\n  seed: 1\n[a, b]: 1\n")
    expect(["fit", cfg], cfg, "line 3 is not valid YAML", "found unhashable key", "fix the syntax")


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    """Not a bad input: `<<: *anchor` followed by an override of one of its keys is ordinary YAML."""
    from train.config import read_yaml

    path = write_cfg(tmp_path, "base: &b {x: 1, y: 2}\nother:\n  <<: *b\n  y: 3\n")
    assert read_yaml(Path(path))["other"] == {"x": 1, "y": 3}


def test_top_level_not_mapping(tmp_path, expect):
    cfg = write_cfg(tmp_path, "- run\n- model\n")
    expect(["fit", cfg], cfg, "top level must be a mapping")


def test_config_not_utf8(tmp_path, expect):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(yaml.safe_dump(demo_raw(tmp_path)).encode() + b"# caf\xe9\n")
    expect(["fit", str(path)], str(path), "not UTF-8", "save the config as UTF-8")


def test_missing_config_file(tmp_path, expect):
    expect(["fit", str(tmp_path / "nope.yaml")], "nope.yaml", "config file not found", "configs/demo.yaml")


@pytest.mark.parametrize(("item", "needles"), [
    ("train.lr", ["--set 'train.lr'", "expected key=value"]),
    ("lr=1e-4", ["--set lr", "keys look like section.name"]),
    ("trian.lr=1e-4", ["unknown section 'trian'", "did you mean train?"]),
], ids=["no_equals", "no_section", "unknown_section"])
def test_malformed_set(item, needles, tmp_path, expect):
    expect(fit_args(tmp_path, demo_raw(tmp_path), "--set", item), *needles)


@pytest.mark.parametrize(("item", "needles"), [
    ("train.lr=abc", ["--set train.lr=abc: train.lr must be a number, got str 'abc'"]),
    ("lora.r=0", ["--set lora.r=0: lora.r must be > 0 (try 16)"]),
    ("train.lrr=1e-4", ["--set train.lrr=1e-4: unknown key train.lrr", "did you mean train.lr?"]),
    ("data.prompt=$$", ["--set data.prompt=$$: data.prompt must name at least one {column}"]),
], ids=["lr_not_number", "r_zero", "unknown_key", "template"])
def test_bad_set_value_names_the_set_not_the_file(item, needles, tmp_path, expect):
    cfg = write_cfg(tmp_path, demo_raw(tmp_path))
    line = expect(["fit", cfg, "--set", item], *needles)
    assert cfg not in line  # the file is fine: the --set is what to fix


def test_exclusive_keys_both_set_on_the_command_line(tmp_path, expect):
    expect(fit_args(tmp_path, demo_raw(tmp_path), "--set", "train.max_steps=3", "--set", "train.epochs=1"),
           "--set train.max_steps=3 and --set train.epochs=1: train.max_steps and train.epochs are exclusive")


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    """Not a bad input: YAML 1.1 reads `lr: 2e-4` as a string; it used to be refused as one."""
    from train.config import load_config

    raw = demo_raw(tmp_path)
    text = yaml.safe_dump(raw, sort_keys=False).replace("lr: 0.003", "lr: 2e-4")
    assert "lr: 2e-4" in text
    assert load_config(write_cfg(tmp_path, text)).train.lr == 2e-4


# --------------------------------------------------------------------------------------------
# Data: caught when fit loads every row (step 1), before the run dir is touched or the weights load


ROWS = [{"text": f"Item {i}. Ships in two days.", "price": 10.0 + i} for i in range(6)]


def data_raw(tmp_path: Path, train=None, eval_=None, **data) -> dict:
    raw = demo_raw(tmp_path)
    raw["data"].update(train=train or write_jsonl(tmp_path / "train.jsonl", ROWS),
                       eval=eval_ or write_jsonl(tmp_path / "eval.jsonl", ROWS), **data)
    return raw


def test_missing_data_file(tmp_path, expect):
    raw = data_raw(tmp_path, train=str(tmp_path / "missing.jsonl"))
    expect(fit_args(tmp_path, raw), "data.train", "missing.jsonl", "not found", "fix the path")


def test_missing_eval_file(tmp_path, expect):
    raw = data_raw(tmp_path, eval_=str(tmp_path / "missing_eval.jsonl"))
    expect(fit_args(tmp_path, raw), "data.eval", "missing_eval.jsonl", "not found")


def test_data_path_is_directory(tmp_path, expect):
    (tmp_path / "folder").mkdir()
    raw = data_raw(tmp_path, train=str(tmp_path / "folder"))
    expect(fit_args(tmp_path, raw), "data.train", "is a directory", ".jsonl")


def test_empty_data_file(tmp_path, expect):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    raw = data_raw(tmp_path, train=str(tmp_path / "empty.jsonl"))
    expect(fit_args(tmp_path, raw), "data.train", "empty.jsonl has no rows", "non-empty file")


def test_malformed_jsonl_line(tmp_path, expect):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"text\": \"x\", price: 3}\n")
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), f"{path}: line 3 is not valid JSON: "
           "Expecting property name enclosed in double quotes at column 15, just before 'price: 3}'",
           "fix or remove that line")


def test_unterminated_string_in_jsonl(tmp_path, expect):
    """json's own message, "Unterminated string starting at", is completed with its column, not cut off."""
    path = tmp_path / "cut.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{\"price\": 3, \"text\": \"A lamp\n")
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), f"{path}: line 2 is not valid JSON: "
           "Unterminated string starting at column 22, just before '\"A lamp'", "fix or remove that line")


def test_jsonl_row_not_object(tmp_path, expect):
    path = write_jsonl(tmp_path / "lists.jsonl", [ROWS[0], ["a", "b"]])
    expect(fit_args(tmp_path, data_raw(tmp_path, train=path)), "lists.jsonl row 2 is list", "fix that row")


def test_data_not_utf8(tmp_path, expect):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "caf\xe9", "price": 3}\n')
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), "data.train", "latin1.jsonl",
           "not UTF-8", "re-save it as UTF-8")


def test_unsupported_file_type(tmp_path, expect):
    path = tmp_path / "rows.txt"
    path.write_text("some text\n")
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), "rows.txt", "unsupported data file type",
           ".jsonl, .json, .csv or .parquet")


def test_corrupt_parquet(tmp_path, expect):
    path = tmp_path / "rows.parquet"
    path.write_bytes(b"not parquet at all")
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), "data.train", "rows.parquet",
           "not a readable parquet file")


def test_hub_dataset_offline(tmp_path, expect):
    raw = data_raw(tmp_path, train="nobody-xyz/no-such-dataset")
    expect(fit_args(tmp_path, raw), "data.train", "nobody-xyz/no-such-dataset", "offline", "check the path")


def test_csv_missing_templated_column(tmp_path, expect):
    path = tmp_path / "rows.csv"
    path.write_text("text,cost\nA chair,12\nA table,30\n")
    msg = expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), "rows.csv: row 1", "data.completion",
                 "needs field 'price'", "fix data.completion or the data")
    assert "'cost'" in msg  # shows the columns the row does have


def test_csv_ragged_row(tmp_path, expect):
    path = tmp_path / "rows.csv"
    path.write_text("text,price\nA chair,12\nA table\n")
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), "rows.csv: line 3",
           "one cell per header column", "fix that line")


def test_csv_empty_numeric_cell(tmp_path, expect):
    path = tmp_path / "rows.csv"
    path.write_text("text,price\nA chair,12\nA table,\nA lamp,7\n")
    expect(fit_args(tmp_path, data_raw(tmp_path, train=str(path))), "rows.csv: row 2: column 'price' is empty",
           "data.completion '{price:.0f}.00' formats it as a number", "fill in that cell or remove the row")


def test_template_names_missing_field(tmp_path, expect):
    raw = data_raw(tmp_path, prompt="{title}\n\n{text}\n\nPrice is $")
    expect(fit_args(tmp_path, raw), "train.jsonl: row 1", "data.prompt", "needs field 'title'")


def test_null_field(tmp_path, expect):
    path = write_jsonl(tmp_path / "nulls.jsonl", [ROWS[0], {"text": None, "price": 3.0}])
    expect(fit_args(tmp_path, data_raw(tmp_path, train=path)), "nulls.jsonl: row 2", "field 'text'",
           "data.prompt", "is null", "fill it in or remove the row")


def test_format_spec_on_text_value(tmp_path, expect):
    path = write_jsonl(tmp_path / "prices.jsonl", [ROWS[0], {"text": "A lamp", "price": "twelve"}])
    expect(fit_args(tmp_path, data_raw(tmp_path, train=path)), "prices.jsonl: row 2", "data.completion",
           "column 'price' is 'twelve', not a number", "formats it as a number ({price:.0f})", "fix that cell")


def test_non_numeric_truth_for_numeric_task(tmp_path, expect):
    """Caught in fit, before training, instead of after training at `train eval`."""
    rows = [*ROWS[:3], {"text": "A lamp", "price": "call for price"}]
    raw = data_raw(tmp_path, eval_=write_jsonl(tmp_path / "eval_text.jsonl", rows), completion="{price}")
    expect(fit_args(tmp_path, raw), "row 4", "'call for price' has no number", "eval.task=numeric",
           "set eval.task: exact")


MESSAGES_OK = [{"role": "user", "content": "Price of a chair?"}, {"role": "assistant", "content": "12"}]


@pytest.mark.parametrize(("bad_row", "needles"), [
    ({"messages": [{"role": "bot", "content": "hi"}, MESSAGES_OK[1]]}, ["messages[0] has role 'bot'", "use one of"]),
    ({"messages": [MESSAGES_OK[0]]}, ["messages has no assistant turn"]),
    ({"conversation": MESSAGES_OK}, ["field 'messages' must be a non-empty list", "data.messages_field"]),
    ({"messages": [{"role": "user", "content": 5}, MESSAGES_OK[1]]}, ["messages[0] must be an object with a text"]),
], ids=["bad_role", "no_assistant", "no_messages_field", "content_not_text"])
def test_bad_chat_messages(bad_row, needles, tmp_path, expect):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": MESSAGES_OK}, bad_row])
    raw = data_raw(tmp_path, train=path, eval_=path, format="messages")
    expect(fit_args(tmp_path, raw), "chat.jsonl: row 2", *needles)


def test_every_row_too_long_with_drop(tmp_path, expect):
    raw = data_raw(tmp_path, max_length=8, truncation="drop")
    expect(fit_args(tmp_path, raw), "train.jsonl: all 6 rows were dropped", "6 longer than data.max_length",
           "raise data.max_length")


def test_eval_fraction_leaves_no_training_rows(tmp_path, expect):
    raw = demo_raw(tmp_path)
    raw["data"].update(train=write_jsonl(tmp_path / "one.jsonl", ROWS[:1]), eval=None, eval_fraction=0.5)
    expect(fit_args(tmp_path, raw), "data.eval_fraction", "one.jsonl", "leaves none to train on")


# --------------------------------------------------------------------------------------------
# Model: caught by the preflight (path, config.json, tokenizer; no weights)


def test_model_path_missing(tmp_path, expect):
    raw = _set(demo_raw(tmp_path), "model", name_or_path=str(tmp_path / "models/none"))
    expect(fit_args(tmp_path, raw), "model.name_or_path", "models/none", "is not a model directory",
           "builtin:tiny-llama")


def test_hub_model_offline(tmp_path, expect):
    raw = _set(demo_raw(tmp_path), "model", name_or_path="nobody-xyz/no-such-model")
    expect(fit_args(tmp_path, raw), "model.name_or_path", "nobody-xyz/no-such-model", "offline")


def test_unknown_builtin(tmp_path, expect):
    raw = _set(demo_raw(tmp_path), "model", name_or_path="builtin:tiny-gpt")
    expect(fit_args(tmp_path, raw), "model.name_or_path", "builtin:tiny-gpt", "available: builtin:tiny-llama")


def test_trust_remote_code_needed(tmp_path, expect):
    remote = tmp_path / "remote_model"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps({
        "model_type": "my_custom_lm", "hidden_size": 64,
        "auto_map": {"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyLM"}}))
    raw = _set(demo_raw(tmp_path), "model", name_or_path=str(remote))
    expect(fit_args(tmp_path, raw), "model.name_or_path", "needs custom code", "set model.trust_remote_code: true")


def test_model_without_tokenizer(tmp_path, expect):
    bare = tmp_path / "bare_model"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64,
                                                  "intermediate_size": 128, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "vocab_size": 300}))
    raw = _set(demo_raw(tmp_path), "model", name_or_path=str(bare))
    expect(fit_args(tmp_path, raw), "model.name_or_path", "has no tokenizer files", "copy the tokenizer in")


def test_lora_target_not_in_model(tmp_path, expect):
    raw = _set(demo_raw(tmp_path), "lora", target_modules=["q_proj", "query_key_value"])
    expect(fit_args(tmp_path, raw), "lora.target_modules", "['query_key_value'] not found", "q_proj",
           "all-linear")


# --------------------------------------------------------------------------------------------
# Run directory and resume


def fake_checkpoint(path: Path, raw: dict, complete: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"):
        (path / name).write_bytes(b"\0" * 16)  # the files a complete checkpoint holds (checkpoints.NEEDED)
    if complete:
        (path / "COMPLETE").write_text("ok\n")
    return path


def test_output_dir_holds_another_run(tmp_path, expect):
    """train.resume: never and nothing to resume: resuming is not offered."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    raw = _set(demo_raw(tmp_path), "train", resume="never")
    line = expect(fit_args(tmp_path, raw), "run.output_dir", "already holds another run's files; pass --overwrite "
                  "(removes only our outputs) or choose another run.output_dir")
    assert "resume" not in line


def test_output_dir_holds_a_run_auto_cannot_resume(tmp_path, expect):
    """train.resume: auto (the default) is already set: say why it did not resume, do not advise it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    line = expect(fit_args(tmp_path, demo_raw(tmp_path)), "already holds another run's files and no complete "
                  "checkpoint to resume from; pass --overwrite")
    assert "train.resume=auto" not in line


def test_output_dir_holds_a_resumable_run_under_never(tmp_path, expect):
    """train.resume: never over a complete checkpoint: resuming is one key away, and named."""
    fake_checkpoint(tmp_path / "run/checkpoints/checkpoint-5", demo_raw(tmp_path))
    raw = _set(demo_raw(tmp_path), "train", resume="never")
    expect(fit_args(tmp_path, raw), "already holds another run's files; pass --overwrite (removes only our outputs), "
           "resume from checkpoint-5 with train.resume=auto, or choose another run.output_dir")


def test_interrupted_advice_fits_train_resume():
    from train.errors import Interrupted

    auto = str(Interrupted("SIGINT", "run/checkpoints/checkpoint-3", "auto"))
    assert auto.endswith("checkpoint saved to run/checkpoints/checkpoint-3; run the same command again to resume "
                         "from it")
    never = str(Interrupted("SIGTERM", "run/checkpoints/checkpoint-3", "never"))
    assert "run the same command with --set train.resume=auto (train.resume is never)" in never


def test_output_dir_holds_foreign_files(tmp_path, expect):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine\n")
    expect(fit_args(tmp_path, demo_raw(tmp_path)), "run.output_dir", "files that are not ours (notes.txt)")


def test_output_dir_is_a_file(tmp_path, expect):
    (tmp_path / "run").write_text("a file\n")
    expect(fit_args(tmp_path, demo_raw(tmp_path)), "run.output_dir", "is a file", "choose a directory")


def test_output_dir_under_a_file(tmp_path, expect):
    (tmp_path / "file.txt").write_text("a file\n")
    raw = demo_raw(tmp_path)
    raw["run"]["output_dir"] = str(tmp_path / "file.txt/run")
    expect(fit_args(tmp_path, raw), "run.output_dir", "file.txt is a file", "choose a directory path")


def test_output_dir_not_writable(tmp_path, expect):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writes (test_output_dir_under_a_file covers this)")
        raw = demo_raw(tmp_path)
        raw["run"]["output_dir"] = str(locked / "run")
        expect(fit_args(tmp_path, raw), "run.output_dir", "permission denied", "choose a writable directory")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("layout, resumable", [
    (["adapter_model.safetensors", "optimizer.pt"], True),  # one GPU, DDP
    (["pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/.metadata", "optimizer_0/__0_0.distcp",
      "optimizer_0/.metadata"], True),  # FSDP, sharded state dict
    (["adapter_model.safetensors", "optimizer.bin"], True),  # FSDP, full state dict
    (["adapter_model.safetensors", "global_step4/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"], True),  # ZeRO-3
    (["adapter_model.safetensors"], False),  # the optimizer state is gone: not resumable
    (["pytorch_model_fsdp_0/", "optimizer_0/__0_0.distcp", "optimizer_0/.metadata"], False),  # no model shards
    (["pytorch_model_fsdp_0/__0_0.distcp", "optimizer_0/__0_0.distcp", "optimizer_0/.metadata"], False),  # torn
])
def test_checkpoint_layouts_of_every_launcher(tmp_path, layout, resumable):
    from train import checkpoints

    ckpt = tmp_path / "checkpoints/checkpoint-4"
    ckpt.mkdir(parents=True)
    for name in [*layout, "scheduler.pt", "trainer_state.json", "COMPLETE"]:
        (ckpt / name).parent.mkdir(parents=True, exist_ok=True)
        if not name.endswith("/"):
            (ckpt / name).write_bytes(b"\0")
    assert (checkpoints.latest_complete(tmp_path / "checkpoints") == ckpt) == resumable


def test_resume_checkpoint_missing(tmp_path, expect):
    raw = _set(demo_raw(tmp_path), "train", resume=str(tmp_path / "old/checkpoint-40"))
    expect(fit_args(tmp_path, raw), "train.resume", "checkpoint-40 is not a checkpoint directory",
           "use auto, never")


def test_resume_checkpoint_incomplete(tmp_path, expect):
    ckpt = fake_checkpoint(tmp_path / "old/checkpoint-40", demo_raw(tmp_path), complete=False)
    raw = _set(demo_raw(tmp_path), "train", resume=str(ckpt))
    expect(fit_args(tmp_path, raw), "train.resume", "incomplete (no COMPLETE marker)", "pick an earlier checkpoint")


def test_resume_different_lora_rank(tmp_path, expect):
    ckpt = fake_checkpoint(tmp_path / "old/checkpoint-40", _set(demo_raw(tmp_path), "lora", r=8))
    raw = _set(demo_raw(tmp_path), "train", resume=str(ckpt))
    expect(fit_args(tmp_path, raw), "train.resume", "checkpoint-40 was trained with lora.r=8",
           "this config has 16", "train.resume=never")


def test_auto_resume_different_lora_rank(tmp_path, expect):
    """The run dir is untouched: not even config.yaml is rewritten or a write-test file created."""
    run = tmp_path / "run"
    fake_checkpoint(run / "checkpoints/checkpoint-5", _set(demo_raw(tmp_path), "lora", r=8))
    (run / "config.yaml").write_text("old: config\n")
    expect(fit_args(tmp_path, _set(demo_raw(tmp_path), "lora", r=16)), "lora.r=8", "this config has 16")


def test_overwrite_with_bad_data_keeps_old_run(tmp_path, expect):
    """--overwrite removes our outputs only once every check has passed."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    raw = data_raw(tmp_path, train=str(tmp_path / "missing.jsonl"))
    expect(fit_args(tmp_path, raw, "--overwrite"), "data.train", "missing.jsonl")
    assert (run / "metrics.jsonl").is_file()


# --------------------------------------------------------------------------------------------
# `train eval`


def fake_adapter(path: Path, raw: dict, fingerprint: dict | None = None, config: bool = True) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 16}))
    if config:
        (path / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    if fingerprint is not None:
        (path / "training_meta.json").write_text(json.dumps({"base_fingerprint": fingerprint}))
    return path


def test_eval_dir_without_adapter(tmp_path, expect):
    (tmp_path / "empty_run").mkdir()
    expect(["eval", str(tmp_path / "empty_run")], "empty_run", "no adapter found", "after `train fit` finished")


def test_eval_adapter_without_config(tmp_path, expect):
    adapter = fake_adapter(tmp_path / "run/adapter", demo_raw(tmp_path), config=False)
    expect(["eval", str(tmp_path / "run")], str(adapter), "no config.yaml beside the adapter")


def test_eval_adapter_from_other_base(tmp_path, expect):
    other = {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
             "vocab_size": 151936, "num_attention_heads": 14}
    fake_adapter(tmp_path / "run/adapter", demo_raw(tmp_path), fingerprint=other)
    expect(["eval", str(tmp_path / "run")], "adapter was trained on another base", "model_type qwen2 vs llama",
           "set model.name_or_path")


def test_eval_limit_zero(tmp_path, expect):
    fake_adapter(tmp_path / "run/adapter", demo_raw(tmp_path))
    expect(["eval", str(tmp_path / "run"), "--limit", "0"], "--limit must be >= 1, got 0")


# --------------------------------------------------------------------------------------------
# Real process, --debug


def test_real_process_one_line(tmp_path):
    """`python -m train` as a user runs it: one stderr line through the whole preflight, exit 2."""
    raw = data_raw(tmp_path, train=str(tmp_path / "missing.jsonl"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "train", "fit", write_cfg(tmp_path, raw)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: data.train: data file {tmp_path / 'missing.jsonl'} not found; "
                                        "fix the path in data.train"]
    assert not (tmp_path / "run").exists()


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        main(["--debug", "fit", str(tmp_path / "nope.yaml")])


# --------------------------------------------------------------------------------------------
# A real 2-step run: secrets never saved; errors that need a trained adapter


SECRETS = {"WANDB_API_KEY": "wandb-secret-0123456789abcdef", "HF_TOKEN": "hf_secretTOKEN0123456789"}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trained")
    raw = demo_raw(tmp)
    raw["data"].update(eval=small_eval(tmp), completion="{price}", max_length=96)
    raw["train"].update(batch_size=4, gradient_checkpointing=False)
    raw["log"]["report_to"] = ["tensorboard"]
    raw["eval"].update(limit=4, batch_size=4, max_new_tokens=4)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRETS.items():
            mp.setenv(key, value)
        assert main(["fit", write_cfg(tmp, raw)]) == 0
    return tmp / "run"


def test_api_keys_never_saved(trained_run):
    files = [p for p in trained_run.rglob("*") if p.is_file()]
    assert trained_run / "config.yaml" in files and trained_run / "adapter/README.md" in files
    for path in files:
        blob = path.read_bytes()
        for key, secret in SECRETS.items():
            assert secret.encode() not in blob, f"{key} value found in {path}"


def test_eval_non_numeric_truth(trained_run, tmp_path, expect):
    """At eval time (after the weights load): --data with a non-numeric truth for eval.task=numeric."""
    bad = write_jsonl(tmp_path / "eval_bad.jsonl", [*ROWS[:2], {"text": "A lamp", "price": "ask us"}])
    expect(["eval", str(trained_run), "--data", bad], "eval_bad.jsonl: row 3", "'ask us' has no number", "eval.task: exact",
           roots=(trained_run,), after_weights=True)


def test_eval_data_missing(trained_run, tmp_path, expect):
    expect(["eval", str(trained_run), "--data", str(tmp_path / "gone.jsonl")], "data.eval", "gone.jsonl",
           "not found", roots=(trained_run,), after_weights=True)


def test_eval_limit_negative_real_run(trained_run, expect):
    expect(["eval", str(trained_run), "--limit", "-3"], "--limit must be >= 1, got -3", roots=(trained_run,))


# --------------------------------------------------------------------------------------------
# stories260K: a real pretrained model with 172-wide MLPs (not a multiple of bnb's CPU block of 32)


@pytest.mark.skipif(not (STORIES / "config.json").is_file(), reason=f"{STORIES} not present")
def test_stories260k_fits_and_generates_on_cpu(tmp_path, capsys):
    model_dir = tmp_path / "stories260K"
    shutil.copytree(STORIES, model_dir)  # never risk the shared copy
    raw = demo_raw(tmp_path)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["data"].update(eval=small_eval(tmp_path), completion="{price:.0f}", max_length=128)
    raw["train"].update(max_steps=3, batch_size=4, gradient_checkpointing=False)
    raw["eval"].update(limit=4, batch_size=4, max_new_tokens=4)
    assert main(["fit", write_cfg(tmp_path, raw)]) == 0, capsys.readouterr().err
    assert (tmp_path / "run/adapter/adapter_model.safetensors").is_file()
    assert main(["eval", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (tmp_path / "run/eval/predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(isinstance(r["adapter_output"], str) for r in rows)
