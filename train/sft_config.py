"""Owns config -> trl.SFTConfig: build_sft_config (pure: no model or data) and the run-time choices it reads
(Liger kernels, gradient checkpointing)."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from train.config import Config
from train.kernels import attention
from train.precision import use_bf16

log = logging.getLogger("train")


def use_liger(cfg: Config) -> bool:
    """train.liger on a GPU, where liger-kernel imports; otherwise off, with a one-line notice (it is a
    speed-up, never a reason to stop a run)."""
    if not cfg.train.liger or not torch.cuda.is_available():
        return False
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
        # tokens/s that counts real tokens only (padding-free batches have none to exclude, and "all" is counted on
        # the host: QLoRATrainer._track_num_input_tokens)
        include_num_input_tokens_seen="all" if packing != "none" else "non_padding",
        # a NaN or inf loss is logged as it is: Trainer's filter would log the running mean instead, and its check
        # waits for each micro-step's backward to finish, so the GPU idles through the optimizer's host work
        logging_nan_inf_filter=False,
        # batches are pinned (dataloader_pin_memory) and copied to the GPU without waiting for the step before
        accelerator_config={"non_blocking": True},
        report_to=cfg.log.report_to or "none",
        run_name=cfg.log.run_name or run.name,
        seed=cfg.run.seed,
        # padding_free: TRL flattens each micro-batch's rows; data.py has already cut rows to
        # data.max_length, and TRL refuses max_length without bin packing
        max_length=None if packing == "padding_free" else cfg.data.max_length,
        packing=packing == "bfd",
        # eval rows stay rows, never packed into bins: the eval loss is summed per row (loss.row_nll), on the rows
        # `train eval` scores
        eval_packing=False,
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
