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
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from train import checkpoints, lora, patches, sampler
from train.precision import use_bf16
from train.kernels import attention
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


def checkpointing(cfg: Config) -> bool:
    """train.gradient_checkpointing as run: None means on a GPU only (config.py says why)."""
    t = cfg.train.gradient_checkpointing
    return torch.cuda.is_available() if t is None else t


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
        gradient_checkpointing=checkpointing(cfg),
        # reentrant: the first forward runs under no_grad, so no autograd graph or saved-tensor hooks are built
        # for it: +7% tokens/s on the host-bound fast path (docs/benchmarks.md). TRL makes the frozen base's
        # inputs require grad so gradients still reach LoRA; PEFT + ZeRO-3 needs reentrant anyway
        gradient_checkpointing_kwargs={"use_reentrant": True},
        bf16=use_bf16(cfg),
        use_cpu=not torch.cuda.is_available(),  # transformers 5 refuses bf16 on CPU unless told
        prediction_loss_only=True,  # eval needs the loss only; without this TRL reruns each eval batch for logits
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
        # our step lines (StepLines) are the one progress display: a tqdm bar besides them garbles both in log
        # files and CI, and disable_tqdm also drops the eval bars
        disable_tqdm=True,
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
            self._previous[sig] = signal.signal(sig, self.handle_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def handle_signal(self, signum, frame):
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


def restart_schedule(optimizer, scheduler, fresh: dict[str, Any]) -> None:
    """Put the new schedule's start (`fresh`: its state before the checkpoint was loaded) back over the
    ended schedule and lr the checkpoint restored; the optimizer's moments stay the checkpoint's."""
    scheduler.load_state_dict(fresh)
    for group, base, lr in zip(optimizer.param_groups, fresh["base_lrs"], fresh["_last_lr"]):
        group["initial_lr"], group["lr"] = base, lr


def setup_reporting(cfg: Config) -> None:
    """wandb runs offline when no API key is configured, so a missing account never blocks training."""
    if "wandb" in cfg.log.report_to:
        os.environ.setdefault("WANDB_PROJECT", cfg.log.project)
        has_key = os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().is_file()
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: no API key found, logging offline (sync later with `wandb sync`)")
    import_integrations_quietly()
    quiet_library_logs()


def import_integrations_quietly() -> None:
    """transformers prints "[INFO] Running in WANDB offline mode" when its integrations module is first
    imported (by TRL's SFTTrainer) with WANDB_MODE=offline in the environment, even for a run that reports
    nowhere. Import it with WANDB_MODE hidden: a run that reports to wandb offline says so in our own line."""
    import importlib
    import sys

    name = "transformers.integrations.integration_utils"
    if name in sys.modules or "WANDB_MODE" not in os.environ:
        return
    mode = os.environ.pop("WANDB_MODE")
    try:
        importlib.import_module(name)
    finally:
        os.environ["WANDB_MODE"] = mode


class LibraryLogFilter(logging.Filter):
    """Library log lines: each at most once per process, and none of those that are not about the user's run.
    Our own ("train") lines always pass."""

    NOT_ABOUT_THE_RUN = (
        # accelerate, at each epoch's end, 4 times: TRL gathers per-batch metric scalars on one process, where
        # there is no padded remainder to drop
        "The used dataset had no length",
        # transformers, rotating checkpoints saved within a second of each other: it orders them by step
        # instead, which is what a run wants
        "mtime may not be reliable on this filesystem",
    )

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "train" or record.name.startswith("train."):
            return True
        message = record.getMessage()
        if any(text in message for text in self.NOT_ABOUT_THE_RUN) or (record.name, message) in self.seen:
            return False
        self.seen.add((record.name, message))
        return True


def quiet_library_logs() -> None:
    """Put one LibraryLogFilter on the handlers that print library logs: the root logger's (ours, and where
    accelerate, peft and datasets propagate) and transformers' own (its loggers do not propagate)."""
    handlers = [*logging.getLogger().handlers, *logging.getLogger("transformers").handlers]
    shared = next((f for h in handlers for f in h.filters if isinstance(f, LibraryLogFilter)), None) or LibraryLogFilter()
    for handler in handlers:
        if shared not in handler.filters:
            handler.addFilter(shared)


def trainer_class():
    from trl import SFTTrainer

    class QLoRATrainer(patches.trainer_hooks(SFTTrainer)):
        """SFTTrainer whose resume keeps LoRA weights in the dtype they were trained in. The *_hook methods
        are called from private Trainer methods by train/patches.py (trainer_hooks).

        Trainer reloads a checkpoint's adapter through peft, which upcasts it to fp32, while the
        uninterrupted run trains it in bf16 (TRL's QLoRA cast): resumed losses would drift. The
        model loads before the optimizer is built, so casting here keeps optimizer state consistent.
        """

        task_scorer = None  # callable(model) -> {"eval_mae": ...}: task metric logged with each eval

        def train_sampler_hook(self, train_sampler):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            self.balanced = sampler.rebalance_for(train_sampler, self.args.padding_free, seed)
            return self.balanced

        def epoch_begin_hook(self, epoch):
            """transformers' set_epoch does not reach a batch sampler behind accelerate's SkipBatchSampler (a
            resume in the middle of an epoch, several ranks): a resume in epoch >= 1 replayed epoch 0's rows.
            Set the epoch on the sampler itself (tests/test_accelerate_configs.py resumes in epoch 1)."""
            if hasattr(getattr(self, "balanced", None), "set_epoch"):
                self.balanced.set_epoch(epoch)

        def checkpoint_loaded_hook(self):
            if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):  # they keep fp32 master weights
                lora.match_training_dtypes(self.model, self.quant)

        extension_start = None  # step where a finished run's schedule ended and a new one began (extend_schedule)

        def create_scheduler(self, num_training_steps, optimizer=None):
            """In an extended run the schedule covers the steps after extension_start only."""
            return super().create_scheduler(num_training_steps - (self.extension_start or 0), optimizer)

        def optimizer_load_hook(self, checkpoint, fresh):
            """Resuming at the start of an extension: keep the checkpoint's optimizer moments, not its ended
            schedule (inside an extension the checkpoint's schedule is the extension's: loaded as usual)."""
            if checkpoint and fresh and self.extension_start == checkpoints.checkpoint_step(Path(checkpoint)):
                restart_schedule(self.optimizer, self.lr_scheduler, fresh)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """On GPU, TRL's fused LM head (Triton, labelled positions only). Its CPU fallback projects every
            position through the LM head in fp32 tiles: on SmolLM2-135M (vocab 49k) that was 40% of a CPU step
            (docs/benchmarks.md). There, project only the positions that carry a label."""
            if torch.cuda.is_available() or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = labelled_positions_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, the count spans all ranks
            return loss

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


def labelled_positions_loss(model, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
    """Mean next-token NLL over labelled tokens, computing logits only where a label follows: the
    backbone's hidden states at those positions (`logits_to_keep` with indices) -> LM head -> fp32 CE.
    Every row of the batch is scored at the union of the rows' labelled positions; the rest are masked."""
    labels = inputs["labels"]
    targets = labels[:, 1:]
    keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)  # positions whose next token is labelled
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    logits = model(**forward, use_cache=False, logits_to_keep=keep).logits
    picked = targets[:, keep]
    nll = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.size(-1)), picked.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (picked != -100).sum()
    return nll / torch.as_tensor(count, device=nll.device).clamp(min=1)


def build_trainer(cfg: Config, model, tok, train_ds, eval_ds, run: Path, callbacks=(), task_scorer=None):
    setup_reporting(cfg)
    args = build_sft_config(cfg, run, eval_ds is not None)
    cls = trainer_class()
    cls.quant = cfg.quant
    cls.task_scorer = staticmethod(task_scorer) if task_scorer else None
    trainer = cls(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[MetricsFile(run / "metrics.jsonl"), MarkComplete(cfg), *callbacks],
    )
    lora.match_training_dtypes(trainer.model, cfg.quant)  # after TRL's bf16 cast: fp32 LoRA with fp32 compute
    # the one progress display: no tqdm bar, and not the raw dict per log PrinterCallback prints under disable_tqdm
    for default in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default)
    trainer.add_callback(StepLines())
    return trainer
