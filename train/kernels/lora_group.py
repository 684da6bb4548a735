"""Owns LoRA layer groups: sibling fused QLoRA layers that read one input (q/k/v, gate/up) computed together.

Why: the fused layers' training step waits for the host (docs/benchmarks.md): every layer pays its own autograd
node, dropout seed, LoRA-A kernels and input-gradient sum, ~40 host calls per forward and backward. A decoder
layer's q_proj, k_proj and v_proj all read the same normed hidden states, as do gate_proj and up_proj. The first
member called computes every member's output in one fused Function (train/kernels/fused_lora.py: one seed, one
launch of each dropout kernel for all members, one input gradient accumulated in place) and keeps the others'
outputs; each sibling then takes its own, when it is called with that very tensor (same object, unchanged since).
A sibling called with another tensor gets its own output on it (the group runs again there), and from the next
training step such a group's members run alone, as do calls that take peft's path (eval, generation). The members keep
their parameters, names and saved adapters; each draws its own dropout mask, as alone.
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Llama, Mistral, Qwen2, Gemma (2) names


class Group:
    """Sibling layers reading one input; `output(member, x)` is member's output on x, or None (the layer runs alone)."""

    def __init__(self, names: list[str], members: list):
        self.names, self.members = names, members
        self.pending = None  # (x, its version, {member: output}) for the siblings not yet called on x
        # a computed output went unclaimed: this model does not call the members on one input. The members run alone
        # from the next model.train() on (Trainer calls it at every training step), never within a step: a
        # checkpointed layer's recompute must take the same path as its forward, or it draws other dropout masks
        self.unclaimed = self.broken = False

    def __deepcopy__(self, memo):
        """A copied model gets its own group of the copied members, with nothing pending (outputs of this step's graph
        cannot be copied, and belong to the original)."""
        copied = memo[id(self)] = Group(list(self.names), [])  # in the memo first: the members refer back to it
        copied.members = copy.deepcopy(self.members, memo)
        copied.unclaimed, copied.broken = self.unclaimed, self.broken
        return copied

    def output(self, member, x: torch.Tensor):
        pending, self.pending = self.pending, None
        if pending is not None:
            px, version, outs = pending
            if px is x and version == x._version and member in outs:
                out = outs.pop(member)
                self.pending = pending if outs else None
                return out
            self.unclaimed = True  # dropped: this call decides as if nothing were pending, in forward and recompute
        if self.broken or not member.training or torch.is_inference(x):
            return None
        return self._compute(member, x)

    def settle(self) -> None:
        """Called from each member's train(): between steps, an unclaimed output switches grouping off for good."""
        self.pending = None
        if self.unclaimed and not self.broken:
            self.broken = True
            log.info("LoRA groups: %s are not called on one input here; they run one by one from now on",
                     "/".join(self.names))

    def _compute(self, member, x):
        from train.kernels import fused_lora

        plans = [m.fused_plan(x, (), {}) for m in self.members]
        if any(p is None for p in plans) or not _compatible(plans, self.members):
            return None
        outs = fused_lora.run(plans, x, self.members[0].triton_dropout)
        mine = self.members.index(member)
        self.pending = (x, x._version, {m: o for i, (m, o) in enumerate(zip(self.members, outs)) if i != mine})
        return outs[mine]


def _compatible(plans, members) -> bool:
    """One Function computes them: the same dropout p, LoRA rank and dropout kernel setting."""
    first = plans[0]
    return all(p.p == first.p and p.a.shape[0] == first.a.shape[0] for p in plans) and \
        len({m.triton_dropout for m in members}) == 1


def install(peft_model) -> int:
    """Group each module's fused LoRA children named in GROUPS (two or more present); returns how many groups.
    The group hangs in each member's __dict__: not a submodule, so state dicts and module walks do not change."""
    from train.kernels.fused_lora import FusedLinear4bit

    groups = 0
    for parent in peft_model.modules():
        for names in GROUPS:
            present = [n for n in names if isinstance(parent._modules.get(n), FusedLinear4bit)]
            if len(present) < 2:
                continue
            members = [parent._modules[n] for n in present]
            group = Group(present, members)
            for m in members:
                m.__dict__["_lora_group"] = group
            groups += 1
    return groups
