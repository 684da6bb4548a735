"""Quiet by default: one progress display (our step lines, no tqdm bar), each library line at most once and
none that is not about the user's run, no wandb line when the run reports nowhere, and `fit` ends with a
short table instead of a JSON dump."""

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from conftest import REPO
from train.fit import summary_lines
from train.callbacks import StepLines, format_duration
from train.reporting import LibraryLogFilter


def run_cli(tmp_path: Path, *sets: str) -> str:
    """`python -m train fit` as a user runs it (stdout and stderr together), with WANDB_MODE=offline set
    in the environment as scripts/test.sh does; the run reports nowhere (log.report_to: [])."""
    raw = yaml.safe_load((REPO / "configs/tiny.yaml").read_text(encoding="utf-8"))
    raw["run"]["output_dir"] = str(tmp_path / "run")
    raw["data"].update(train=str(REPO / "data/demo/train.jsonl"), eval=None, eval_fraction=0.25, max_rows=24,
                       max_length=96)
    # epochs, not max_steps: accelerate's "The used dataset had no length" came at each epoch's end, 4 times
    raw["train"].update(max_steps=None, epochs=1, batch_size=4, save_every=2, eval_every=3)
    raw["eval"].update(during_training_limit=3, max_new_tokens=4, batch_size=3)
    assert raw["log"]["report_to"] == []
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run([sys.executable, "-m", "train", "fit", str(cfg), *sets], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    out = proc.stdout.decode("utf-8")  # bytes, so a tqdm bar's carriage returns are kept
    assert proc.returncode == 0, out[-3000:]
    return out


def test_a_fit_prints_only_what_is_about_the_run(tmp_path):
    text = run_cli(tmp_path)
    lines = text.splitlines()
    assert "wandb" not in text.lower()
    assert "it/s" not in text and "s/it" not in text and "%|" not in text and "\r" not in text  # no tqdm bar
    assert "The used dataset had no length" not in text
    assert "{" not in text  # no raw dict per step, no JSON dump at the end
    assert all(line.startswith("[train] ") for line in lines), text
    assert len(lines) == len(set(lines)), text  # nothing said twice
    steps = [line for line in lines if line.startswith("[train] step ") and " loss " in line]
    assert steps[0].startswith("[train] step 1/5  loss ") and " s/step, " in steps[0] and steps[0].endswith(" left")
    assert steps[-1].startswith("[train] step 5/5  loss ")
    assert any(line.startswith("[train] step 3/5  eval_loss ") for line in lines)
    assert lines[-3].startswith(f"[train] adapter saved to {tmp_path / 'run' / 'adapter'} (all metrics: ")
    header = lines[-2].removeprefix("[train] ")
    assert header.split()[:6] == ["step", "epoch", "train", "loss", "eval", "loss"]  # then the task metrics
    assert lines[-1].split()[1:3] == ["5", "1.00"] and len(lines[-1]) == len(lines[-2])


def test_step_lines_about_twenty_a_run_and_none_after_training(caplog):
    lines = StepLines()
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, max_steps=100)
    with caplog.at_level(logging.INFO, logger="train"):
        lines.on_train_begin(None, state, None)
        for step in range(1, 101):
            state.global_step = step
            lines.on_log(None, state, None, logs={"loss": 1.0, "learning_rate": 1e-4, "grad_norm": 0.5})
            if step == 50:
                lines.on_log(None, state, None, logs={"eval_loss": 0.9})
        lines.on_train_end(None, state, None)
        lines.on_log(None, state, None, logs={"eval_loss": 0.8})
    said = [r.getMessage() for r in caplog.records]
    shown = [int(m.split()[1].split("/")[0]) for m in said if " loss " in m]
    assert shown == [1, *range(5, 101, 5)]
    assert said.count("step 50/100  eval_loss 0.9000") == 1
    assert not [m for m in said if "0.8000" in m]
    assert said[0].startswith("step 1/100  loss 1.0000  lr 1.00e-04  grad 0.5  ")


def test_format_duration():
    assert [format_duration(s) for s in (0.4, 12, 65, 3 * 3600 + 125)] == ["0s", "12s", "1m05s", "3h02m"]


def record(name: str, message: str, level=logging.WARNING) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_library_lines_once_and_only_about_the_run():
    f = LibraryLogFilter()
    assert f.filter(record("transformers.trainer", "a warning")) is True
    assert f.filter(record("transformers.trainer", "a warning")) is False  # said once already
    assert f.filter(record("peft.tuners", "a warning")) is True  # another library's own line
    no_length = "[RANK 0] The used dataset had no length, returning gathered tensors. You should drop the remainder"
    assert f.filter(record("accelerate.accelerator", no_length, logging.INFO)) is False
    assert f.filter(record("transformers.trainer_utils", "mtime may not be reliable on this filesystem, falling "
                                                         "back to numerical ordering")) is False
    assert f.filter(record("train", "step 1/5")) is True and f.filter(record("train", "step 1/5")) is True


def test_closing_table():
    run = Path("runs/x")
    lines = summary_lines(run, {"global_step": 150, "epoch": 1.5, "train_loss": 1.23456, "eval_loss": 1.2,
                                "eval_mae": 122.4, "eval_hit_rate": 0.38, "eval_runtime": 3.2, "eval_parsed": 99.0})
    assert lines == [
        f"adapter saved to {run / 'adapter'} (all metrics: {run / 'adapter/training_meta.json'}; "
        f"per step: {run / 'metrics.jsonl'})",
        "  step  epoch  train loss  eval loss  eval mae  eval hits",
        "   150   1.50      1.2346     1.2000     122.4        38%"]
