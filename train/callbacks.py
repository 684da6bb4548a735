"""Owns the TrainerCallbacks of a run: per-step metrics.jsonl rows, the step lines (the one progress display),
and the COMPLETE marker of each saved checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from train import checkpoints
from train.config import Config

log = logging.getLogger("train")

METRIC_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm",
               "num_input_tokens_seen": "tokens_seen", "epoch": "epoch"}

class MetricsFile(TrainerCallback):
    """Per-step metrics to RUN/metrics.jsonl (main process only), one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.monotonic()
        self.ends: dict[int, tuple] = {}  # step -> (time_s, gpu_peak_gb) at its end: a late log (late_log.py) comes later

    def now(self) -> tuple:
        """(time_s, gpu_peak_gb or None) as of now."""
        peak = round(torch.cuda.max_memory_allocated() / 1e9, 3) if torch.cuda.is_available() else None
        return round(time.monotonic() - self.t0, 3), peak

    def on_step_end(self, args, state, control, **kwargs):
        self.ends[state.global_step] = self.now()
        self.ends = {s: v for s, v in self.ends.items() if s >= state.global_step - 1}  # at most one log waits

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now = self.now()
        at, peak = self.ends.get(state.global_step, now) if "loss" in logs else now  # a training step's row: its end
        row: dict[str, Any] = {"step": state.global_step, "time_s": at}
        if peak is not None:
            row["gpu_peak_gb"] = peak
        for key, value in logs.items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                row[METRIC_KEYS.get(key, key)] = value
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop rows logged after the checkpoint so the file equals an uninterrupted run's.
    A torn last line (the process was killed mid-write) is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    checkpoints.write_atomic(path, "".join(line + "\n" for line in kept))


class StepLines(TrainerCallback):
    """The one progress display: a short line about 20 times a run (and at least every EVERY_S seconds), and
    at every eval during training, with the pace and the time left. No tqdm bar (a bar and lines garble each
    other, and a bar is noise in log files), no raw dict per logging step (every step is in metrics.jsonl)."""

    SHOWN = {"loss": "loss {:.4f}", "learning_rate": "lr {:.2e}", "grad_norm": "grad {:.3g}",
             "eval_loss": "eval_loss {:.4f}", "eval_mae": "eval_mae {:.4g}", "eval_hit_rate": "eval_hits {:.0%}",
             "eval_accuracy": "eval_acc {:.2%}"}
    EVERY_S = 300.0  # long runs still print every 5 minutes, so a log never looks stuck

    def __init__(self):
        self.training = False
        self.t0 = self.last = 0.0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.training, self.first_step = True, state.global_step  # a resume starts past 0
        self.t0 = self.last = time.monotonic()

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False  # the final eval's numbers go into fit's closing table instead

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (state.is_world_process_zero and self.training and logs):
            return
        step, now = state.global_step, time.monotonic()
        is_eval = any(k.startswith("eval_") for k in logs)
        due = (step % max(1, state.max_steps // 20) == 0 or step in (self.first_step + 1, state.max_steps)
               or now - self.last >= self.EVERY_S)
        if not is_eval and not ("loss" in logs and due):
            return
        parts = [fmt.format(logs[k]) for k, fmt in self.SHOWN.items() if isinstance(logs.get(k), (int, float))]
        if not parts:
            return
        if not is_eval:
            parts.append(self.pace(step, state.max_steps, now))
        self.last = now
        log.info("step %d/%d  %s", step, state.max_steps, "  ".join(parts))

    def pace(self, step: int, max_steps: int, now: float) -> str:
        per_step = (now - self.t0) / max(1, step - self.first_step)
        return f"{per_step:.2f} s/step, {format_duration(per_step * max(0, max_steps - step))} left"


def format_duration(seconds: float) -> str:
    """3h02m, 4m05s, 12s."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class MarkComplete(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.schedule_start: int | None = None  # set by extend_schedule: recorded in each checkpoint

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                checkpoints.mark_complete(ckpt, self.cfg, self.schedule_start)

