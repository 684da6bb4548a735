"""Owns every use of a private internal of transformers, bitsandbytes, peft, TRL, Liger, Triton, torch and DeepSpeed.

Where a public extension point exists the code uses it elsewhere (Trainer.create_scheduler / compute_loss /
prediction_step / evaluation_loop / evaluate, TrainerCallback, transformers.AttentionInterface.register). What remains has no public
equivalent and lives here only: each patch says what it does and why, records the versions it was tested
with (TESTED), and checks (`require`) that the internal it relies on still exists with the expected
signature, raising PatchBroken (naming the library and installed version) when it is gone.
tests/test_patches.py runs the same checks, and tests/test_layout.py keeps these names out of the rest
of train/.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import logging
from typing import Any

log = logging.getLogger("train")

# Versions every patch below was tested with (the environment of tests/).
TESTED = {"transformers": "5.25.0", "peft": "0.21.2", "bitsandbytes": "0.50.2", "torch": "2.13.0", "trl": "1.16.0",
          "liger-kernel": "0.8.5",
          "triton": "3.6.0",  # on the GPU host (3.9.0 where the CPU tests ran: its launch call is the same)
          "deepspeed": None}  # deepspeed: not installed where tests run; ZeRO-3 runs on the GPU host only


class PatchBroken(RuntimeError):
    """A private internal this trainer patches changed in the installed library."""


def installed(library: str) -> str:
    try:
        return importlib.metadata.version(library)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def require(library: str, owner: Any, name: str, params: tuple[str, ...] = ()) -> Any:
    """owner.<name>, which must exist and take `params` (in order, after self); else PatchBroken."""
    where = f"{getattr(owner, '__module__', '')}.{getattr(owner, '__qualname__', owner)}.{name}"
    attr = getattr(owner, name, None)
    if attr is None:
        raise PatchBroken(f"{library} {installed(library)}: {where} is gone (train/patches.py was tested with "
                          f"{library} {TESTED.get(library)}); pin {library}=={TESTED.get(library)} or update the patch")
    if params:
        got = tuple(p for p in inspect.signature(attr).parameters if p != "self")
        if got[: len(params)] != params:
            raise PatchBroken(f"{library} {installed(library)}: {where} now takes {got}, expected {params} "
                              f"(train/patches.py was tested with {library} {TESTED.get(library)})")
    return attr


# --------------------------------------------------------------------------------------------
# transformers.Trainer privates. Signatures checked by trainer_hooks() and tests/test_patches.py.

TRAINER_PRIVATES = {
    "_get_train_sampler": ("train_dataset",),
    "_run_epoch": ("model", "epoch"),
    "_load_from_checkpoint": ("resume_from_checkpoint", "model"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
    "_prepare_inputs": ("inputs",),
    "_track_num_input_tokens": ("inputs",),
    "_clip_grad_norm": ("model",),
    "_maybe_log_save_evaluate": ("tr_loss", "grad_norm", "model", "trial", "epoch", "ignore_keys_for_eval",
                                 "start_time", "learning_rate"),
}


# Instance state train/late_log.py reads and writes, as the methods it stands in for do: Trainer._maybe_log_save_evaluate
# (the last logged step, the loss total, the learning rate) and SFTTrainer.compute_loss / log (TRL's metric window and
# token count).
TRAINER_STATE = {"transformers": ("_globalstep_last_logged", "_total_loss_scalar", "_get_learning_rate"),
                 "trl": ("_metrics", "_total_train_tokens", "_tp_size")}


def check_trainer_state(trainer) -> None:
    """A training trainer still has TRAINER_STATE; else PatchBroken, naming the library and the way around it."""
    for library, names in TRAINER_STATE.items():
        missing = [n for n in names if not hasattr(trainer, n)]
        if missing:
            raise PatchBroken(f"{library} {installed(library)}: the trainer has no {', '.join(missing)} (train/late_log.py "
                              f"was tested with {library} {TESTED.get(library)}); set TRAIN_LATE_LOG=0, pin "
                              f"{library}=={TESTED.get(library)} or update train/late_log.py")


def check_trainer() -> None:
    from transformers import Trainer

    for name, params in TRAINER_PRIVATES.items():
        require("transformers", Trainer, name, params)


def trainer_hooks(base):
    """`base` (a Trainer subclass) with public-named hooks on five private Trainer methods, none of which
    has a public equivalent (their signatures: TRAINER_PRIVATES, checked here and by tests/test_patches.py):

    - `_get_train_sampler` -> `self.train_sampler_hook(sampler)`: the run's seed and token-balanced
      partition for transformers' BatchRebalanceSampler (get_train_dataloader would have to be copied whole).
    - `_run_epoch` -> `self.epoch_begin_hook(epoch)`: transformers' set_epoch does not reach a batch
      sampler behind accelerate's SkipBatchSampler (mid-epoch resume), and callbacks get no epoch index.
    - `_load_from_checkpoint` -> `self.checkpoint_loaded_hook()`: cast reloaded LoRA weights back to their
      training dtype before the optimizer is built (no callback runs between the two).
    - `_load_optimizer_and_scheduler` -> `self.optimizer_load_hook(checkpoint, fresh_scheduler_state)`:
      restart an extended run's schedule over the checkpoint's ended one.
    - `_maybe_log_save_evaluate` -> `self.step_end_hook(tr_loss, grad_norm, learning_rate, start_time)`: a step's log
      read one step late (train/late_log.py); True when the hook took the step, which then neither saves nor evaluates.
      It reads Trainer's `_globalstep_last_logged` and `_total_loss_scalar`, as the method it stands in for does.

    And `_track_num_input_tokens` counts on the host where it can: Trainer copies each micro-batch's token count to
    the GPU and reads it back, two device syncs per micro-step that stall the host until the backward has finished
    (the GPU then idles through the optimizer step's host work). One process counting every token
    (include_num_input_tokens_seen="all", the padding-free default) needs no device: the count is the input's numel().

    And `_clip_grad_norm` clips the parameters that require a gradient, from `self.clip_parameters_hook(model)`'s
    list of the model's parameters (the trainer's keeps it between steps: train/step_walks.py): Trainer hands
    accelerate `model.parameters()`, a walk of every module (~2,700 on an 8B with LoRA, 1.4 % of the host's samples in
    session 10's py-spy profile) each step, for the ~450 that have gradients.
    Same gradients in the same order, so the same norm and clip. One process or DDP in bf16/fp32 only: FSDP and
    DeepSpeed clip by the model itself, DTensor gradients and fp16 (SageMaker's master gradients) need Trainer's path.
    """
    check_trainer()

    class Hooked(base):
        def train_sampler_hook(self, sampler):
            return sampler

        def epoch_begin_hook(self, epoch: int) -> None:
            pass

        def checkpoint_loaded_hook(self) -> None:
            pass

        def optimizer_load_hook(self, checkpoint, fresh: dict[str, Any] | None) -> None:
            pass

        def step_end_hook(self, tr_loss, grad_norm, learning_rate, start_time) -> bool:
            return False

        def _get_train_sampler(self, train_dataset=None):
            return self.train_sampler_hook(super()._get_train_sampler(train_dataset))

        def _run_epoch(self, model, epoch, *args, **kwargs):
            self.epoch_begin_hook(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            self.checkpoint_loaded_hook()

        def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                     learning_rate=None, *args, **kwargs):
            if not self.step_end_hook(tr_loss, grad_norm, learning_rate, start_time):
                super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval,
                                                 start_time, learning_rate, *args, **kwargs)

        def _track_num_input_tokens(self, inputs):
            main = getattr(self.model, "main_input_name", "input_ids")
            if self.args.include_num_input_tokens_seen == "all" and self.args.world_size == 1 and main in inputs:
                self.state.num_input_tokens_seen += inputs[main].numel()
                return
            super()._track_num_input_tokens(inputs)

        def clip_parameters_hook(self, model) -> list:
            return list(model.parameters())

        def _clip_grad_norm(self, model):
            params = None
            if not self.args.fp16 and unsharded(self.accelerator):  # else no list is made: Trainer's path
                params = clipped_parameters(self.clip_parameters_hook(model))
            if params is None:
                return super()._clip_grad_norm(model)
            return self.accelerator.clip_grad_norm_(params, self.args.max_grad_norm)

        def _load_optimizer_and_scheduler(self, checkpoint):
            import copy

            fresh = copy.deepcopy(self.lr_scheduler.state_dict()) if self.lr_scheduler is not None else None
            super()._load_optimizer_and_scheduler(checkpoint)
            self.optimizer_load_hook(checkpoint, fresh)

    Hooked.__name__ = Hooked.__qualname__ = f"Hooked{base.__name__}"
    return Hooked


def unsharded(accelerator) -> bool:
    """One process or DDP: every module and parameter whole in this process (FSDP and DeepSpeed shard them, and clip
    and walk them their own way)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU)


def clipped_parameters(params: list) -> list | None:
    """Of an unsharded model's parameters, those Trainer's clip would find a gradient on (those that require one), in
    model order; None where Trainer's own clip must run (trainer_hooks' `_clip_grad_norm`): DTensor parameters."""
    import torch

    params = [p for p in params if p.requires_grad]
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            return None
    return params


def load_checkpoint(trainer, checkpoint: str) -> None:
    """Trainer._load_from_checkpoint outside train(): restoring a finished run (schedule.restore_finished)
    loads its adapter exactly as a resume would, through the dtype hook above."""
    trainer._load_from_checkpoint(checkpoint)


def prepare_inputs(trainer, inputs: dict[str, Any]) -> dict[str, Any]:
    """Trainer._prepare_inputs: a batch on the trainer's device as training_step sees it (the benchmark's
    loss check calls compute_loss outside a training step)."""
    return trainer._prepare_inputs(inputs)


# --------------------------------------------------------------------------------------------
# transformers.trainer_pt_utils.BatchRebalanceSampler._assign


SAMPLER_ARGS = ("lengths", "effective_batch_size", "dp_size", "grad_accum", "shuffle", "seed", "rank", "drop_last")


def check_rebalance_sampler():
    from transformers.trainer_pt_utils import BatchRebalanceSampler

    require("transformers", BatchRebalanceSampler, "_assign", ("indices", "lengths"))
    params = inspect.signature(BatchRebalanceSampler.__init__).parameters
    missing = [a for a in SAMPLER_ARGS if a not in params]
    if missing:
        raise PatchBroken(f"transformers {installed('transformers')}: BatchRebalanceSampler no longer takes {missing} "
                          f"(train/patches.py was tested with transformers {TESTED['transformers']})")
    return BatchRebalanceSampler


@functools.cache
def balanced_class(assign):
    base = check_rebalance_sampler()

    class TokenBalancedSampler(base):
        """BatchRebalanceSampler whose partition of each global batch is `assign` (train/sampler.py).
        `_assign` is the only seam: the rest (rank-awareness, seeded shuffle, resume) stays transformers'."""

        def _assign(self, batch_indices, batch_lengths):
            return assign(batch_indices, batch_lengths, self.dp_size, self.grad_accum)

    return TokenBalancedSampler


def rebalanced(sampler, assign):
    """A copy of transformers' BatchRebalanceSampler `sampler` that partitions each optimizer step's rows with
    assign(indices, lengths, dp_size, grad_accum) -> [rank][micro-batch] lists of indices."""
    cls = balanced_class(assign)
    return cls(sampler.lengths, sampler.effective_batch_size, sampler.dp_size, sampler.grad_accum,
               shuffle=sampler.shuffle, seed=sampler.seed, rank=sampler.rank, drop_last=sampler.drop_last)


# --------------------------------------------------------------------------------------------
# transformers: whether a model class has an sdpa attention (PreTrainedModel._supports_sdpa, a class flag
# with no public reader; transformers itself reads it to refuse sdpa, and "sdpa_varlen", whose name holds
# "sdpa"). Read only, never set.


def supports_sdpa(model_class) -> bool:
    """model_class._supports_sdpa; True for None (custom code: transformers decides when it loads)."""
    if model_class is None:
        return True
    return bool(require("transformers", model_class, "_supports_sdpa"))


# --------------------------------------------------------------------------------------------
# transformers: a checkpointed layer's checkpoint function (GradientCheckpointingLayer._gradient_checkpointing_func, set
# by gradient_checkpointing_enable on every layer and called by the layer's wrapped forward). No public hook sees a
# layer's recompute apart from its forward; train/kernels/lean_recompute.py wraps the function to tell them apart.


def wrap_checkpoint_function(layer, wrap) -> bool:
    """Replace a checkpointing layer's checkpoint function f by wrap(f), once (a function wrap made is kept); False when
    the layer does not checkpoint. PatchBroken when it checkpoints without the attribute (tests/test_patches.py checks
    that the layer still calls it)."""
    if not getattr(layer, "gradient_checkpointing", False):
        return False
    inner = getattr(layer, "_gradient_checkpointing_func", None)
    if inner is None:
        raise PatchBroken(f"transformers {installed('transformers')}: a checkpointing {type(layer).__name__} has no "
                          f"_gradient_checkpointing_func (train/patches.py was tested with transformers "
                          f"{TESTED['transformers']}); set TRAIN_LEAN_RECOMPUTE=0 or pin transformers=="
                          f"{TESTED['transformers']}")
    if getattr(inner, "wrapped_by", None) is not wrap:
        layer._gradient_checkpointing_func = wrap(inner)
        layer._gradient_checkpointing_func.wrapped_by = wrap
    return True


# --------------------------------------------------------------------------------------------
# liger-kernel: its Triton kernels, module globals that its ops look up at each launch (no public hook replaces a
# launch). train/kernels/liger_launch.py puts a wrapper in their place.

LIGER_KERNELS = {
    "liger_kernel.ops.rms_norm": ("_rms_norm_forward_kernel", "_rms_norm_backward_kernel",
                                  "_block_rms_norm_forward_kernel", "_block_rms_norm_backward_kernel"),
    "liger_kernel.ops.rope": ("_triton_rope",),
    "liger_kernel.ops.swiglu": ("_swiglu_forward_kernel", "_swiglu_backward_kernel", "_swiglu_forward_kernel_tiled",
                                "_swiglu_backward_kernel_tiled"),
}


def liger_kernel(module_name: str, name: str):
    """The Liger kernel `name` of `module_name` (a Triton JITFunction, or a wrapper of one); else PatchBroken."""
    import importlib

    module = importlib.import_module(module_name)
    fn = getattr(module, name, None)
    if fn is None or not callable(getattr(fn, "__getitem__", None)):
        raise PatchBroken(f"liger-kernel {installed('liger-kernel')}: {module_name}.{name} is gone or is no kernel "
                          f"(train/patches.py was tested with liger-kernel {TESTED['liger-kernel']}); unset "
                          f"TRAIN_LIGER_RELAUNCH or pin liger-kernel=={TESTED['liger-kernel']}")
    return module, fn


def swap_liger_kernels(wrapper) -> int:
    """Each kernel of LIGER_KERNELS replaced by wrapper(kernel) where Liger looks it up, once; how many are wrapped."""
    wrapped = 0
    for module_name, names in LIGER_KERNELS.items():
        for name in names:
            module, fn = liger_kernel(module_name, name)
            if not isinstance(fn, wrapper):
                setattr(module, name, wrapper(fn))
            wrapped += 1
    return wrapped


# --------------------------------------------------------------------------------------------
# Triton: the launcher of a compiled kernel, called directly by train/kernels/launch.py. Triton's public way,
# CompiledKernel[grid](*args), wraps that same call in a closure that looks the device and stream up through Triton's
# driver proxy, builds a launch-metadata dict and calls two launch hooks, registered or not: on the GPU host that made
# a relaunch cost what Triton's own launch does (20.5 us against 20.1 us per Liger RMSNorm launch, H100, session 11),
# with ~1,700 such launches in an 8B step that waits for the host (docs/benchmarks.md).

TRITON_LAUNCH_CALL = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, kernel.packed_metadata, "
                      "launch_metadata, knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, "
                      "*bound_args.values())")  # triton/runtime/jit.py, JITFunction.run: 3.6.0 (GPU host), 3.9.0 (CPU)


def check_triton_launch() -> None:
    """Triton's own launch still ends in CompiledKernel.run(grid0, grid1, grid2, stream, function, packed_metadata,
    launch_metadata, enter_hook, exit_hook, *args), the call triton_launcher's callers make; else PatchBroken."""
    from triton.runtime.jit import JITFunction

    src = " ".join(inspect.getsource(JITFunction.run).split())
    if TRITON_LAUNCH_CALL not in src:
        raise PatchBroken(f"triton {installed('triton')}: JITFunction.run no longer launches through "
                          f"{TRITON_LAUNCH_CALL} (tested with triton {TESTED['triton']}); update "
                          "patches.triton_launcher, or set launch.DIRECT = False")


def triton_launcher(compiled):
    """(launcher, function handle, packed metadata, stream(device)) of a CompiledKernel that has launched once (its
    handles are loaded), for `launcher(g0, g1, g2, stream(device), function, packed, None, None, None, *args)`; None
    (the caller keeps CompiledKernel[grid]) where this Triton's launch differs (check_triton_launch) or the attributes
    are missing."""
    if not _triton_launch_ok():
        return None
    try:
        raw = compiled.run, compiled.function, compiled.packed_metadata
    except AttributeError:
        return None
    return (*raw, cuda_stream_reader()) if callable(raw[0]) and raw[1] is not None else None


@functools.cache
def _triton_launch_ok() -> bool:
    try:
        check_triton_launch()
    except (PatchBroken, ImportError, OSError, TypeError) as e:
        log.warning("Triton kernels relaunch through CompiledKernel[grid], the slower way: %s", e)
        return False
    return True


def cuda_stream_reader():
    """device -> the current CUDA stream's handle there, the function Triton's driver reads it with
    (torch._C._cuda_getCurrentRawStream, a C function; torch.cuda.current_stream(device).cuda_stream where missing)."""
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return raw if raw is not None else (lambda device: torch.cuda.current_stream(device).cuda_stream)


# --------------------------------------------------------------------------------------------
# peft: swapping the class of its LoRA modules (no public hook replaces a layer's forward in place;
# LoraConfig._register_custom_module is private and dispatches on the base layer type, before the
# bitsandbytes dispatch we need to keep), and moving their dropout

PEFT_LORA_ATTRS = ("lora_A", "lora_B", "lora_dropout", "lora_variant", "scaling", "active_adapters",
                   "disable_adapters", "merged", "get_base_layer")


def check_peft_layer(module) -> None:
    missing = [a for a in PEFT_LORA_ATTRS if not hasattr(module, a)]
    if missing:
        raise PatchBroken(f"peft {installed('peft')}: LoRA layer {type(module).__name__} has no {missing} "
                          f"(train/kernels/fused_lora.py and train/lora.py were tested with peft {TESTED['peft']})")


def has_lora_variant(module, adapter: str) -> bool:
    """Whether `adapter` of the peft LoRA layer `module` is a variant (DoRA, ...) that runs its own forward:
    peft keeps them in the layer's lora_variant dict, which has no public accessor (check_peft_layer guards it)."""
    return adapter in module.lora_variant


def swap_class(module, cls) -> None:
    """Give `module` (a peft LoRA layer, or its lora_A nn.Linear) the forward of `cls`, a subclass of its
    own class that adds no state: parameters, names and saved adapters stay peft's."""
    if not issubclass(cls, type(module)):
        raise PatchBroken(f"{cls.__name__} does not subclass {type(module).__name__}: the class swap would change "
                          "the module's state")
    module.__class__ = cls


def lean_dropout(peft_model, linear_cls) -> int:
    """Move each plain-LoRA adapter's dropout into its lora_A: lora_A becomes `linear_cls` (an nn.Linear subclass
    that applies dropout itself, reading `dropout_p`) and peft's lora_dropout entry an Identity. peft has no option
    for where its dropout runs. Adapters with a lora_variant (DoRA, ...) read the dropout output themselves and
    are left alone. Returns how many adapters changed."""
    import torch
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        check_peft_layer(module)
        for name, drop in list(module.lora_dropout.items()):
            lora_a = module.lora_A[name] if name in module.lora_A else None
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and name not in module.lora_variant \
                    and type(lora_a) is torch.nn.Linear:
                swap_class(lora_a, linear_cls)
                lora_a.dropout_p = drop.p
                module.lora_dropout[name] = torch.nn.Identity()
                changed += 1
    return changed


# --------------------------------------------------------------------------------------------
# torch LRScheduler: restarting a schedule over the one a checkpoint restored. The lr of its last step is the
# private "_last_lr" of its state_dict, and the schedule's start lr the "initial_lr" it writes into each param
# group; load_state_dict restores the scheduler only, and no public call sets either on the optimizer.

SCHEDULER_STATE = ("base_lrs", "_last_lr")


def check_lr_scheduler(scheduler, optimizer) -> None:
    missing = [k for k in SCHEDULER_STATE if k not in scheduler.state_dict()]
    missing += ["param_groups[i]['initial_lr']"] * any("initial_lr" not in g for g in optimizer.param_groups)
    if missing:
        raise PatchBroken(f"torch {installed('torch')}: an LRScheduler no longer keeps {missing} (train/patches.py "
                          f"was tested with torch {TESTED['torch']}); update restart_schedule")


def restart_schedule(optimizer, scheduler, fresh: dict[str, Any]) -> None:
    """Put the new schedule's start (`fresh`: its state before the checkpoint was loaded) back over the
    ended schedule and lr the checkpoint restored; the optimizer's moments stay the checkpoint's."""
    check_lr_scheduler(scheduler, optimizer)
    scheduler.load_state_dict(fresh)
    for group, base, lr in zip(optimizer.param_groups, fresh["base_lrs"], fresh["_last_lr"]):
        group["initial_lr"], group["lr"] = base, lr


# --------------------------------------------------------------------------------------------
# bitsandbytes: Linear4bit.support_avx512bf16_for_cpu (an undocumented instance attribute, bnb >= 0.48)


def check_bnb_repack_flag() -> None:
    import bitsandbytes as bnb

    src = inspect.getsource(bnb.nn.Linear4bit)
    if "support_avx512bf16_for_cpu" not in src:
        raise PatchBroken(f"bitsandbytes {installed('bitsandbytes')}: Linear4bit no longer reads "
                          f"support_avx512bf16_for_cpu (tested with {TESTED['bitsandbytes']}); check whether it still "
                          "repacks 4-bit weights for CPU inference and update train/patches.py")


def keep_cpu_weights_exact(model) -> None:
    """Turn off bitsandbytes' CPU inference repacking of 4-bit weights.

    On AVX512-BF16 CPUs, bnb >= 0.48 repacks a Linear4bit weight on its first eval-mode forward, and
    any later state_dict() (every checkpoint save) converts it back, re-quantizing the double-quant
    constants lossily: the frozen base drifts, and a reloaded adapter no longer reproduces the
    trained model's logits. The plain dequantize path is exact and the same in train and eval.
    No public switch exists.
    """
    import bitsandbytes as bnb

    check_bnb_repack_flag()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


# --------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-3 and torch FSDP: gathering the sharded LoRA weights for the adapter file


def zero3_trainable_state(engine) -> dict[str, Any]:
    """DeepSpeedEngine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True): the LoRA tensors
    only, gathered from ZeRO-3 shards. accelerate's public get_state_dict gathers the frozen 4-bit base too
    (the whole model on rank 0), and save_16bit_model writes a file of its own format."""
    require("deepspeed", type(engine), "_zero3_consolidated_16bit_state_dict")
    fn = engine._zero3_consolidated_16bit_state_dict
    if "exclude_frozen_parameters" not in inspect.signature(fn).parameters:
        raise PatchBroken(f"deepspeed {installed('deepspeed')}: _zero3_consolidated_16bit_state_dict has no "
                          "exclude_frozen_parameters")
    return fn(exclude_frozen_parameters=True)


FSDP_WRAPPED = "_fsdp_wrapped_module"  # torch.distributed.fsdp._common_utils.FSDP_WRAPPED_MODULE


def fsdp_clean_name(name: str) -> str:
    """A module name without FSDP(1)'s wrapper prefix (torch's private FSDP_WRAPPED_MODULE) in it."""
    return name.replace(f"{FSDP_WRAPPED}.", "").replace(f".{FSDP_WRAPPED}", "")


def check_fsdp_prefix() -> None:
    try:
        from torch.distributed.fsdp._common_utils import FSDP_WRAPPED_MODULE
    except ImportError:
        return  # no distributed build: FSDP is not used
    if FSDP_WRAPPED_MODULE != FSDP_WRAPPED:
        raise PatchBroken(f"torch {installed('torch')}: FSDP's wrapper prefix is now {FSDP_WRAPPED_MODULE!r} "
                          f"(tested with torch {TESTED['torch']})")


# --------------------------------------------------------------------------------------------
# bitsandbytes' Optimizer8bit internals used by train/optim.py's one-step AdamW: its lazy first-step setup
# (initialized, check_overrides, to_gpu), its per-parameter overrides (mng.index2config), its per-tensor update
# (init_state, prefetch_state, update_step, then utils.sync_gpu: what its own step() does per tensor), its args
# (optim_bits, max_unorm, skip_zeros, optimizer_name) and paged buffers (functional.get_paged, fill,
# page_mng.paged_tensors). functional.optimizer_update_32bit and prefetch_tensor are its public functional API.

BNB_OPTIMIZER = {"check_overrides": (), "to_gpu": (), "init_state": ("group", "p", "gindex", "pindex"),
                 "prefetch_state": ("p",), "update_step": ("group", "p", "gindex", "pindex")}


def check_bnb_optimizer(opt=None) -> None:
    """The methods above with their signatures, and (given an optimizer) the attributes read."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from bitsandbytes import utils

    for name, params in BNB_OPTIMIZER.items():
        require("bitsandbytes", bnb.optim.AdamW, name, params)
    for owner, name in ((F, "get_paged"), (F, "fill"), (F, "prefetch_tensor"), (F, "optimizer_update_32bit"),
                        (utils, "sync_gpu")):
        require("bitsandbytes", owner, name)
    if opt is not None:
        missing = [a for a in ("initialized", "is_paged", "args", "mng", "page_mng", "optimizer_name")
                   if not hasattr(opt, a)]
        missing += [a for a in ("optim_bits", "max_unorm", "skip_zeros") if not hasattr(opt.args, a)]
        missing += [] if hasattr(opt.mng, "index2config") else ["mng.index2config"]
        missing += [] if hasattr(opt.page_mng, "paged_tensors") else ["page_mng.paged_tensors"]
        if missing:
            raise PatchBroken(f"bitsandbytes {installed('bitsandbytes')}: its optimizer no longer has {missing} "
                              f"(train/optim.py was tested with {TESTED['bitsandbytes']}); update train/patches.py")


def bnb_optimizer_ready(opt) -> None:
    """What bitsandbytes' step() does before its first update (overrides registered, states on the device)."""
    if not opt.initialized:
        check_bnb_optimizer(opt)
        opt.check_overrides()
        opt.to_gpu()
        opt.initialized = True


def bnb_has_overrides(opt) -> bool:
    return bool(opt.mng.index2config)


def bnb_group_step(opt, gindex: int, group: dict) -> None:
    """bitsandbytes' own step() for one parameter group: each tensor updated on its own, a sync after each."""
    from bitsandbytes.utils import sync_gpu

    p = None
    for pindex, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if len(opt.state[p]) == 0:
            opt.init_state(group, p, gindex, pindex)
        opt.prefetch_state(p)
        opt.update_step(group, p, gindex, pindex)
        sync_gpu(p)


def bnb_paged_zeros(opt, n: int, device):
    """A paged fp32 buffer of n zeros, registered with the optimizer's page manager (as get_state_buffer does)."""
    import bitsandbytes.functional as F
    import torch

    buf = F.get_paged(n, dtype=torch.float32, device=device)
    F.fill(buf, 0)
    opt.page_mng.paged_tensors.append(buf)
    return buf
