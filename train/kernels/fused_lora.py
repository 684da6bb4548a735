"""Owns the fused QLoRA linear: a 4-bit base layer and its LoRA adapter in one autograd Function.

Why our own code: peft runs every LoRA layer as a chain of modules: bitsandbytes' Linear4bit (its own
autograd Function), a defensive clone of the output, dropout, lora_A, lora_B, a multiply by the scale
and an add. On the 8B benchmark that is 224 layers x (forward + recompute + backward) of Python module
calls, autograd nodes and output-sized elementwise kernels (the clone, the scale, the add each read
and write a tensor as wide as the layer's output). The fast path is host-bound (docs/benchmarks.md),
so each of those costs time. Here one Function does

    y = x @ dequant(W4).T (+ bias) + scale * dropout(x) @ A.T @ B.T

with the LoRA term added inside the base output by a single addmm, and a hand-written backward that
keeps only x, the small x @ A.T and the RNG state (the dropout mask is replayed, as in train/kernels/dropout.py's
lean dropout). The parameters, their names and the saved adapter are peft's, unchanged; only the
module's forward differs, and only where it computes exactly peft's LoRA (tests/test_fused_lora.py).
Anything else (eval/generation, merged or disabled adapters, several active adapters, DoRA and other
variants, other dtypes, FSDP/DeepSpeed shards) runs peft's own forward.
"""

from __future__ import annotations

import torch
from bitsandbytes.functional import dequantize_4bit
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

from train import patches
from train.kernels import lora_kernels, nf4
from train.kernels.dropout import generator, replay_dropout


def _weight(weight, quant_state, dtype):
    """The 4-bit base weight as a dense (out, in) matrix, as bitsandbytes dequantizes it for a large matmul (its
    fused 4-bit kernel only wins below a few hundred tokens): on the GPU in one kernel of ours (train/kernels/nf4.py,
    the same bits, a third of the launches and none of the Python-registered ops), else bitsandbytes' own."""
    dense = nf4.dequantize(weight, quant_state, dtype) if quant_state.dtype == dtype else None
    return dense if dense is not None else dequantize_4bit(weight, quant_state).to(dtype)


def _forward(x, a, b, weight, quant_state, bias, scale, p, triton_dropout=False):
    """(output, x @ A.T as (tokens, r), how the dropout was drawn: None, ("kernel", seed) or ("torch", RNG state)).
    Plain 2-D mm/addmm calls, not F.linear: the fast path waits for the host (docs/benchmarks.md), and linear's
    matmul/reshape layers cost host time per call for nothing here."""
    rows = x.reshape(-1, x.shape[-1])
    w = _weight(weight, quant_state, x.dtype).t()
    out = torch.mm(rows, w) if bias is None else torch.addmm(bias.to(x.dtype), rows, w)
    a = a.to(x.dtype)
    if p > 0 and triton_dropout and lora_kernels.usable(rows, a):  # GPU: the mask lives only inside the kernels
        seed = lora_kernels.new_seed()
        h, drawn = lora_kernels.lora_a_forward(rows, a, seed, p), ("kernel", seed)
    elif p > 0:
        drawn = ("torch", generator(x.device).get_state())
        h = torch.mm(torch.native_dropout(rows, p, True)[0], a.t())
    else:
        h, drawn = torch.mm(rows, a.t()), None
    out.addmm_(h, b.to(x.dtype).t(), alpha=scale)  # base + scale * h @ B.T, one kernel
    return out.view(*x.shape[:-1], out.shape[-1]), h, drawn


class _QLoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b, weight, quant_state, bias, scale, p, triton_dropout):
        out, h, drawn = _forward(x, a, b, weight, quant_state, bias, scale, p, triton_dropout)
        ctx.save_for_backward(x, a, b, h)
        ctx.weight, ctx.quant_state, ctx.scale, ctx.p, ctx.drawn = weight, quant_state, scale, p, drawn
        return out

    @staticmethod
    def backward(ctx, grad):
        # Ordered for the smallest transient (this runs at the backward's memory peak): the LoRA weight
        # gradients first, the replayed dropout output freed at once, the dense base weight last. Each scale rides
        # in a GEMM's alpha (addmm with beta=0 ignores its input): one kernel launch each, fewer host calls
        x, a, b, h = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        rows = x.reshape(-1, x.shape[-1])
        a_cd = a.to(g.dtype)
        unused = g.new_empty(())  # addmm's ignored input (beta=0: never read, nothing launched)
        grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.addmm(unused, g.t(), h.to(g.dtype), beta=0, alpha=ctx.scale).to(b.dtype)
        gh = torch.addmm(unused, g, b.to(g.dtype), beta=0, alpha=ctx.scale)  # (tokens, r): the gradient at x @ A.T
        kind, drawn = ctx.drawn or (None, None)
        mask, grad_a = None, None
        if kind == "kernel":
            if ctx.needs_input_grad[1]:
                grad_a = lora_kernels.lora_a_grad(rows, gh, drawn, ctx.p).to(a.dtype)
        else:
            dropped, mask = replay_dropout(rows, drawn, ctx.p) if kind == "torch" else (rows, None)
            if ctx.needs_input_grad[1]:
                grad_a = torch.mm(gh.t(), dropped).to(a.dtype)
            del dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(g, _weight(ctx.weight, ctx.quant_state, g.dtype))
            if kind == "kernel":
                lora_kernels.lora_x_grad_(grad_x, gh, a_cd, drawn, ctx.p)
            elif mask is None:
                grad_x.addmm_(gh, a_cd)
            else:  # mask, dropout's 1/(1-p) and the add in one kernel
                grad_x.addcmul_(torch.mm(gh, a_cd), mask, value=1 / (1 - ctx.p))
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None, None


class FusedLinear4bit(PeftLinear4bit):
    """peft's LoRA layer over a bitsandbytes Linear4bit, with the fused training forward above."""

    # dropout in the Triton kernels of train/kernels/lora_kernels.py (lora.kernel=fused_triton) instead of torch's
    triton_dropout = False

    def forward(self, x, *args, **kwargs):
        plan = self.fused_plan(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        a, b, base, scale, p = plan
        weight = base.weight
        bias = base.bias
        args = (x, a.weight, b.weight, weight, weight.quant_state, bias, scale, p, self.triton_dropout)
        if not torch.is_grad_enabled():  # reentrant checkpointing's first forward: nothing to save
            return _forward(*args)[0]
        return _QLoraLinear.apply(*args)

    def base_layer_cached(self):
        """peft's get_base_layer, walked again only when the base_layer child is another object (a replaced child,
        as transformers' dequantize() does): the walk costs ~7 us of host time a call, two calls a step per layer.
        Kept in __dict__, so not registered as a submodule again."""
        child = self._modules["base_layer"]
        cached = self.__dict__.get("_fused_base")
        if cached is None or cached[0] is not child:
            cached = self.__dict__["_fused_base"] = (child, self.get_base_layer())
        return cached[1]

    def fused_plan(self, x, args, kwargs):
        """(lora_A, lora_B, base layer, scale, dropout p) when the fused forward computes exactly what
        peft's would; None sends the call to peft."""
        if args or kwargs or not self.training or self.disable_adapters or self.merged:
            return None
        active = self.active_adapters
        if len(active) != 1 or active[0] not in self.lora_A or patches.has_lora_variant(self, active[0]):
            return None
        name = active[0]
        a, b, drop = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if isinstance(drop, torch.nn.Dropout):
            p = drop.p
        elif isinstance(drop, torch.nn.Identity):
            p = getattr(a, "dropout_p", 0.0)  # the lean dropout (train/kernels/dropout.py) moved it into lora_A
        else:
            return None
        base = self.base_layer_cached()
        quant_state = getattr(base.weight, "quant_state", None)
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):  # repacked for CPU
            return None  # inference: only bitsandbytes' own kernel reads that layout (train.model avoids it)
        if (base.bias is not None and base.bias.requires_grad) or a.bias is not None or b.bias is not None:
            return None  # trainable base bias or peft's lora_bias: gradients this Function does not compute
        if base.compute_dtype not in (None, x.dtype) or not x.is_floating_point():
            return None
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        if (autocast and torch.get_autocast_dtype(device) != x.dtype) or (
                not autocast and not a.weight.dtype == b.weight.dtype == x.dtype):
            return None
        return a, b, base, self.scaling[name], p


def install(peft_model, triton_dropout: bool = False) -> int:
    """Give every plain LoRA layer over a 4-bit base the fused forward; returns how many changed.
    Same parameters and state-dict keys: checkpoints and saved adapters do not change."""
    changed = 0
    for module in peft_model.modules():
        if type(module) is PeftLinear4bit:
            patches.check_peft_layer(module)
            patches.swap_class(module, FusedLinear4bit)
            module.triton_dropout = triton_dropout
            changed += 1
    return changed
