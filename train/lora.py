"""Owns LoRA wiring: config -> peft.LoraConfig, wrap the prepared base, install the kernels, report trainable parameters."""

from __future__ import annotations

import logging

import torch

from train import patches, precision
from train.config import LoraCfg, target_matches
from train.errors import UserError

log = logging.getLogger("train")


def build_lora_config(l: LoraCfg, num_layers: int | None = None, linear: list[str] | None = None):
    """lora.* -> peft.LoraConfig. Pure: no model needed. lora.top_layers needs the model's `num_layers`, and
    with all-linear its `linear` leaf names too: peft takes a layer subset only with a list of targets."""
    from peft import LoraConfig

    targets = l.target_modules
    if l.top_layers is not None and targets == "all-linear":
        targets = linear
    return LoraConfig(
        r=l.r,
        lora_alpha=l.alpha,
        lora_dropout=l.dropout,
        target_modules=targets,
        use_rslora=l.use_rslora,
        use_dora=l.use_dora,
        modules_to_save=l.modules_to_save,
        layers_to_transform=top_layer_indices(l, num_layers),
        bias="none",  # bias terms stay frozen: standard LoRA, and adapters stay small
        task_type="CAUSAL_LM",
    )


def top_layer_indices(l: LoraCfg, num_layers: int | None) -> list[int] | None:
    """lora.top_layers -> the decoder layer indices peft adapts (None: all of them)."""
    if l.top_layers is None:
        return None
    if num_layers is None:
        raise ValueError("lora.top_layers needs the model's layer count")
    if l.top_layers > num_layers:
        raise UserError(f"lora.top_layers: {l.top_layers} but the model has {num_layers} decoder layers "
                        f"(use at most {num_layers}, or null for all)")
    return list(range(num_layers - l.top_layers, num_layers))


def num_decoder_layers(model_config) -> int:
    """Decoder layer count of a (possibly multimodal) model config."""
    return model_config.get_text_config().num_hidden_layers


def linear_leaf_names(model) -> list[str]:
    """What peft's all-linear adapts, as leaf names: every nn.Linear (4-bit ones included) but the LM head."""
    head = model.get_output_embeddings()
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and m is not head})


def check_targets(model, l: LoraCfg) -> None:
    """lora.target_modules must name modules the model has (works on a meta-device model: no weights)."""
    if isinstance(l.target_modules, list):  # all-linear and regexes are peft's to resolve
        check_target_names([n for n, _ in model.named_modules()], l.target_modules, linear_leaf_names(model))


def check_target_names(names: list[str], targets: str | list[str], linear: list[str]) -> None:
    """A list entry that matches none of the module `names` is a one-line UserError listing `linear`.
    Shared with `train plan` (train/plan.py), which has the names without a model."""
    if not isinstance(targets, list):
        return
    missing = [t for t in targets if not any(target_matches(n, [t]) for n in names)]
    if missing:
        raise UserError(f"lora.target_modules: {missing} not found in the model; its linear layers are {linear} "
                        "(or use all-linear)")


def preflight(model_config, l: LoraCfg) -> None:
    """lora.target_modules against the model's module tree on the meta device, before any weights load."""
    from train.model import meta_model

    top_layer_indices(l, num_decoder_layers(model_config))  # lora.top_layers beyond the model: before the weights load
    if isinstance(l.target_modules, list):  # "all-linear" matches whatever the model has
        check_targets(meta_model(model_config), l)


def wrap(model, l: LoraCfg):
    from peft import get_peft_model

    check_targets(model, l)
    layers = num_decoder_layers(model.config)
    linear = linear_leaf_names(model) if l.top_layers is not None else None  # only a layer subset needs the names
    peft_model = get_peft_model(model, build_lora_config(l, layers, linear))
    if l.kernel != "peft":
        use_fused_kernels(peft_model, triton_dropout=l.kernel == "fused_triton", groups=l.groups)
    trainable, total = peft_model.get_nb_trainable_parameters()
    where = l.target_modules if l.top_layers is None else \
        f"{l.target_modules} of the last {l.top_layers} of {layers} layers"
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)",
             l.r, l.alpha, where, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def use_fused_kernels(peft_model, triton_dropout: bool = False, groups: bool = True) -> None:
    """lora.kernel=fused(_triton): the lean dropout everywhere, and the fused 4-bit LoRA linear (its siblings on one
    input grouped, lora.groups) except under FSDP/DeepSpeed, whose sharded 4-bit weights only bitsandbytes' own
    module knows how to gather."""
    from train.kernels import fused_lora, lora_group
    from train.model import sharded_launch

    use_lean_dropout(peft_model)
    if sharded_launch() is None:
        n = fused_lora.install(peft_model, triton_dropout)
        grouped = lora_group.install(peft_model) if groups else 0
        log.debug("fused 4-bit LoRA forward on %d layers, %d groups of siblings", n, grouped)
        if triton_dropout:
            _note_dropout_path(peft_model, n)


def _note_dropout_path(peft_model, fused_layers: int) -> None:
    """One line when a GPU run's LoRA dropout cannot use the Triton kernels (train/kernels/lora_kernels.py)."""
    from train.kernels import lora_kernels

    p = peft_model.peft_config[peft_model.active_adapter]
    if not (fused_layers and p.lora_dropout > 0 and torch.cuda.is_available()):
        return
    if lora_kernels.triton_module() is None:
        log.warning("LoRA dropout: triton is not installed, so dropout runs as separate torch kernels "
                    "(slower; pip install triton)")
    elif p.r not in lora_kernels.RANKS:
        log.info("LoRA dropout: the Triton kernels take lora.r in %s; r=%d runs torch's dropout (slower)",
                 "/".join(map(str, lora_kernels.RANKS)), p.r)


def match_training_dtypes(peft_model, quant) -> None:
    """The LoRA weights of a quantized base train in bf16 (TRL 1.x casts them, as the QLoRA paper does), except
    with fp32 compute: a CPU without native bf16 would run every LoRA matmul emulated, ~30x slower. peft upcasts
    adapters it loads to fp32. Cast them to the training dtype after TRL and wherever an adapter is reloaded
    (resume, eval), so the reloaded model computes exactly what the trained one did."""
    if quant.mode == "none":
        return
    dtype = torch.float32 if precision.compute_dtype(quant) == "float32" else torch.bfloat16
    for name, param in peft_model.named_parameters():
        if "lora_" in name and "lora_magnitude_vector" not in name:
            param.data = param.data.to(dtype)


def use_lean_dropout(peft_model) -> int:
    """Move each LoRA layer's dropout into its lora_A (train/kernels/dropout.py); returns how many adapters changed.
    Plain LoRA only: DoRA and other variants read the dropout output themselves (patches.lean_dropout)."""
    from train.kernels.dropout import LeanDropoutLinear

    return patches.lean_dropout(peft_model, LeanDropoutLinear)
