"""Trainer assembly: config -> SFTConfig, callbacks (metrics.jsonl, checkpoint markers), SFTTrainer."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from train import attention, checkpoints, lora, sampler
from train.config import Config

log = logging.getLogger("train")

METRIC_KEYS = {"loss": "loss", "learning_rate": "lr", "grad_norm": "grad_norm",
               "num_input_tokens_seen": "tokens_seen", "epoch": "epoch"}


def use_liger(cfg: Config) -> bool:
    """train.liger on a GPU, where liger-kernel imports; otherwise off, with a one-line notice (it is a
    speed-up, never a reason to stop a run)."""
    if not cfg.train.liger or not torch.cuda.is_available():
        return False
    import importlib.util

    if importlib.util.find_spec("liger_kernel") is None:
        log.warning("train.liger: liger-kernel is not installed, so RMSNorm/SwiGLU/RoPE run unfused "
                    "(pip install liger-kernel, or set train.liger: false to silence this)")
        return False
    return True


def use_bf16(cfg: Config) -> bool:
    if cfg.train.bf16 is not None:
        return cfg.train.bf16
    if cfg.quant.compute_dtype != "bfloat16":
        return False
    return not torch.cuda.is_available() or torch.cuda.is_bf16_supported()


def precision_context(cfg: Config):
    """The autocast training runs under (accelerate wraps the trained model's forward in it).
    Evaluation uses it too, so a reloaded adapter computes exactly what the trained model did."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16(cfg))


def build_sft_config(cfg: Config, run: Path, has_eval: bool):
    """config -> trl.SFTConfig. Pure: no model or data needed."""
    from trl import SFTConfig

    t = cfg.train
    packing = attention.effective_packing(cfg)
    eval_steps = t.eval_every if has_eval and t.eval_every else None
    return SFTConfig(
        output_dir=str(run / "checkpoints"),
        max_steps=t.max_steps or -1,
        num_train_epochs=t.epochs or 1.0,
        learning_rate=t.lr,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float in [0, 1) is a ratio of total steps in transformers 5
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        optim=t.optimizer if torch.cuda.is_available() or "paged" not in t.optimizer else "adamw_torch",
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        gradient_checkpointing=t.gradient_checkpointing,
        # reentrant: the first forward runs under no_grad, so no autograd graph or saved-tensor hooks are built
        # for it: +7% tokens/s on the host-bound fast path (docs/benchmarks.md). TRL makes the frozen base's
        # inputs require grad so gradients still reach LoRA; PEFT + ZeRO-3 needs reentrant anyway
        gradient_checkpointing_kwargs={"use_reentrant": True},
        bf16=use_bf16(cfg),
        use_cpu=not torch.cuda.is_available(),  # transformers 5 refuses bf16 on CPU unless told
        save_strategy="steps",
        save_steps=t.save_every,
        save_total_limit=t.save_total_limit,
        eval_strategy="steps" if eval_steps else "no",
        eval_steps=eval_steps,
        logging_steps=t.logging_steps,
        # tokens/s that counts real tokens only (padding-free batches have none to exclude, and "all"
        # avoids a device sync per step)
        include_num_input_tokens_seen="all" if packing != "none" else "non_padding",
        report_to=cfg.log.report_to or "none",
        run_name=cfg.log.run_name or run.name,
        seed=cfg.run.seed,
        # padding_free: TRL flattens each micro-batch's rows; data.py has already cut rows to
        # data.max_length, and TRL refuses max_length without bin packing
        max_length=None if packing == "padding_free" else cfg.data.max_length,
        packing=packing == "bfd",
        packing_strategy="bfd",  # best-fit decreasing: whole rows, never split, positions restart per row
        padding_free=packing != "none",
        use_liger_kernel=use_liger(cfg),
        dataset_num_proc=None,
        disable_tqdm=False,  # progress bar even when log_level is quiet
        log_level="warning",
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient; True would slow each DDP step
        # each optimizer step's rows (the same set as a random sampler's) are split so that every rank and
        # accumulation step gets about the same tokens: under DDP a step lasts as long as its slowest rank
        # (train/sampler.py)
        train_sampling_strategy="batch_rebalance",
    )


class MetricsFile(TrainerCallback):
    """Per-step metrics to RUN/metrics.jsonl (main process only), one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path
        self.t0 = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, "time_s": round(time.monotonic() - self.t0, 3)}
        if torch.cuda.is_available():
            row["gpu_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 3)
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


class CompactProgress(ProgressCallback):
    """The progress bar, plus one short line about 20 times a run and at every eval, instead of the
    Trainer's raw dict every logging step (every step goes to metrics.jsonl anyway)."""

    SHOWN = {"loss": "loss {:.4f}", "learning_rate": "lr {:.2e}", "grad_norm": "grad {:.3g}",
             "eval_loss": "eval_loss {:.4f}", "eval_mae": "eval_mae {:.4g}", "eval_hit_rate": "eval_hits {:.0%}",
             "eval_accuracy": "eval_acc {:.2%}"}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or not logs:
            return
        every = max(1, state.max_steps // 20)
        is_eval = any(k.startswith("eval_") for k in logs)
        if not is_eval and "loss" in logs and state.global_step % every and state.global_step != 1:
            return
        parts = [fmt.format(logs[k]) for k, fmt in self.SHOWN.items() if isinstance(logs.get(k), (int, float))]
        if parts:
            self.training_bar.write(f"step {state.global_step}/{state.max_steps}  " + "  ".join(parts))


class MarkComplete(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                checkpoints.mark_complete(ckpt, self.cfg)


class GracefulStop(TrainerCallback):
    """SIGINT/SIGTERM (Ctrl-C, cluster preemption): finish the step, save a checkpoint, stop.

    A second signal aborts at once (KeyboardInterrupt) for users who really want out.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step (send it again to abort without saving)",
                    self.requested)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True


def restore_finished(sft, ckpt: Path) -> dict[str, Any]:
    """Training already reached its last step in `ckpt`: load its adapter and state, train nothing."""
    from transformers import TrainerState

    log.info("%s is the last step of this run: training is complete, restoring it to save the adapter", ckpt.name)
    sft._load_from_checkpoint(str(ckpt))  # our override keeps the LoRA weights in their training dtype
    sft.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    losses = [e["loss"] for e in sft.state.log_history if "loss" in e]
    return {"train_loss": sum(losses) / len(losses) if losses else None, "global_step": sft.state.global_step}


def setup_reporting(cfg: Config) -> None:
    """wandb runs offline when no API key is configured, so a missing account never blocks training."""
    if "wandb" in cfg.log.report_to:
        os.environ.setdefault("WANDB_PROJECT", cfg.log.project)
        has_key = os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().is_file()
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: no API key found, logging offline (sync later with `wandb sync`)")


def trainer_class():
    from trl import SFTTrainer

    class QLoRATrainer(SFTTrainer):
        """SFTTrainer whose resume keeps LoRA weights in the dtype they were trained in.

        Trainer reloads a checkpoint's adapter through peft, which upcasts it to fp32, while the
        uninterrupted run trains it in bf16 (TRL's QLoRA cast): resumed losses would drift. The
        model loads before the optimizer is built, so casting here keeps optimizer state consistent.
        """

        task_scorer = None  # callable(model) -> {"eval_mae": ...}: task metric logged with each eval

        def _get_train_sampler(self, train_dataset=None):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.balanced = sampler.rebalance_for(super()._get_train_sampler(train_dataset), self.args.padding_free, seed)
            return self.balanced

        def _run_epoch(self, model, epoch, *args, **kwargs):
            """transformers' set_epoch does not reach a batch sampler behind accelerate's SkipBatchSampler (a
            resume in the middle of an epoch, several ranks): a resume in epoch >= 1 replayed epoch 0's rows.
            Set the epoch on the sampler itself (tests/test_accelerate_configs.py resumes in epoch 1)."""
            if hasattr(getattr(self, "balanced", None), "set_epoch"):
                self.balanced.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):  # they keep fp32 master weights
                lora.match_training_dtypes(self.model, self.quant_mode)

        def evaluate(self, *args, **kwargs):
            """Loss from SFTTrainer, then the task metric (e.g. MAE) on a fixed eval subset, logged
            beside it (metrics.jsonl, wandb, tensorboard): users see the task improve, not just loss."""
            metrics = super().evaluate(*args, **kwargs)
            if self.task_scorer is not None:
                extra = self.task_scorer(self.model)
                self.log(extra)
                metrics.update(extra)
            return metrics

    return QLoRATrainer


def build_trainer(cfg: Config, model, tok, train_ds, eval_ds, run: Path, callbacks=(), task_scorer=None):
    setup_reporting(cfg)
    args = build_sft_config(cfg, run, eval_ds is not None)
    cls = trainer_class()
    cls.quant_mode = cfg.quant.mode
    cls.task_scorer = staticmethod(task_scorer) if task_scorer else None
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[MetricsFile(run / "metrics.jsonl"), MarkComplete(cfg), *callbacks],
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())
    return trainer
