"""The data a fit read is recorded (data_record.json, sha256 per file) and `train eval` refuses or warns when a
file changed since (issue #22 item 6): held-out rows re-derived from a changed data.train may be trained rows."""

import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import REPO, small_config
from train import data
from train.errors import UserError


def _run(tmp_path, **data_section):
    """A config on a private copy of the demo data, its record written into run/, and run/adapter."""
    train = tmp_path / "train.jsonl"
    shutil.copy(REPO / "data/demo/train.jsonl", train)
    cfg = small_config(tmp_path / "run", data={"train": str(train), **data_section})
    (tmp_path / "run" / "adapter").mkdir(parents=True)
    data.write_data_record(cfg, tmp_path / "run")
    return cfg, train, tmp_path / "run" / "adapter"


def _append_row(path):
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps({"text": "A new lamp.", "price": 12.0}) + "\n")


def test_record_holds_each_files_sha256(tmp_path):
    cfg, train, adapter = _run(tmp_path)
    record = json.loads((adapter.parent / data.DATA_RECORD).read_text())
    import hashlib

    assert record == {"data.train": {"path": str(train), "sha256": hashlib.sha256(train.read_bytes()).hexdigest()}}
    hub = small_config(tmp_path, data={"train": "someone/some-dataset"})
    assert data.data_record(hub) == {"data.train": {"path": "someone/some-dataset", "sha256": None}}


def test_record_found_from_run_adapter_or_checkpoint_and_unchanged_data_passes_silently(tmp_path, caplog):
    cfg, _, adapter = _run(tmp_path)
    with caplog.at_level(logging.WARNING, logger="train"):
        data.check_data_record(cfg, adapter)
        data.check_data_record(cfg, adapter.parent)  # RUN_DIR or ADAPTER_DIR: the record is found either way
    ckpt = adapter.parent / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    _append_row(Path(cfg.data.train))
    with pytest.raises(UserError, match="changed since this run was fit"):  # a checkpoint evaluated: the run's record
        data.check_data_record(cfg, ckpt)
    assert caplog.records == []


def test_changed_train_file_with_held_out_eval_is_refused_in_one_line(tmp_path, caplog):
    cfg, train, adapter = _run(tmp_path)
    old = json.loads((adapter.parent / data.DATA_RECORD).read_text())["data.train"]["sha256"]
    _append_row(train)
    with pytest.raises(UserError) as e:
        data.check_data_record(cfg, adapter)
    msg = str(e.value)
    assert msg.startswith(f"{train} changed since this run was fit (sha256 {old[:12]} recorded in "
                          f"{adapter.parent / data.DATA_RECORD}): the eval rows it scores")
    assert "may include rows the adapter trained on" in msg and "\n" not in msg
    assert msg.endswith("or accept the change with --set eval.on_data_change=warn")
    cfg.eval.on_data_change = "warn"  # accepted: one warning line instead
    with caplog.at_level(logging.WARNING, logger="train"):
        data.check_data_record(cfg, adapter)
    assert [r.getMessage() for r in caplog.records] == [msg.split("; restore the file")[0]]


def test_changed_train_file_feeding_only_the_baseline_warns(tmp_path, caplog):
    other = tmp_path / "eval.jsonl"
    shutil.copy(REPO / "data/demo/eval.jsonl", other)
    cfg, train, adapter = _run(tmp_path, eval=str(other), eval_fraction=0.0)
    _append_row(train)
    with caplog.at_level(logging.WARNING, logger="train"):
        data.check_data_record(cfg, adapter)  # the eval rows come from data.eval: no leak, a warning
    assert len(caplog.records) == 1 and "constant baseline's train answers" in caplog.records[0].getMessage()
    _append_row(other)  # the eval file the run recorded changed: its rows are what eval scores
    with pytest.raises(UserError, match=f"^{other} changed since this run was fit"):
        data.check_data_record(cfg, adapter)
    cfg.data.eval = str(REPO / "data/demo/eval.jsonl")  # --data FILE: the user's choice, not checked
    data.check_data_record(cfg, adapter)


def test_a_run_without_record_warns_once(tmp_path, caplog):
    cfg, _, adapter = _run(tmp_path)
    (adapter.parent / data.DATA_RECORD).unlink()
    with caplog.at_level(logging.WARNING, logger="train"):
        data.check_data_record(cfg, adapter)
    assert len(caplog.records) == 1 and f"no {data.DATA_RECORD}" in caplog.records[0].getMessage()
