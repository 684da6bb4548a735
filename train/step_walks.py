"""Owns the two module walks Trainer makes at every training step, model.train() and model.zero_grad(): flat loops
over lists of the model's modules and parameters, kept between steps.

Why our own code: nn.Module.train and zero_grad recurse through every submodule with Python generators, ~2,700
modules on an 8B with LoRA: ~13 and ~15 ms of host time a step on the H100 host (session 12's py-spy profile). They
run at the step boundary, where the GPU has caught up with the host and waits: that step's trace had ~55 ms of gaps
on the compute stream in the first and last 50 ms of a ~570 ms step. Here the lists are made once, and made again
whenever one of the listed modules registers a submodule (torch's global module-registration hook; a submodule
removed with `del` is not seen, and only keeps its flag set). train(mode) sets every module's flag and does what the
tree's own train() overrides add: FusedLinear4bit settles its LoRA group (train/kernels/lora_group.py);
transformers' PreTrainedModel.train adds nothing unless hub kernels are on. A tree with any other train() override,
or a model with hub kernels on, keeps torch's walk. zero_grad(set_to_none=True), Trainer's call, clears every
gradient; set_to_none=False keeps torch's walk.
"""

from __future__ import annotations

import functools
import weakref

import torch

_registrations = [0]  # submodules registered into a listed model's modules: a changed count rebuilds the lists
_listed: dict[int, frozenset] = {}  # id(model) -> ids of its listed modules (a module in a list stays alive)


def _count(module, name, submodule):
    """torch's hook, called for every submodule registered anywhere: only a listed model's modules count (Llama's
    forward slices its ModuleList of layers, which builds a new one and registers every layer in it, each step)."""
    key = id(module)
    if any(key in ids for ids in _listed.values()):
        _registrations[0] += 1


@functools.cache
def _watch() -> None:
    torch.nn.modules.module.register_module_module_registration_hook(_count)


class _Lists:
    def __init__(self, model):
        from transformers import PreTrainedModel

        from train.kernels.fused_lora import FusedLinear4bit

        self.registrations = _registrations[0]
        self.modules = list(model.modules())
        if id(model) not in _listed:
            weakref.finalize(model, _listed.pop, id(model), None)
        _listed[id(model)] = frozenset(map(id, self.modules))
        self.params = list(model.parameters())
        self.hf_models = [m for m in self.modules if isinstance(m, PreTrainedModel)]
        groups = {id(g): g for m in self.modules if isinstance(m, FusedLinear4bit)
                  for g in [m.__dict__.get("_lora_group")] if g is not None}
        self.groups = list(groups.values())
        # what each train() override adds is known for these: anything else takes torch's walk
        known = {torch.nn.Module.train, PreTrainedModel.train, FusedLinear4bit.train, type(model).train}
        self.flat = all(type(m).train in known for m in self.modules)


def _lists(model) -> _Lists:
    lists = model.__dict__.get("_step_walks")
    if lists is None or lists.registrations != _registrations[0]:
        lists = model.__dict__["_step_walks"] = _Lists(model)
    return lists


@functools.cache
def lean_class(base: type) -> type:
    """`base` (the model's class) with flat train() and zero_grad()."""

    class LeanWalks(base):
        def train(self, mode: bool = True):
            lists = _lists(self)
            if not isinstance(mode, bool) or not lists.flat or any(getattr(m, "use_kernels", False)
                                                                   for m in lists.hf_models):
                return super().train(mode)
            for m in lists.modules:
                m.__dict__["training"] = mode  # what Module.train sets; no __setattr__ dispatch per module
            for group in lists.groups:
                group.settle()
            return self

        def zero_grad(self, set_to_none: bool = True) -> None:
            if not set_to_none:
                return super().zero_grad(set_to_none)
            for p in _lists(self).params:
                if p.grad is not None:
                    p.grad = None

    LeanWalks.__name__ = LeanWalks.__qualname__ = f"LeanWalks{base.__name__}"
    return LeanWalks


def install(model, accelerator) -> bool:
    """Give the trainer's model the flat walks (one process or DDP, whose wrapper's train() reaches this model's);
    True when installed. FSDP and DeepSpeed wrap and shard the modules themselves: their walks stay torch's."""
    from accelerate.utils import DistributedType

    from train import patches

    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU):
        return False
    _watch()
    if not type(model).__name__.startswith("LeanWalks"):
        patches.swap_class(model, lean_class(type(model)))
    return True
