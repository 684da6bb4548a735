"""Owns launching our Triton kernels with little host work: a kernel compiled once is relaunched directly.

Why our own code: Triton's `kernel[grid](*args)` binds and specializes every argument, reads its runtime knobs from
the environment, builds a cache key string and checks the kernel's globals on every call. The fused QLoRA layer
launches ~670-1,570 Triton kernels a step on an 8B (NF4 dequantization, the dropout kernels), on a path where the
GPU waits for the host (docs/benchmarks.md: in session 6's trace ~100 us of host time went by between an NF4
dequantization's output allocation and its launch; how much of that this saves is not yet measured apart from the
host's run-to-run noise). Here the first launch for a signature goes through Triton, which compiles, specializes
and launches; it returns the CompiledKernel, and later launches with the same signature call that kernel's own launcher
(`CompiledKernel[grid](*args)`, Triton's API for a compiled kernel). The signature covers everything Triton
specializes on (each tensor's dtype and 16-byte alignment; each integer's width, ==1 and divisibility by 16; the
constexprs and launch options; the current device), so a relaunch runs the same binary Triton would pick.
Anything else (Triton's CPU interpreter, a Triton without CompiledKernel launches) takes Triton's own path.
"""

from __future__ import annotations

import torch

DIRECT = True  # relaunch compiled kernels directly; scripts/layer_bench.py switches it off to time Triton's own path


class Kernel:
    """A @triton.jit function, called as `Kernel(fn)(grid, *args, **constexprs_and_options)`."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}  # signature -> (CompiledKernel, the constexpr values in parameter order)
        self.relaunches = 0  # launches that skipped Triton's binding (tests: the direct path did run)
        # constexprs a caller passes by position (Liger's do): a launch is keyed on their values, not only their kind
        self.constexpr_positions = tuple(p.num for p in getattr(fn, "params", ()) if getattr(p, "is_constexpr", False))

    def __call__(self, grid, *args, **kw):
        if not DIRECT or not args or not torch.is_tensor(args[0]) or not args[0].is_cuda:
            self.fn[grid](*args, **kw)  # the CPU interpreter (tests), or switched off
            return
        key = self.key(args, kw)
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.fn[grid](*args, **kw)  # compiles on first use, and launches
            names = getattr(self.fn, "arg_names", None)
            if names is None or not callable(getattr(type(compiled), "__getitem__", None)):
                return  # no compiled launcher to call: every launch goes through Triton
            rest = names[len(args):]  # the constexprs, passed by name
            if all(n in kw for n in rest):
                self.compiled[key] = (compiled, tuple(kw[n] for n in rest))
            return
        compiled, tail = entry
        compiled[(*grid, 1, 1)[:3]](*args, *tail)  # the compiled launcher takes all three grid dimensions
        self.relaunches += 1

    def key(self, args: tuple, kw: dict) -> tuple:
        """What selects the compiled kernel: the device, each argument's specialization, the values of constexprs
        passed by position, and the keyword constexprs and options."""
        fixed = tuple(args[i] for i in self.constexpr_positions if i < len(args))
        return torch.cuda.current_device(), tuple(map(_spec, args)), fixed, tuple(kw.items())


def _spec(arg):
    """What Triton specializes a launch on for this argument (a superset of it: a finer key is never wrong)."""
    if torch.is_tensor(arg):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, bool):
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, arg % 16 == 0, -2**31 <= arg < 2**31, arg < 2**63
    return type(arg)  # floats and the like: passed by value, not specialized
