"""Owns the Trainer: the SFTTrainer subclass (QLoRATrainer) and build_trainer, which assembles it with the run's
SFTConfig and callbacks."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from train import checkpoints, fused_head, late_log, lora, optim, patches, sampler, step_walks
from train.callbacks import MarkComplete, MetricsFile, StepLines
from train.config import Config
from train.kernels import liger_launch
from train.kernels.long_rows import LongRows
from train.loss import labelled_positions_loss, row_nll
from train.reporting import setup_reporting
from train.sft_config import build_sft_config


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

        @staticmethod
        def get_optimizer_cls_and_kwargs(args, model=None):
            """Trainer's choice, with bitsandbytes' 32-bit AdamW stepping a whole group at once (train/optim.py)."""
            cls, kwargs = SFTTrainer.get_optimizer_cls_and_kwargs(args, model)
            return optim.optimizer_class(cls, kwargs), kwargs

        def floating_point_ops(self, inputs):
            """Trainer's estimate, 6 x input tokens x non-embedding parameters (its documented override), with the
            parameters counted once: Trainer counts them every step, walking each one (bitsandbytes' 4-bit ones
            through a Python __torch_function__): ~2 ms a step on the GPU hosts (docs/benchmarks.md, session 10)."""
            main = getattr(self.model, "main_input_name", "input_ids")
            if main not in inputs or not hasattr(self.model, "num_parameters"):
                return 0
            cached = self.__dict__.get("_flos_params")
            if cached is None or cached[0] is not self.model:
                params = self.model.num_parameters(exclude_embeddings=True)
                cached = self.__dict__["_flos_params"] = (self.model, params)
            return 6 * inputs[main].numel() * cached[1]

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
                patches.restart_schedule(self.optimizer, self.lr_scheduler, fresh)

        def __init__(self, *args, **kwargs):
            self.late = late_log.LateLog()  # this trainer's metrics on the device, and a step's log read a step late
            super().__init__(*args, **kwargs)

        def train(self, *args, **kwargs):
            """Trainer.train; a step whose log was still waiting (late_log) is logged even when training raises (an
            interrupt, an OOM): the rows before a crash are the ones worth reading. The model's per-step walks
            (model.train(), zero_grad()) are flat loops while it trains (train/step_walks.py)."""
            step_walks.install(self.model, self.accelerator)
            try:
                return super().train(*args, **kwargs)
            finally:
                for model in {id(m): m for m in (self.model, self.model_wrapped)}.values():  # DDP: the clip's lists
                    step_walks.uninstall(model)
                self.late.flush_quietly(self)

        def clip_parameters_hook(self, model) -> list:
            """The model's parameters for the clip, without walking the model each step (train/step_walks.py)."""
            return step_walks.parameters(model)

        def step_end_hook(self, tr_loss, grad_norm, learning_rate, start_time) -> bool:
            return self.late.step_end(self, tr_loss, grad_norm, learning_rate, start_time)

        def log(self, logs, start_time=None):
            """Any log first writes the step still waiting (late_log), then folds this window's device metrics in."""
            if not self.late.flushing:
                self.late.flush(self)
                if self.model.training:
                    self.late.settle(self)
            super().log(logs, start_time)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            """On GPU, TRL's fused LM head (Triton, labelled positions only), its metrics left on the device
            (late_log). Its CPU fallback projects every position through the LM head in fp32 tiles: on SmolLM2-135M
            (vocab 49k) that was 40% of a CPU step (docs/benchmarks.md). There, project only the positions that
            carry a label."""
            index = fused_head.pop(inputs)  # the labelled positions, when the collator adds them (fused_head.py)
            if torch.cuda.is_available() and not return_outputs and late_log.plain_loss(self):
                index = index if fused_head.usable(self, model, index) else None
                return late_log.late_loss(self, model, inputs, num_items_in_batch, index)
            if torch.cuda.is_available() or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = labelled_positions_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, the count spans all ranks
            return loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            """Eval loss by loss.row_nll, the definition `train eval` uses: each row's NLL sum and token count,
            gathered (without the rows accelerate repeats to even out the ranks) for evaluation_loop."""
            fused_head.pop(inputs)  # the training head's index: the eval forward reads every position itself
            if not prediction_loss_only:
                return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            inputs = patches.prepare_inputs(self, inputs)
            with torch.no_grad(), self.compute_loss_context_manager():
                rows = row_nll(model, inputs)
            self.eval_rows.append(self.gather_function(rows).cpu())
            total = rows.sum(dim=0)
            return total[0] / total[1].clamp(min=1), None, None

        def evaluation_loop(self, *args, **kwargs):
            """The eval loss is token-weighted over the whole eval set (sum of NLL / labelled tokens), not
            transformers' mean of per-batch means, so it equals `train eval`'s loss on the same rows."""
            self.eval_rows = []
            output = super().evaluation_loop(*args, **kwargs)
            if self.eval_rows:
                nll, tokens = torch.cat(self.eval_rows).double().sum(dim=0).tolist()
                output.metrics[f"{kwargs.get('metric_key_prefix', 'eval')}_loss"] = nll / max(tokens, 1.0)
            return output

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
    """The run's QLoRATrainer: its SFTConfig, metrics.jsonl and checkpoint-marker callbacks, our step lines."""
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
    trainer.add_callback(LongRows(cfg))  # train.offload_checkpoints, train.tile_mlp: installed as training begins
    if fused_head.enabled():  # each batch also carries its labelled positions, computed on the host
        trainer.data_collator = fused_head.LabelIndex(trainer.data_collator)
    if args.use_liger_kernel:  # Liger's kernels launchable directly (each launch asks TRAIN_LIGER_RELAUNCH)
        liger_launch.install()
    return trainer
