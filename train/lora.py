"""LoRA: config -> peft.LoraConfig, wrap the prepared base, report trainable parameters."""

from __future__ import annotations

import logging

from train.config import LoraCfg
from train.errors import UserError

log = logging.getLogger("train")


def build_lora_config(l: LoraCfg):
    """lora.* -> peft.LoraConfig. Pure: no model needed."""
    from peft import LoraConfig

    return LoraConfig(
        r=l.r,
        lora_alpha=l.alpha,
        lora_dropout=l.dropout,
        target_modules=l.target_modules,
        use_rslora=l.use_rslora,
        use_dora=l.use_dora,
        modules_to_save=l.modules_to_save,
        bias="none",  # bias terms stay frozen: standard LoRA, and adapters stay small
        task_type="CAUSAL_LM",
    )


def check_targets(model, l: LoraCfg) -> None:
    """lora.target_modules must name modules the model has (works on a meta-device model: no weights)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    if isinstance(l.target_modules, list):
        missing = [t for t in l.target_modules if t not in names]
        if missing:
            linear = sorted({n for n in names if n.endswith("proj") or n in ("fc1", "fc2", "c_attn", "dense")})
            raise UserError(
                f"lora.target_modules: {missing} not found in the model; its linear layers are {linear} "
                "(or use all-linear)"
            )


def wrap(model, l: LoraCfg):
    from peft import get_peft_model

    check_targets(model, l)
    peft_model = get_peft_model(model, build_lora_config(l))
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)",
             l.r, l.alpha, l.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def match_training_dtypes(peft_model, quant_mode: str) -> None:
    """TRL 1.x trains the LoRA weights of a quantized base in bf16 (QLoRA paper), but peft upcasts
    adapters it loads to fp32. Cast them back wherever an adapter is reloaded (resume, eval), so the
    reloaded model computes exactly what the trained one did."""
    import torch

    if quant_mode == "none":
        return
    for name, param in peft_model.named_parameters():
        if "lora_" in name and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)
