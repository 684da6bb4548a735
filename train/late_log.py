"""Owns reading each training step's logged numbers one step late, so that the host never waits for the GPU inside a
training step: the loss, the gradient norm and TRL's token metrics stay on the device until the next step is queued.

Why: with logging every step (train.logging_steps: 1), transformers' Trainer reads the loss and the gradient norm with
`.item()` as each step ends, and TRL's compute_loss reads its entropy, token accuracy and token count the same way
after each forward. Each read makes the host wait until the GPU has finished everything queued; the GPU then idles
while the host logs, fetches the next batch and launches the next forward (~35 ms at each end of a 0.8 s step on an
H100, docs/benchmarks.md "Session 9"). Here a logging step's numbers are copied to pinned memory behind the step and
logged when the next step has been queued, with the step, epoch and token count they belong to. A step that saves,
evaluates or ends training logs at once, as before, so checkpoints and the final metrics hold every step's row; so does
a step whose loss took TRL's own compute_loss (not plain_loss), which has read its metrics already. What a callback
asks for in on_log (stop, save, evaluate) is done at the end of the step after, where the row is written.

TRAIN_LATE_LOG=0 turns it off (TRL's compute_loss and Trainer's logging, a sync each): the bench's A/B.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any, NamedTuple

import torch

from train import fused_head, patches

log = logging.getLogger("train")

ENV = "TRAIN_LATE_LOG"
METRICS = ("entropy", "mean_token_accuracy")  # TRL's per-micro-batch means, averaged over a logging window


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def plain_loss(trainer) -> bool:
    """TRL's compute_loss takes its plain path here (the fused LM head's NLL, no label smoothing, custom loss, DFT, MoE
    aux loss or sequence parallelism): the one late_loss reproduces."""
    args = trainer.args
    parallel = getattr(trainer.accelerator, "parallelism_config", None)
    return (enabled() and trainer.model.training and trainer.compute_loss_func is None and trainer.label_smoother is None
            and args.loss_type == "nll" and not getattr(trainer, "aux_loss_enabled", False)
            and not getattr(parallel, "sp_enabled", False))


def late_loss(trainer, model, inputs, num_items_in_batch=None, index=None):
    """TRL SFTTrainer.compute_loss on its plain path (trl 1.16, sft_trainer.py), with the metrics kept on the device
    (trainer.late.pending) instead of read with `.item()`: the same loss, the same numbers logged. With the labelled
    positions' `index`, the head runs without device syncs (train/fused_head.py)."""
    inputs["use_cache"] = False
    if index is not None:
        outputs = fused_head.forward(trainer, model, inputs, index)
    else:
        outputs = model(**inputs, fused_lm_head=True)
    num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = -outputs.log_probs.sum() / torch.as_tensor(num_tokens).clamp(min=1)
    if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
        loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())  # as TRL: DDP averages
    trainer.late.record(trainer, outputs, inputs)
    return loss


class _Staged(NamedTuple):
    """A logging step read a step late: its numbers' pinned copy and event, and what its log needs beside them."""
    host: torch.Tensor  # loss sum, then the grad norm (when a tensor), then the window's device metrics
    event: Any  # torch.cuda.Event behind the copy; None on CPU
    steps: int  # steps since the last log (the loss sum is over them)
    grad_norm: Any
    rate: float
    window: dict  # metric -> per-micro-batch values (device tensors or host ints)
    where: tuple  # (global_step, epoch, num_input_tokens_seen) of the step
    start_time: float | None


class LateLog:
    """A trainer's device-side metrics since the last log, and the logging step waiting to be read."""

    def __init__(self):
        self.pending: dict[str, list] = defaultdict(list)  # metric -> this window's per-micro-batch values
        self.staged: _Staged | None = None
        self.flushing = False
        self.checked = False  # patches.check_trainer_state ran on this trainer

    def record(self, trainer, outputs, inputs) -> None:
        """One micro-batch's entropy, token accuracy and token count, as TRL computes them, left on the device."""
        gather = trainer.accelerator.gather_for_metrics
        valid = gather(outputs.label_mask.sum()).sum()
        entropy = gather(outputs.entropy.detach().sum()).sum()
        correct = gather(outputs.is_top1.sum()).sum()
        denom = valid.clamp(min=1)  # TRL logs 0.0 when nothing is labelled: both sums are 0 then
        self.pending["entropy"].append(entropy / denom)
        self.pending["mean_token_accuracy"].append(correct / denom)
        if "attention_mask" in inputs:
            self.pending["tokens"].append(gather(inputs["attention_mask"].sum()).sum())
        elif "position_ids" not in inputs:
            raise ValueError("Expected 'attention_mask' or 'position_ids' in inputs.")  # TRL's words
        elif trainer.accelerator.num_processes == 1:
            self.pending["tokens"].append(inputs["position_ids"].size(1))  # a host int: no device round trip
        else:
            n = inputs["position_ids"].size(1)
            self.pending["tokens"].append(gather(torch.full((), n, device=inputs["position_ids"].device)).sum())

    def settle(self, trainer, values: dict[str, list] | None = None) -> None:
        """Fold a window's metrics (read values, or else this window's pending ones, read now) into TRL's
        trainer._metrics["train"], where its log() averages them."""
        if values is None:
            values = {k: [float(v) for v in vs] for k, vs in self.pending.items()}
            self.pending.clear()
        metrics = trainer._metrics["train"]
        for key in METRICS:
            if values.get(key):  # (TRL's log() divides by each list's length)
                metrics[key].extend(values[key])
        if values.get("tokens"):
            trainer._total_train_tokens += int(sum(values["tokens"])) // trainer._tp_size
            metrics["num_tokens"] = [trainer._total_train_tokens]

    def step_end(self, trainer, tr_loss, grad_norm, learning_rate, start_time) -> bool:
        """At a step's end, where Trainer would log: the step waiting before is logged now, and this one is staged
        (True: Trainer's own log, save and evaluate have nothing left to do this step) unless it saves, evaluates,
        ends training or is not a logging step (False: Trainer goes on as usual)."""
        self.flush(trainer)
        if not self.checked:
            patches.check_trainer_state(trainer)
            self.checked = True
        control, state = trainer.control, trainer.state
        if not (enabled() and control.should_log and state.global_step > trainer._globalstep_last_logged) or \
                control.should_save or control.should_evaluate or control.should_training_stop:
            return False
        if any(trainer._metrics["train"].values()):  # TRL's own compute_loss ran (not plain_loss): it read them already
            return False
        from transformers.trainer_pt_utils import nested_gather

        loss = nested_gather(tr_loss, trainer.args.parallel_mode).mean()
        scalars = [loss] + ([grad_norm] if torch.is_tensor(grad_norm) else [])
        window, self.pending = self.pending, defaultdict(list)
        on_device = [t for k in sorted(window) for t in window[k] if torch.is_tensor(t)]
        vec = torch.stack([t.detach().double().reshape(()) for t in scalars + on_device])
        if vec.is_cuda:
            host = torch.empty(vec.shape, dtype=vec.dtype, pin_memory=True)
            host.copy_(vec, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host, event = vec, None
        tr_loss -= tr_loss  # as Trainer, on the device
        steps, trainer._globalstep_last_logged = state.global_step - trainer._globalstep_last_logged, state.global_step
        rate = learning_rate if learning_rate is not None else trainer._get_learning_rate()
        where = (state.global_step, state.epoch, state.num_input_tokens_seen)
        self.staged = _Staged(host, event, steps, grad_norm, rate, window, where, start_time)
        control.should_log = False
        return True

    def flush_quietly(self, trainer) -> None:
        """flush() as training ends, maybe with an exception on its way: a failure here (a CUDA error that broke the
        event too) is logged, not raised over the one in flight."""
        try:
            self.flush(trainer)
        except Exception as e:  # noqa: BLE001 - the exception already raised is the one to report
            log.warning("the last logged step could not be written: %s", e)

    def flush(self, trainer) -> None:
        """Log the staged step, as Trainer would have at its end: its step, epoch and token count."""
        if self.staged is None or self.flushing:
            return
        host, event, steps, grad_norm, rate, window, where, start_time = self.staged
        self.staged = None
        if event is not None:
            event.synchronize()  # one step old: done already unless the host is more than a step ahead
        read = iter(host.tolist())
        loss_sum = next(read)
        norm = next(read) if torch.is_tensor(grad_norm) else grad_norm
        values = {k: [next(read) if torch.is_tensor(v) else v for v in window[k]] for k in sorted(window)}
        trainer._total_loss_scalar += loss_sum
        logs = {"loss": loss_sum / steps}
        if norm is not None:
            logs["grad_norm"] = norm
        logs["learning_rate"] = rate
        state = trainer.state
        now = (state.global_step, state.epoch, state.num_input_tokens_seen)
        # on_log clears should_log, which belongs to the step now ending; what a callback asks for in on_log (stop, save,
        # evaluate) stands, and takes effect at this step's end: one step later than logging at once would
        should_log = trainer.control.should_log
        current, trainer._metrics["train"] = trainer._metrics["train"], defaultdict(list)
        state.global_step, state.epoch, state.num_input_tokens_seen = where
        self.flushing = True
        try:
            self.settle(trainer, values)
            trainer.log(logs, start_time)
        finally:
            self.flushing = False
            state.global_step, state.epoch, state.num_input_tokens_seen = now
            trainer._metrics["train"] = current
            trainer.control.should_log = should_log
