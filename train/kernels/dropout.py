"""Owns the memory-lean LoRA dropout: lora_A with its dropout inside, replaying the mask in the backward.

peft computes lora_B(lora_A(dropout(x))): autograd then keeps, per LoRA layer, the dropout output (2 B per
input feature per token) and its mask (1 B) for lora_A's weight gradient, although the frozen base layer
already keeps x itself. On the 8B benchmark that is 7 extra copies per decoder layer, 0.65 GB of the
recompute peak. Here lora_A applies the dropout itself, keeps only x and the RNG state, and replays the
same mask in the backward: the same distribution and the same gradients (tests/test_lora_dropout.py checks
them against peft's own path), a third fewer bytes. train/lora.py installs it (use_lean_dropout).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def generator(device: torch.device) -> torch.Generator:
    """The default generator of `device`: dropout draws from it, and gradient checkpointing saves and
    restores its state, so a recompute draws the same masks as the first forward."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def replay_dropout(x: torch.Tensor, state: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropout output and mask a forward drew from RNG `state`, again: same kernel, same state -> same
    mask. The generator's current state is left as it was."""
    gen = generator(x.device)
    now = gen.get_state()
    gen.set_state(state)
    dropped, mask = torch.native_dropout(x, p, True)
    gen.set_state(now)
    return dropped, mask


class _DropoutLinear(torch.autograd.Function):
    """y = dropout(x, p) @ weight.T, saving x (already alive) and the RNG state instead of the mask."""

    @staticmethod
    def forward(ctx, x, weight, p):
        ctx.state, ctx.p = generator(x.device).get_state(), p
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
