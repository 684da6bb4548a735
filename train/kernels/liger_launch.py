"""Owns launching Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) through train/kernels/launch.py's direct relaunch.

Why: Liger launches each kernel as `kernel[grid](*args, **kw)`, Triton's own path, which binds and specializes every
argument, builds a cache key and reads its knobs at each call: 8 % of the forward's host samples on the 8B workload
(docs/benchmarks.md, session 10's py-spy profile), on a step that waits for the host. Liger has no hook for its
launches; its ops look each kernel up as a module global at every call, so patches.swap_liger_kernels puts a Relaunch
in each one's place: the first launch of a signature goes through Triton, later ones through the compiled kernel's
own launcher (launch.Kernel, keyed on the values of the constexprs Liger passes by position too).
TRAIN_LIGER_RELAUNCH=1 turns it on (staged: it gave 0.98x in session 11's A/B on an H100, when launch.Kernel still went
through CompiledKernel[grid]; read at each launch, so the bench can alternate it).
"""

from __future__ import annotations

import functools
import os

from train import patches
from train.kernels import launch


def enabled() -> bool:
    return os.environ.get("TRAIN_LIGER_RELAUNCH", "0") == "1"


class Relaunch:
    """A @triton.jit kernel that Liger indexes with a grid and calls; a tuple grid goes through launch.Kernel."""

    def __init__(self, fn):
        self.fn = fn
        self.kernel = launch.Kernel(fn)

    def __getitem__(self, grid):
        if callable(grid) or not enabled():  # a grid computed from the meta-parameters, or switched off: Triton's
            return self.fn[grid]
        return functools.partial(self.kernel, grid)

    def __getattr__(self, name):  # the kernel's own attributes (arg_names, params, ...)
        if name.startswith("__") or "fn" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["fn"], name)


def install() -> int:
    """Every Liger kernel of patches.LIGER_KERNELS wrapped in a Relaunch, once; returns how many are wrapped."""
    return patches.swap_liger_kernels(Relaunch)
