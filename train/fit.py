"""`train fit`: load config -> build model -> build data -> train -> save. Reads like a table of contents."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import set_seed

from train import adapter, checkpoints, data, lora, model, patches, precision, schedule, stop, trainer
from train.callbacks import truncate_metrics
from train.eval import evaluate
from train.config import Config, dump_config
from train.errors import Interrupted, UserError

log = logging.getLogger("train")


@dataclass
class Fitted:
    run: Path
    model: Any  # the trained PeftModel, still in memory
    tokenizer: Any
    metrics: dict[str, Any] = field(default_factory=dict)


def fit(cfg: Config, overwrite: bool = False, callbacks=()) -> Fitted:
    run = Path(cfg.run.output_dir)
    main = is_main_process()
    check_launch(cfg)

    # 1. Tokenizer and data (before anything is written or the weights load: bad rows fail fast)
    path = model.resolve_model_path(cfg.model)
    tok = model.load_tokenizer(path, cfg.model)
    train_split, eval_split = data.load_splits(cfg, tok)
    cfg = data.with_resolved_budget(cfg, train_split)  # what config.yaml records, for `train eval`
    lora.preflight(model.preflight(cfg, path), cfg.lora)  # model config, attention, LoRA targets: no weights
    # compute_dtype auto -> what this machine computes fast (one line); a resumed run, what it was trained in
    cfg = precision.resolved(cfg, quiet=not main, recorded=checkpoints.recorded_compute_dtype(cfg, run, overwrite))
    scorer = task_scorer(cfg, tok, eval_split)

    # 2. Run directory and resume point
    if main:
        checkpoints.prepare_run_dir(run, cfg, overwrite)  # step 1 loaded and checked every row
    distributed_state().wait_for_everyone()  # others look for checkpoints once rank 0 has cleared (--overwrite) the dir
    resume_from = start_or_resume(cfg, run, main)
    if main:
        dump_config(cfg, run / "config.yaml")
        data.write_data_record(cfg, run)  # the data files' hashes, so `train eval` can tell when one changed
    distributed_state().wait_for_everyone()  # other ranks read the run dir only once rank 0 has prepared it

    # 3. Model: quantized base -> k-bit prep -> LoRA
    base = model.load_base(cfg, path)
    base = model.prepare_for_kbit(base, cfg)
    # No KV cache for training/eval forwards: with one, transformers skips the block-diagonal mask of
    # padding-free batches and rows attend to each other (generation keeps its own cache setting)
    base.config.use_cache = False
    set_seed(cfg.run.seed)  # LoRA's A matrices are random: seed them, or resumed runs start elsewhere
    peft_model = lora.wrap(base, cfg.lora)

    # 4. Train (SIGINT/SIGTERM save a checkpoint and stop)
    eval_ds = eval_dataset(cfg, eval_split)
    with stop.GracefulStop() as stopper:
        sft = trainer.build_trainer(cfg, peft_model, tok, train_split.to_dataset(), eval_ds, run,
                                    callbacks=[stopper, *callbacks], task_scorer=scorer)
        metrics = {**train_or_restore(sft, resume_from), "epoch": sft.state.epoch}
    if stopper.stopped:  # the decision every rank shares; a signal after the last step lets the run finish
        distributed_state().wait_for_everyone()  # each rank's part of the checkpoint is written before any exits
        raise Interrupted(stopper.stopped, str(run / "checkpoints" / f"checkpoint-{sft.state.global_step}"),
                          cfg.train.resume)

    # 5. Save the adapter, tokenizer, config and model card
    if eval_split is not None and cfg.train.eval_every != 0:  # 0: `train eval` scores the run afterwards
        metrics.update(final_eval(sft))
    state = gather_adapter_state(sft)  # every rank takes part under FSDP / ZeRO-3
    if main:
        before = adapter_digest(run)
        adapter.save(sft.accelerator.unwrap_model(sft.model), tok, cfg, run, path, metrics, train_split, eval_split,
                     state_dict=state, fsdp=sft.is_fsdp_enabled)
        saved(run, metrics, changed=before != adapter_digest(run))
    distributed_state().wait_for_everyone()
    return Fitted(run, sft.model, tok, metrics)


def train_or_restore(sft, resume_from: Path | None) -> dict[str, Any]:
    """Train from the start or `resume_from`. A checkpoint at the end of its lr schedule is only restored
    when this config asks for no more steps; asked for more, the extra steps get a schedule of their own
    (schedule.extend_schedule). A checkpoint inside such an extension resumes that extension's schedule."""
    if resume_from is not None:
        step = checkpoints.checkpoint_step(resume_from)
        if checkpoints.ended(resume_from):
            target = schedule.target_steps(sft)
            if target <= step:
                if target < step:
                    log.warning("%s is past this config's last step (%d): restoring it as trained, %d steps; "
                                "pass --overwrite to train %d steps instead", resume_from.name, target, step, target)
                return schedule.restore_finished(sft, resume_from)
            schedule.extend_schedule(sft, step, target)
        elif (start := checkpoints.schedule_start(resume_from)) is not None:
            schedule.extend_schedule(sft, start)
    result = sft.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return {"train_loss": result.training_loss, "global_step": result.global_step}


def saved(run: Path, metrics: dict[str, Any], changed: bool) -> None:
    """After the adapter is written: an eval of the previous weights is moved aside, then the closing table."""
    if changed:
        mark_eval_stale(run)
    for line in summary_lines(run, metrics):
        log.info(line)


def adapter_digest(run: Path) -> str | None:
    """sha256 of RUN/adapter's weights (None when there is no adapter yet)."""
    import hashlib

    weights = run / "adapter" / "adapter_model.safetensors"
    if not weights.is_file():
        return None
    digest = hashlib.sha256()
    with weights.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_eval_stale(run: Path) -> None:
    """The adapter changed under an existing RUN/eval/: move it to RUN/eval.stale/ (replacing an older one),
    so no report describes weights it did not evaluate; `train eval` writes a fresh eval/."""
    import shutil

    old, stale = run / "eval", run / "eval.stale"
    if not old.is_dir():
        return
    shutil.rmtree(stale, ignore_errors=True)
    old.rename(stale)
    log.info("%s described the previous adapter: moved to %s; run `python -m train eval %s` for a new report",
             old, stale, run)


# The closing table: (header, metrics key, format); a column shows only when the run has its metric
SUMMARY = (("step", "global_step", "{:d}"), ("epoch", "epoch", "{:.2f}"), ("train loss", "train_loss", "{:.4f}"),
           ("eval loss", "eval_loss", "{:.4f}"), ("eval mae", "eval_mae", "{:.4g}"),
           ("eval hits", "eval_hit_rate", "{:.0%}"), ("eval acc", "eval_accuracy", "{:.1%}"),
           ("unparseable", "eval_unparseable", "{:.0f}"))


def summary_lines(run: Path, metrics: dict[str, Any]) -> list[str]:
    """"adapter saved to ...", then a two-line table of the headline metrics (every metric stays in
    RUN/adapter/training_meta.json, every step's in RUN/metrics.jsonl)."""
    cells = [(head, fmt.format(metrics[key])) for head, key, fmt in SUMMARY
             if isinstance(metrics.get(key), (int, float)) and not isinstance(metrics.get(key), bool)]
    widths = [max(len(head), len(value)) for head, value in cells]
    return [f"adapter saved to {run / 'adapter'} (all metrics: {run / 'adapter' / adapter.META}; "
            f"per step: {run / 'metrics.jsonl'})",
            "  " + "  ".join(head.rjust(w) for (head, _), w in zip(cells, widths)),
            "  " + "  ".join(value.rjust(w) for (_, value), w in zip(cells, widths))]


def eval_dataset(cfg: Config, eval_split):
    """The eval loss during training is taken on the rows `train eval` scores (eval.limit, sampled as
    eval.sample), by the same token-weighted definition (loss.row_nll): on the same weights the two agree to
    float rounding (tests/test_eval_loss.py), and on a large eval file this takes a fraction of the time."""
    if eval_split is None:
        return None
    ds = eval_split.to_dataset()
    return ds.select(data.sample_indices(len(ds), cfg.eval.limit, evaluate.sample_how(cfg), cfg.run.seed))


def task_scorer(cfg: Config, tok, eval_split):
    """The task metric logged with each eval (this also checks the eval truths parse for eval.task).
    Not under FSDP/ZeRO-3: sharded generation gathers every layer per token on all ranks in lockstep,
    and ranks that stop at different lengths would hang. The loss is still evaluated there."""
    scorer = evaluate.training_scorer(cfg, tok, eval_split)
    if scorer is not None and model.sharded_launch():
        log.info("%s: the task metric is computed after training (python -m train eval), not during it",
                 model.sharded_launch())
        return None
    return scorer


def gather_adapter_state(sft) -> dict[str, Any] | None:
    """FSDP and ZeRO-3 keep each weight in shards across ranks: gather the LoRA tensors for the adapter
    file (collectives: every rank calls this; rank 0 gets the tensors). None where each rank holds the
    whole model (one GPU, DDP): peft then reads the model itself."""
    if sft.is_deepspeed_enabled and sft.accelerator.deepspeed_config["zero_optimization"]["stage"] == 3:
        return patches.zero3_trainable_state(sft.model_wrapped)
    if sft.is_fsdp_enabled:
        import torch
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # summon_full_params unshards the flat parameters (on rank 0's CPU) and points each module's weight at
        # its full view; read each LoRA A/B weight by module name. FSDP's wrapper modules add a prefix to every
        # name (and expose the weight of the module they wrap too: both map to the same clean key).
        peft_model = sft.accelerator.unwrap_model(sft.model)
        with FSDP.summon_full_params(sft.model, writeback=False, rank0_only=True, offload_to_cpu=True):
            if not is_main_process():
                return None
            state = {f"{patches.fsdp_clean_name(name)}.weight":
                     mod.weight.detach().clone() for name, mod in peft_model.named_modules()
                     if (".lora_A." in name or ".lora_B." in name) and isinstance(getattr(mod, "weight", None), torch.Tensor)}
            return state
    return None


def final_eval(sft) -> dict[str, Any]:
    """Eval metrics at the last step: reuse the eval the Trainer ran there (with train.eval_every it always
    evaluates the last step too, and a restored checkpoint's history holds it), else run one."""
    step = sft.state.global_step
    merged: dict[str, Any] = {}
    for entry in sft.state.log_history:
        if entry.get("step") == step and any(k.startswith("eval_") for k in entry):
            merged.update({k: v for k, v in entry.items() if k.startswith("eval_")})
    return merged or sft.evaluate()


def start_or_resume(cfg: Config, run: Path, main: bool) -> Path | None:
    """Find the checkpoint to resume from, check it matches, say what it restores."""
    resume_from = checkpoints.resume_point(cfg, run)
    if resume_from is None:
        return None
    checkpoints.check_resume(resume_from, cfg)
    log.info(checkpoints.describe_restore(resume_from))
    if model.sharded_launch() and main:
        log.warning("%s resume restores the sharded weights and optimizer state (tested on 2 GPUs), but unlike one "
                    "GPU and DDP it is not yet tested to reproduce an uninterrupted run step for step",
                    model.sharded_launch())
    if main:
        truncate_metrics(run / "metrics.jsonl", checkpoints.checkpoint_step(resume_from))
    return resume_from


def check_launch(cfg: Config) -> None:
    """Several visible GPUs in one process would make Trainer use nn.DataParallel, which TRL refuses.
    FSDP and ZeRO-3 shard only floating-point tensors of one dtype: the packed 4-bit weights must be
    stored as bf16, like the rest of the model. The FSDP adapter save handles plain LoRA only."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > 1 and distributed_state().num_processes == 1:
        raise UserError(f"{gpus} GPUs are visible to one process; use them all with `accelerate launch "
                        "--config_file configs/accelerate/ddp.yaml -m train fit ...`, or one with CUDA_VISIBLE_DEVICES=0")
    sharded, q = model.sharded_launch(), cfg.quant
    # (compute_dtype auto is bf16 there: FSDP and ZeRO-3 run on GPUs)
    if sharded and q.mode != "none" and (q.storage_dtype != "bfloat16" or q.compute_dtype not in ("bfloat16", "auto")):
        raise UserError(f"quant.storage_dtype: {sharded} shards only bf16 tensors here; set "
                        "quant.storage_dtype: bfloat16 and quant.compute_dtype: bfloat16 (or launch with ddp.yaml)")
    if sharded == "fsdp" and (cfg.lora.use_dora or cfg.lora.modules_to_save):
        key = "lora.use_dora" if cfg.lora.use_dora else "lora.modules_to_save"
        raise UserError(f"{key}: the FSDP adapter save gathers plain LoRA A/B weights only (untested beyond "
                        "them); launch with ddp.yaml or deepspeed_zero3.yaml, or drop it")


def is_main_process() -> bool:
    return distributed_state().is_main_process


def distributed_state():
    """accelerate's process state; cpu=True on GPU-less hosts, else every gloo rank claims rank 0."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())
