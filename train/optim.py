"""Owns the optimizer step of bitsandbytes' 32-bit AdamW (train.optimizer=paged_adamw_32bit, the default): one update
for all of a parameter group's tensors instead of one per tensor.

Why our own code: bitsandbytes updates each tensor on its own and synchronizes the GPU after each one. On the 8B
benchmark that is 448 LoRA tensors, 30-42 ms of host time a step with the GPU idle in between, on a step that
waits for the host (docs/benchmarks.md, session 6). Here a group's states live in two flat fp32 buffers, one
resident and one paged. They are split by bitsandbytes' own rule: a tensor's state is paged when the optimizer is
and the tensor has at least 1e5 elements, so the same memory is paged as before. Each tensor's state1/state2 is a
view into them, so the optimizer's state_dict, checkpoints and resume are bitsandbytes' own. bitsandbytes' own
update kernel (elementwise) then runs once per buffer on the concatenated gradients and weights: the same numbers
as once per tensor, in a few kernels and no sync. A group the layout does not fit takes bitsandbytes' own
per-tensor path: per-parameter overrides, max_unorm, skip_zeros, 8-bit states, a tensor without a gradient, mixed
devices or dtypes, different step counts, DTensor gradients.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from train import patches

PAGED_MIN = 100_000  # bitsandbytes' get_state_buffer: smaller states are never paged
# TRAIN_ONE_STEP_ADAMW=0 steps with bitsandbytes' own per-tensor AdamW instead: the bench's A/B (docs/benchmarks.md)
ENV = "TRAIN_ONE_STEP_ADAMW"


def optimizer_class(cls, kwargs: dict):
    """The class Trainer should build for (cls, kwargs) from its get_optimizer_cls_and_kwargs: FlatAdamW32bit in
    place of bitsandbytes' AdamW with 32-bit states (unless TRAIN_ONE_STEP_ADAMW=0), anything else unchanged."""
    import bitsandbytes as bnb

    if os.environ.get(ENV, "1") != "0" and cls is bnb.optim.AdamW and kwargs.get("optim_bits", 32) == 32:
        return flat_adamw_class()
    return cls


@dataclass
class _Segment:
    s1: torch.Tensor  # flat fp32 state1 (exp_avg) of the segment's tensors, in order
    s2: torch.Tensor  # flat fp32 state2 (exp_avg_sq)
    start: int  # the segment's offset in the group's concatenated gradients
    n: int


@dataclass
class _Flat:
    ids: tuple  # id() of the group's parameters, in the group's order
    order: list  # the parameters: resident states first, then paged
    sizes: list  # their numel()s, in that order
    views1: list  # each parameter's state1: a view into a segment (checked each step: load_state_dict replaces them)
    views2: list
    segments: list
    state: dict  # the optimizer.state the views were put in (load_state_dict replaces it)
    # each parameter flattened, a view of its own storage: the step reads and writes the weights through these, made
    # once instead of 2 x 448 reshapes a step (checked each step by data pointer: a replaced .data makes them again)
    flat_params: list
    pointers: list


@functools.cache
def flat_adamw_class():
    import bitsandbytes as bnb

    class FlatAdamW32bit(bnb.optim.AdamW):
        """bitsandbytes' AdamW (32-bit states, paged or not) whose step updates a whole group at once."""

        @torch.no_grad()
        def step(self, closure=None):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            patches.bnb_optimizer_ready(self)
            for gindex, group in enumerate(self.param_groups):
                flat = _layout(self, gindex, group)
                if flat is None:
                    patches.bnb_group_step(self, gindex, group)
                else:
                    _adamw_step(self, flat, group)
            return loss

    return FlatAdamW32bit


def _layout(opt, gindex: int, group: dict):
    """The group's flat layout, built (or rebuilt after load_state_dict) when the group fits it; else None."""
    params = group["params"]
    if not _fits(opt, group):
        return None
    cache = opt.__dict__.setdefault("train_flat", {})  # gindex -> _Flat
    flat = cache.get(gindex)
    ids = tuple(map(id, params))
    if flat is not None and flat.ids == ids and flat.state is opt.state and all(
            opt.state[p]["state1"] is v1 and opt.state[p]["state2"] is v2
            for p, v1, v2 in zip(flat.order, flat.views1, flat.views2)):
        if [p.data_ptr() for p in flat.order] != flat.pointers:  # a parameter's .data was replaced
            flat.flat_params, flat.pointers = _flattened(flat.order)
        return flat
    cache[gindex] = flat = _pack(opt, params, ids)
    return flat


def _fits(opt, group: dict) -> bool:
    """Every tensor of the group is contiguous (the step writes it through a flat view), has a plain (not DTensor)
    gradient, one device and dtype, and states that are fresh or fp32 at one step; the optimizer has no per-parameter
    overrides, max_unorm or skip_zeros."""
    params = group["params"]
    if not params or patches.bnb_has_overrides(opt) or len(group["betas"]) != 2:
        return False
    args = opt.args
    if args.optim_bits != 32 or args.max_unorm > 0 or args.skip_zeros:
        return False
    first = params[0]
    # plain tensors only: a DTensor (FSDP2) gradient takes bitsandbytes' own path
    if any(p.grad is None or type(p.grad) is not torch.Tensor or p.device != first.device or p.dtype != first.dtype
           or not p.is_contiguous() for p in params):
        return False
    states = [opt.state.get(p, {}) for p in params]
    if all(len(s) == 0 for s in states):
        return True
    return all(s.get("state1") is not None and s["state1"].dtype == torch.float32 and s.get("state2") is not None
               and s["step"] == states[0]["step"] for s in states)


def _pack(opt, params: list, ids: tuple) -> _Flat:
    """Put the group's states into flat buffers (fresh states start at zero; loaded ones are copied in)."""
    paged = {id(p) for p in params if opt.is_paged and p.device.type == "cuda" and p.numel() >= PAGED_MIN}
    resident = [p for p in params if id(p) not in paged]
    on_pages = [p for p in params if id(p) in paged]
    segments, views1, views2, start = [], [], [], 0
    for members, is_paged in ((resident, False), (on_pages, True)):
        n = sum(p.numel() for p in members)
        if n == 0:
            continue
        device = members[0].device
        s1, s2 = (patches.bnb_paged_zeros(opt, n, device) if is_paged else
                  torch.zeros(n, dtype=torch.float32, device=device) for _ in range(2))
        offset = 0
        for p in members:
            state = opt.state[p]
            for key, flat, views in (("state1", s1, views1), ("state2", s2, views2)):
                view = flat[offset:offset + p.numel()].view_as(p)
                if is_paged:  # CPU-typed managed memory: bitsandbytes' checks (is_on_gpu) look for this mark
                    view.is_paged, view.page_deviceid = True, flat.page_deviceid
                if key in state:
                    view.copy_(state[key])
                state[key] = view
                views.append(view)
            state.setdefault("step", 0)
            offset += p.numel()
        segments.append(_Segment(s1, s2, start, n))
        start += n
    order = resident + on_pages
    return _Flat(ids, order, [p.numel() for p in order], views1, views2, segments, opt.state, *_flattened(order))


def _flattened(params: list) -> tuple[list, list]:
    """(each parameter as a 1-D view of its storage, the data pointers those views were made at)."""
    return [p.detach().view(-1) for p in params], [p.data_ptr() for p in params]


def _adamw_step(opt, flat: _Flat, group: dict) -> None:
    """bitsandbytes' own 32-bit update kernel, once per segment on the concatenated gradients and weights (it is
    elementwise: the same result as once per tensor), then the weights copied back into the parameters through their
    flat views."""
    import bitsandbytes.functional as F

    states = [opt.state[p] for p in flat.order]
    step = states[0]["step"] + 1
    for state in states:
        state["step"] = step
    grads = torch.cat([p.grad.reshape(-1) for p in flat.order])
    weights = torch.cat(flat.flat_params)
    for seg in flat.segments:
        if getattr(seg.s1, "is_paged", False):  # as bitsandbytes' prefetch_state: the pages onto the GPU first
            F.prefetch_tensor(seg.s1)
            F.prefetch_tensor(seg.s2)
        F.optimizer_update_32bit(opt.optimizer_name, grads[seg.start:seg.start + seg.n],
                                 weights[seg.start:seg.start + seg.n], seg.s1, group["betas"][0], group["eps"], step,
                                 group["lr"], seg.s2, group["betas"][1], 0.0, 0.0, group["weight_decay"], 1.0, None,
                                 max_unorm=0.0, skip_zeros=False)
    torch._foreach_copy_(flat.flat_params, weights.split(flat.sizes))
