"""Owns the module walks Trainer makes at every training step, model.train(), model.zero_grad() and the clip's
model.parameters(): flat loops over lists of the model's modules and parameters, kept between steps.

Why our own code: nn.Module.train and zero_grad recurse through every submodule with Python generators, ~2,700
modules on an 8B with LoRA: ~14 and ~17 ms of host time a step on the H100 host (session 12's py-spy profile,
its overhead included). They run at the step boundary, where the GPU has caught up with the host and waits: that
step's trace had ~55 ms of gaps on the compute stream in the first and last 50 ms of a ~570 ms step. Here the lists
are made once per model and checked at each use: made again when a listed module registers a submodule or a
parameter (torch's global registration hooks), and when the count of the listed modules' children and parameters
changes (an insert or a `del`, which no hook sees). train(mode) sets every module's flag and does what the tree's own
train() overrides add: FusedLinear4bit settles its LoRA group (train/kernels/lora_group.py); transformers'
PreTrainedModel.train adds nothing unless hub kernels are on. A tree with any other train() override (DoRA's, say),
or a model with hub kernels on, keeps torch's walk. zero_grad(set_to_none=True), Trainer's call, clears every
gradient; set_to_none=False keeps torch's walk, as does TRAIN_FLAT_WALKS=0 for all three. Under DDP, Trainer calls
train() and zero_grad() on the wrapper: train() reaches the flat one through it, zero_grad stays torch's.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch

# TRAIN_FLAT_WALKS=0 takes torch's walks: read at each call, so the bench can alternate it within one run
ENV = "TRAIN_FLAT_WALKS"
_registrations = [0]  # registrations into a listed module: a changed count makes every model's lists again
# id(model) -> ids of its listed modules (a module in a list stays alive). Replaced, never changed in place: a model's
# finalizer may drop its entry from inside a registration that is reading it (the garbage collector runs anywhere)
_listed: dict[int, frozenset] = {}


def _set_listed(key: int, ids: frozenset | None) -> None:
    global _listed
    _listed = {k: v for k, v in _listed.items() if k != key} | ({} if ids is None else {key: ids})


def _count(module, name, value):
    """torch's hooks, called for every submodule and parameter registered anywhere: only a listed module counts
    (Llama's forward slices its ModuleList of layers, which builds a new one and registers every layer in it)."""
    key = id(module)
    if any(key in ids for ids in _listed.values()):
        _registrations[0] += 1


@functools.cache
def _watch() -> None:
    torch.nn.modules.module.register_module_module_registration_hook(_count)
    torch.nn.modules.module.register_module_parameter_registration_hook(_count)


def _members(modules) -> list:
    """What an insert or a `del` changes and no hook sees: each listed module's dicts of children and parameters
    (their lengths, summed, are checked at each use: a C loop, ~0.1 ms for an 8B's)."""
    return [m._modules for m in modules] + [m._parameters for m in modules]


class _Lists:
    def __init__(self, model):
        from transformers import PreTrainedModel

        from train.kernels.fused_lora import FusedLinear4bit

        _watch()
        self.model, self.registrations = id(model), _registrations[0]
        self.modules = list(model.modules())
        self.members = _members(self.modules)
        self.shape = sum(map(len, self.members))
        self.params = list(model.parameters())
        if id(model) not in _listed:
            weakref.finalize(model, _set_listed, id(model), None)
        _set_listed(id(model), frozenset(map(id, self.modules)))
        self.hf_models = [m for m in self.modules if isinstance(m, PreTrainedModel)]
        groups = {id(g): g for m in self.modules if isinstance(m, FusedLinear4bit)
                  for g in [m.__dict__.get("_lora_group")] if g is not None}
        self.groups = list(groups.values())
        # what each train() override adds is known for these (the model's own: its class before the swap)
        known = {torch.nn.Module.train, PreTrainedModel.train, FusedLinear4bit.train}
        self.flat = all(_own_train(m) in known for m in self.modules)

    def current(self, model) -> bool:
        return (self.model == id(model) and self.registrations == _registrations[0]
                and self.shape == sum(map(len, self.members)))


def _own_train(module):
    """The train() the module's class brings, looking past the LeanWalks subclass."""
    cls = type(module)
    return getattr(cls, "lean_base", cls).train


def lists(model) -> _Lists:
    """The model's module and parameter lists, made again where the model changed since."""
    found = model.__dict__.get("_step_walks")
    if found is None or not found.current(model):
        found = model.__dict__["_step_walks"] = _Lists(model)
    return found


def on() -> bool:
    return os.environ.get(ENV, "1") != "0"


def parameters(model) -> list:
    """model.parameters() as a list, without the walk when nothing changed (the clip, train/patches.py)."""
    return lists(model).params if on() else list(model.parameters())


@functools.cache
def lean_class(base: type) -> type:
    """`base` (the model's class) with flat train() and zero_grad()."""

    class LeanWalks(base):
        lean_base = base

        def train(self, mode: bool = True):
            if not on():
                return super().train(mode)
            found = lists(self)
            if not isinstance(mode, bool) or not found.flat or any(getattr(m, "use_kernels", False)
                                                                   for m in found.hf_models):
                return super().train(mode)
            for m in found.modules:
                m.__dict__["training"] = mode  # what Module.train sets; no __setattr__ dispatch per module
            for group in found.groups:
                group.settle()
            return self

        def zero_grad(self, set_to_none: bool = True) -> None:
            if not set_to_none or not on():
                return super().zero_grad(set_to_none)
            for p in lists(self).params:
                if p.grad is not None:
                    p.grad = None

    LeanWalks.__name__ = LeanWalks.__qualname__ = f"LeanWalks{base.__name__}"
    return LeanWalks


def install(model, accelerator) -> bool:
    """Give the trainer's model the flat walks for a train() call (one process or DDP, whose wrapper's train()
    reaches this model's); True when installed. FSDP and DeepSpeed wrap and shard the modules themselves: their walks
    stay torch's."""
    from train import patches

    if not patches.unsharded(accelerator):
        return False
    if "lean_base" not in type(model).__dict__:
        patches.swap_class(model, lean_class(type(model)))
    return True


def uninstall(model) -> None:
    """The model's own class again, and no lists kept (after train(): a saved or copied model is a plain one)."""
    base = type(model).__dict__.get("lean_base")
    if base is not None:
        model.__class__ = base
    model.__dict__.pop("_step_walks", None)
    _set_listed(id(model), None)
