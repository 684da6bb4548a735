"""Owns runs that reach the end of their lr schedule: restoring a finished checkpoint as trained, or training
past it on a new schedule for the extra steps."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from train import patches
from train.callbacks import MarkComplete

log = logging.getLogger("train")


def restore_finished(sft, ckpt: Path) -> dict[str, Any]:
    """Training already reached its last step in `ckpt`: load its adapter and state, train nothing."""
    from transformers import TrainerState

    log.info("%s is the last step of this run: training is complete, restoring it to save the adapter", ckpt.name)
    patches.load_checkpoint(sft, str(ckpt))  # checkpoint_loaded_hook keeps the LoRA weights in their training dtype
    sft.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    losses = [e["loss"] for e in sft.state.log_history if "loss" in e]
    return {"train_loss": sum(losses) / len(losses) if losses else None, "global_step": sft.state.global_step}


def target_steps(sft) -> int:
    """The optimizer step this run trains to, as the Trainer computes it (train.max_steps, or train.epochs
    times the optimizer steps per epoch)."""
    if sft.args.max_steps > 0:
        return sft.args.max_steps
    return sft.set_initial_training_values(sft.args, sft.get_train_dataloader())[-1]


def extend_schedule(sft, start: int, target: int | None = None) -> None:
    """Train past the end of a finished run's lr schedule (at step `start`) on a new schedule for the extra
    steps only: train.lr_scheduler from train.lr, with train.warmup_ratio of them as warmup. Resuming the old
    one would run them at its end lr (0 for cosine and linear). Every later checkpoint records `start`, so a
    resume inside the extension rebuilds this schedule. `target`: announce it (the step trained to)."""
    sft.extension_start = start
    for callback in sft.callback_handler.callbacks:
        if isinstance(callback, MarkComplete):
            callback.schedule_start = start
    if target is not None:
        a = sft.args
        kind = getattr(a.lr_scheduler_type, "value", a.lr_scheduler_type)  # a SchedulerType enum after validation
        log.info("checkpoint-%d ended its run's lr schedule; steps %d-%d get a new %s schedule from train.lr=%g "
                 "(%d warmup steps)", start, start + 1, target, kind, a.learning_rate, a.get_warmup_steps(target - start))

