"""LoRA: config -> peft.LoraConfig, wrap the prepared base, report trainable parameters."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

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
    if l.kernel != "peft":
        use_fused_kernels(peft_model, triton_dropout=l.kernel == "fused_triton")
    trainable, total = peft_model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable of %s parameters (%.3f%%)",
             l.r, l.alpha, l.target_modules, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
    return peft_model


def use_fused_kernels(peft_model, triton_dropout: bool = False) -> None:
    """lora.kernel=fused(_triton): the lean dropout everywhere, and the fused 4-bit LoRA linear except under
    FSDP/DeepSpeed, whose sharded 4-bit weights only bitsandbytes' own module knows how to gather."""
    from train import fused_lora
    from train.model import sharded_launch

    use_lean_dropout(peft_model)
    if sharded_launch() is None:
        n = fused_lora.install(peft_model, triton_dropout)
        log.debug("fused 4-bit LoRA forward on %d layers", n)
        if triton_dropout:
            _note_dropout_path(peft_model, n)


def _note_dropout_path(peft_model, fused_layers: int) -> None:
    """One line when a GPU run's LoRA dropout cannot use the Triton kernels (train/lora_kernels.py)."""
    from train import lora_kernels

    p = peft_model.peft_config[peft_model.active_adapter]
    if not (fused_layers and p.lora_dropout > 0 and torch.cuda.is_available()):
        return
    if lora_kernels._triton() is None:
        log.warning("LoRA dropout: triton is not installed, so dropout runs as separate torch kernels "
                    "(slower; pip install triton)")
    elif p.r not in lora_kernels.RANKS:
        log.info("LoRA dropout: the Triton kernels take lora.r in %s; r=%d runs torch's dropout (slower)",
                 "/".join(map(str, lora_kernels.RANKS)), p.r)


def match_training_dtypes(peft_model, quant_mode: str) -> None:
    """TRL 1.x trains the LoRA weights of a quantized base in bf16 (QLoRA paper), but peft upcasts
    adapters it loads to fp32. Cast them back wherever an adapter is reloaded (resume, eval), so the
    reloaded model computes exactly what the trained one did."""
    if quant_mode == "none":
        return
    for name, param in peft_model.named_parameters():
        if "lora_" in name and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)



# --------------------------------------------------------------------------------------------
# Memory-lean LoRA dropout. peft computes lora_B(lora_A(dropout(x))): autograd then keeps, per LoRA
# layer, the dropout output (2 B per input feature per token) and its mask (1 B) for lora_A's weight
# gradient, although the frozen base layer already keeps x itself. On the 8B benchmark that is 7 extra
# copies per decoder layer, 0.65 GB of the recompute peak. Here lora_A applies the dropout itself, keeps
# only x and the RNG state, and replays the same mask in the backward: the same distribution and the
# same gradients (tests/test_builders.py checks them against peft's own path), a third fewer bytes.


def _generator(device: torch.device) -> torch.Generator:
    """The default generator of `device`: dropout draws from it, and gradient checkpointing saves and
    restores its state, so a recompute draws the same masks as the first forward."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def replay_dropout(x: torch.Tensor, state: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropout output and mask a forward drew from RNG `state`, again: same kernel, same state -> same
    mask. The generator's current state is left as it was."""
    gen = _generator(x.device)
    now = gen.get_state()
    gen.set_state(state)
    dropped, mask = torch.native_dropout(x, p, True)
    gen.set_state(now)
    return dropped, mask


class _DropoutLinear(torch.autograd.Function):
    """y = dropout(x, p) @ weight.T, saving x (already alive) and the RNG state instead of the mask."""

    @staticmethod
    def forward(ctx, x, weight, p):
        ctx.state, ctx.p = _generator(x.device).get_state(), p
        dropped, _ = torch.native_dropout(x, p, True)
        ctx.save_for_backward(x, weight)
        return F.linear(dropped, weight.to(dropped.dtype))

    @staticmethod
    def backward(ctx, grad):
        # Ordered for the smallest transient: the dropout output goes once the weight gradient has it,
        # and the input gradient is masked in place (this runs at the backward's memory peak)
        x, weight = ctx.saved_tensors
        dropped, mask = replay_dropout(x, ctx.state, ctx.p)
        flat = grad.reshape(-1, grad.shape[-1])
        grad_w = (flat.t() @ dropped.reshape(-1, x.shape[-1]).to(flat.dtype)).to(weight.dtype)
        del dropped
        grad_x = None
        if ctx.needs_input_grad[0]:  # (grad @ W) * mask / (1 - p): the scale goes into the small W
            grad_x = flat @ (weight.to(flat.dtype) * (1 / (1 - ctx.p)))
            grad_x = grad_x.mul_(mask.reshape(grad_x.shape)).reshape(x.shape).to(x.dtype)
        return grad_x, grad_w, None


class LeanDropoutLinear(torch.nn.Linear):
    """lora_A with its dropout inside: the same parameters and state-dict keys as torch.nn.Linear."""

    dropout_p = 0.0

    def forward(self, x):
        if not self.training or self.dropout_p == 0:
            return super().forward(x)
        if not torch.is_grad_enabled():  # reentrant checkpointing's first forward: nothing to save
            return F.linear(torch.native_dropout(x, self.dropout_p, True)[0], self.weight.to(x.dtype))
        return _DropoutLinear.apply(x, self.weight, self.dropout_p)


def use_lean_dropout(peft_model) -> int:
    """Move each LoRA layer's dropout into its lora_A (see above); returns how many adapters changed.
    Plain LoRA only: DoRA and other variants read the dropout output themselves."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in peft_model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, drop in list(module.lora_dropout.items()):
            lora_a = module.lora_A[name] if name in module.lora_A else None
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0 and name not in module.lora_variant \
                    and type(lora_a) is torch.nn.Linear:
                lora_a.__class__ = LeanDropoutLinear
                lora_a.dropout_p = drop.p
                module.lora_dropout[name] = torch.nn.Identity()
                changed += 1
    return changed
