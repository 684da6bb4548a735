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
module's forward differs, and only where it computes exactly peft's LoRA (tests/test_fused_lora.py). Layers that
read the same x (q/k/v, gate/up: train/kernels/lora_group.py) run as one Function of several members, each with its
own base weight, adapter and dropout mask.
Anything else (eval/generation, merged or disabled adapters, several active adapters, DoRA and other
variants, other dtypes, FSDP/DeepSpeed shards) runs peft's own forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from bitsandbytes.functional import dequantize_4bit
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

from train import patches
from train.kernels import lean_recompute, lora_kernels, nf4
from train.kernels.dropout import generator, replay_dropout


def _weight(weight, quant_state, dtype):
    """The 4-bit base weight as a dense (out, in) matrix, as bitsandbytes dequantizes it for a large matmul (its
    fused 4-bit kernel only wins below a few hundred tokens): on the GPU in one kernel of ours (train/kernels/nf4.py,
    the same bits, a third of the launches and none of the Python-registered ops), else bitsandbytes' own."""
    dense = nf4.dequantize(weight, quant_state, dtype) if quant_state.dtype == dtype else None
    return dense if dense is not None else dequantize_4bit(weight, quant_state).to(dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in dtype: t itself when it is already (Tensor.to would return it too, but through a dispatched op: ~2,100
    such calls a step on the 8B, host time on a path that waits for the host: docs/benchmarks.md, session 13)."""
    return t if t.dtype == dtype else t.to(dtype)


def _forward(x, spec, a_list, b_list):
    """(the members' outputs, x @ A_j.T of every member as (tokens, members*r), how the dropout was drawn: None,
    ("kernel", seed) or ("torch", RNG states), the members' A stacked in x's dtype). `spec` is (per member (weight,
    quant_state, bias, scale), p, triton_dropout, outputs); one member is a lone layer, several are a group reading
    the same x (train/kernels/lora_group.py). outputs=False (a recompute that reads no output:
    train/kernels/lean_recompute.py) draws the dropout and x @ A.T only, and the outputs are uninitialized. Plain 2-D
    mm/addmm calls, not F.linear: the fast path waits for the host (docs/benchmarks.md), and linear's matmul/reshape
    layers cost host time per call for nothing here."""
    bases, p, triton_dropout, outputs = spec
    rows = x.reshape(-1, x.shape[-1])
    if not outputs:
        h, drawn, a = _lora_a(rows, a_list, p, triton_dropout)
        return [x.new_empty(*x.shape[:-1], qs.shape[0]) for _, qs, _, _ in bases], h, drawn, a
    outs = []
    for weight, quant_state, bias, _ in bases:
        w = _weight(weight, quant_state, x.dtype).t()
        outs.append(torch.mm(rows, w) if bias is None else torch.addmm(_as(bias, x.dtype), rows, w))
    h, drawn, a = _lora_a(rows, a_list, p, triton_dropout)
    for out, hj, b, (*_, scale) in zip(outs, _columns(h, len(outs)), b_list, bases):
        out.addmm_(hj, _as(b, x.dtype).t(), alpha=scale)  # base + scale * h_j @ B_j.T, one kernel
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs], h, drawn, a


def _lora_a(rows, a_list, p, triton_dropout):
    """(dropout_j(rows) @ A_j.T for every member j, side by side, how the dropout was drawn, the stacked A used)."""
    a = _stacked(a_list, rows.dtype)
    if p > 0 and triton_dropout and lora_kernels.usable(rows, a_list[0]):  # GPU: the masks live only in the kernels
        seed = lora_kernels.new_seed()
        return lora_kernels.lora_a_forward(rows, a, seed, p, len(a_list)), ("kernel", seed), a
    if p == 0:
        return torch.mm(rows, a.t()), None, a
    states, hs = [], []
    for aj in _rows(a, len(a_list)):  # one draw per member, in member order: what the members alone would draw
        states.append(generator(rows.device).get_state())
        hs.append(torch.mm(torch.native_dropout(rows, p, True)[0], aj.t()))
    return (hs[0] if len(hs) == 1 else torch.cat(hs, 1)), ("torch", states), a


def _stacked(a_list, dtype):
    """The members' A weights as one (members*r, in) matrix in `dtype` (a lone layer's own, cast)."""
    return _as(a_list[0] if len(a_list) == 1 else torch.cat(a_list), dtype)


def _columns(t, members):
    """Member j's block of columns of a (tokens, members*r) tensor (views; the tensor itself for one member)."""
    r = t.shape[1] // members
    return [t] if members == 1 else [t[:, j * r:(j + 1) * r] for j in range(members)]


def _rows(t, members):
    """Member j's block of rows of a (members*r, n) tensor."""
    return [t] if members == 1 else list(t.chunk(members))


class _QLoraGroup(torch.autograd.Function):
    """One fused QLoRA layer, or a group of them reading the same x: apply(x, spec, *A weights, *B weights)."""

    @staticmethod
    def forward(ctx, x, spec, *ab):
        k = len(spec[0])
        outs, h, drawn, a = _forward(x, spec, ab[:k], ab[k:])
        ctx.save_for_backward(x, h, *ab)
        # the stacked (or cast) A: the backward reads the same, and a group's cat costs a launch on a backward that
        # waits for the host (docs/benchmarks.md, session 14). Not an output: a plain attribute holds it, until this
        # layer's backward (a reentrant checkpoint's recompute) or the step's end (no checkpointing: ~20 MB on the
        # 8B at r=16, not in train plan)
        ctx.spec, ctx.drawn, ctx.stacked = spec, drawn, a
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        # Ordered for the smallest transient (this runs at the backward's memory peak): the LoRA weight
        # gradients first, each replayed dropout output freed at once, the dense base weights one at a time. Each
        # scale rides in a GEMM's alpha (addmm with beta=0 ignores its input): one kernel launch each
        x, h, *ab = ctx.saved_tensors
        bases = ctx.spec[0]
        k = len(bases)
        a_list, b_list = ab[:k], ab[k:]
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        rows = x.reshape(-1, x.shape[-1])
        unused = gs[0].new_empty(())  # addmm's ignored input (beta=0: never read, nothing launched)
        grad_b, ghs = [], []
        for j, (g, hj, b) in enumerate(zip(gs, _columns(h, k), b_list)):
            scale = bases[j][3]
            grad_b.append(_as(torch.addmm(unused, g.t(), _as(hj, g.dtype), beta=0, alpha=scale), b.dtype)
                          if ctx.needs_input_grad[2 + k + j] else None)
            ghs.append(torch.addmm(unused, g, _as(b, g.dtype), beta=0, alpha=scale))  # the gradient at x @ A_j.T
        gh = ghs[0] if k == 1 else torch.cat(ghs, 1)
        grad_a, masked = _lora_a_backward(ctx, rows, gh, a_list)
        grad_x = None
        if ctx.needs_input_grad[0]:
            for g, (weight, quant_state, *_) in zip(gs, bases):
                w = _weight(weight, quant_state, g.dtype)
                grad_x = torch.mm(g, w) if grad_x is None else grad_x.addmm_(g, w)
                del w
            masked(grad_x)
            grad_x = _as(grad_x.view(x.shape), x.dtype)
        return grad_x, None, *grad_a, *grad_b


def _lora_a_backward(ctx, rows, gh, a_list):
    """(the gradients of the members' A, a function adding the LoRA term to the input gradient in place)."""
    k, p = len(a_list), ctx.spec[1]
    wanted = [ctx.needs_input_grad[2 + j] for j in range(k)]
    kind, drawn = ctx.drawn or (None, None)
    a = ctx.stacked if ctx.stacked.dtype == gh.dtype else _stacked(a_list, gh.dtype)
    if kind == "kernel":  # the members' A gradients in one tensor of their dtype (rows j*r.. are member j's): no casts
        one = a_list[0].dtype if all(aj.dtype == a_list[0].dtype for aj in a_list) else torch.float32
        grad_a = _rows(lora_kernels.lora_a_grad(rows, gh, drawn, p, k, one), k) if any(wanted) else [None] * k
        grads = [_as(g, aj.dtype) if want else None for g, aj, want in zip(grad_a, a_list, wanted)]
        return grads, lambda grad_x: lora_kernels.lora_x_grad_(grad_x, gh, a, drawn, p, k)
    if kind is None:  # no dropout: plain products
        grads = [_as(torch.mm(ghj.t(), rows), aj.dtype) if want else None
                 for ghj, aj, want in zip(_columns(gh, k), a_list, wanted)]
        return grads, lambda grad_x: grad_x.addmm_(gh, a)
    grads, masks = [], []
    for ghj, aj, want, state in zip(_columns(gh, k), a_list, wanted, drawn):
        dropped, mask = replay_dropout(rows, state, p)
        grads.append(_as(torch.mm(ghj.t(), dropped), aj.dtype) if want else None)
        del dropped
        masks.append(mask if k == 1 else None)  # a group replays its masks again below: one alive at a time

    def masked(grad_x):  # mask, dropout's 1/(1-p) and the add in one kernel per member
        for ghj, aj, state, mask in zip(_columns(gh, k), _rows(a, k), drawn, masks):
            mask = replay_dropout(rows, state, p)[1] if mask is None else mask
            grad_x.addcmul_(torch.mm(ghj, aj), mask, value=1 / (1 - p))
    return grads, masked


class Plan(NamedTuple):
    """What the fused Function reads of one layer (fused_plan): its tensors, read once per call."""
    a: torch.Tensor  # lora_A's weight (r, in)
    b: torch.Tensor  # lora_B's weight (out, r)
    weight: torch.Tensor  # the 4-bit base weight
    quant_state: object  # its bitsandbytes QuantState
    bias: torch.Tensor | None  # the base layer's (frozen) bias
    scale: float
    p: float  # dropout


class FusedLinear4bit(PeftLinear4bit):
    """peft's LoRA layer over a bitsandbytes Linear4bit, with the fused training forward above."""

    # dropout in the Triton kernels of train/kernels/lora_kernels.py (lora.kernel=fused_triton) instead of torch's
    triton_dropout = False
    # a decoder layer's last projection, whose output its recompute never reads (set by train/kernels/lean_recompute.py)
    lean_last = False

    def forward(self, x, *args, **kwargs):
        group = self.__dict__.get("_lora_group")  # siblings reading the same x (train/kernels/lora_group.py)
        if group is not None and not (args or kwargs):
            out = group.output(self, x)
            if out is not None:
                return out
        plan = self.fused_plan(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        return run([plan], x, self.triton_dropout, not lean_recompute.skips_output(self))[0]

    def train(self, mode: bool = True):
        group = self.__dict__.get("_lora_group")
        if group is not None:
            group.settle()
        return super().train(mode)

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
        """The layer's Plan when the fused forward computes exactly what peft's would; None sends the call to peft.
        Submodules and parameters are read from torch's own dicts, not through Module.__getattr__ (~0.3 us a read, a
        dozen reads a call, 448 calls a step on the 8B: 9 -> 4 us a call on this project's CPU box), and only here."""
        if args or kwargs or not self.training or self.disable_adapters or self.merged:
            return None
        active, modules = self.active_adapters, self._modules
        lora_a = modules["lora_A"]._modules
        if len(active) != 1 or active[0] not in lora_a or patches.has_lora_variant(self, active[0]):
            return None
        name = active[0]
        a, b, drop = lora_a[name], modules["lora_B"]._modules[name], modules["lora_dropout"]._modules[name]
        if isinstance(drop, torch.nn.Dropout):
            p = drop.p
        elif isinstance(drop, torch.nn.Identity):
            p = getattr(a, "dropout_p", 0.0)  # the lean dropout (train/kernels/dropout.py) moved it into lora_A
        else:
            return None
        base = self.base_layer_cached()
        weight, bias = base._parameters.get("weight"), base._parameters.get("bias")
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None or getattr(quant_state, "packing_format_for_cpu", False):  # repacked for CPU
            return None  # inference: only bitsandbytes' own kernel reads that layout (train.model avoids it)
        a_params, b_params = a._parameters, b._parameters
        a_weight, b_weight = a_params.get("weight"), b_params.get("weight")
        if a_weight is None or b_weight is None:  # e.g. a parametrized weight (torch.nn.utils.parametrize): a property
            return None
        if (bias is not None and bias.requires_grad) or a_params.get("bias") is not None or \
                b_params.get("bias") is not None:
            return None  # trainable base bias or peft's lora_bias: gradients this Function does not compute
        if base.compute_dtype not in (None, x.dtype) or not x.is_floating_point():
            return None
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        if (autocast and torch.get_autocast_dtype(device) != x.dtype) or (
                not autocast and not a_weight.dtype == b_weight.dtype == x.dtype):
            return None
        return Plan(a_weight, b_weight, weight, quant_state, bias, self.scaling[name], p)


def run(plans, x, triton_dropout: bool, outputs: bool = True) -> list:
    """The outputs on x of the layers `plans` describe (fused_plan's: one layer, or a group reading x).
    outputs=False: a recompute whose outputs nothing reads (lean_recompute.py): only what the backward needs."""
    bases = tuple((plan.weight, plan.quant_state, plan.bias, plan.scale) for plan in plans)
    a_list, b_list = [plan.a for plan in plans], [plan.b for plan in plans]
    if not torch.is_grad_enabled():  # reentrant checkpointing's first forward: nothing to save, every output read
        return _forward(x, (bases, plans[0].p, triton_dropout, True), a_list, b_list)[0]
    spec = (bases, plans[0].p, triton_dropout, outputs)
    return list(_QLoraGroup.apply(x, spec, *a_list, *b_list))


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
