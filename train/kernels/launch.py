"""Owns launching our Triton kernels with little host work: a kernel compiled once is relaunched directly.

Why our own code: Triton's `kernel[grid](*args)` binds and specializes every argument, reads its runtime knobs,
builds a cache key and checks the kernel's globals on every call. An 8B step launches ~1,700 Triton kernels (NF4
dequantization, the dropout kernels, Liger's with TRAIN_LIGER_RELAUNCH) on a path where the GPU waits for the host
(docs/benchmarks.md). Here the first launch for a signature goes through Triton, which compiles, specializes and
launches, and returns the CompiledKernel; later launches with the same signature call that kernel's launcher
directly, with the arguments Triton's own launch passes it (patches.triton_launcher). CompiledKernel[grid](*args),
Triton's API for a compiled kernel, was no cheaper than Triton's full path on the GPU host (H100, session 11: 20.5 us
against 20.1 us a launch; the bare CompiledKernel[grid] call 10 us): per call it builds a closure, finds the device
and stream through Triton's driver proxy, builds a launch-metadata dict and makes two launch-hook calls even when no
hook is registered. The signature covers everything Triton specializes on (each tensor's dtype and 16-byte
alignment; each integer's width, ==1 and divisibility by 16; the constexprs and launch options; the current device),
so a relaunch runs the same binary Triton would pick. Anything else (Triton's CPU interpreter, a Triton without
CompiledKernel launches, a registered launch hook) takes Triton's own path or CompiledKernel[grid].
"""

from __future__ import annotations

import functools
import os

import torch

from train import patches

# relaunch compiled kernels directly; TRAIN_DIRECT_LAUNCH=0 (or layer_bench.py, or the bench's BENCH_ALTERNATE, setting
# this attribute) launches every call through Triton's own path, to time one against the other
DIRECT = os.environ.get("TRAIN_DIRECT_LAUNCH", "1") != "0"
TRITONS = "triton's own launch"  # Kernel.compiled's value for a signature always launched through Triton


class Kernel:
    """A @triton.jit function, called as `Kernel(fn)(grid, *args, **constexprs_and_options)`."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled = {}  # signature -> Kernel.entry's tuple, or TRITONS
        self.relaunches = 0  # launches that skipped Triton's binding (tests: the direct path did run)
        self.direct = 0  # of those, launches through the compiled kernel's launcher itself (patches.triton_launcher)
        # constexprs a caller passes by position (Liger's do): a launch is keyed on their values, not only their kind
        self.constexpr_positions = tuple(p.num for p in getattr(fn, "params", ()) if getattr(p, "is_constexpr", False))

    def __call__(self, grid, *args, **kw):
        if not DIRECT or not args or not torch.is_tensor(args[0]) or not args[0].is_cuda:
            self.fn[grid](*args, **kw)  # the CPU interpreter (tests), or switched off
            return
        device = torch.cuda.current_device()
        key = self.key(args, kw, device)
        entry = self.compiled.get(key)
        if entry is None or entry is TRITONS:
            compiled = self.fn[grid](*args, **kw)  # compiles on first use, and launches
            if entry is None:
                self.compiled[key] = self.entry(compiled, len(args), kw)
            return
        compiled, tail, raw = entry
        g = (*grid, 1, 1)
        if raw is not None and _hooks_idle():
            run, function, packed, stream = raw
            run(g[0], g[1], g[2], stream(device), function, packed, None, None, None, *args, *tail)
            self.direct += 1
        else:
            compiled[g[:3]](*args, *tail)  # the compiled launcher takes all three grid dimensions
        self.relaunches += 1

    def entry(self, compiled, positional: int, kw: dict):
        """How later launches of this signature run: (the CompiledKernel, the constexpr values in parameter order, its
        launcher from patches.triton_launcher or None), or TRITONS where it cannot be relaunched (no CompiledKernel
        returned, or a defaulted constexpr the caller left out, whose value only Triton's binding knows)."""
        names = getattr(self.fn, "arg_names", None)
        if names is None or not callable(getattr(type(compiled), "__getitem__", None)):
            return TRITONS
        rest = names[positional:]  # every later parameter, passed by keyword (Liger's and ours: constexprs)
        if not all(n in kw for n in rest):
            return TRITONS
        return compiled, tuple(kw[n] for n in rest), patches.triton_launcher(compiled)

    def key(self, args: tuple, kw: dict, device: int) -> tuple:
        """What selects the compiled kernel: the device, each argument's specialization, the values of constexprs
        passed by position, and the keyword constexprs and options."""
        fixed = tuple(args[i] for i in self.constexpr_positions if i < len(args))
        return device, tuple(map(_spec, args)), fixed, tuple(kw.items())


def _hooks_idle() -> bool:
    """No launch hook is registered (a profiler such as Triton's proton adds them): the direct call passes None for
    both, and the C launcher then calls neither. Any hook: CompiledKernel[grid], which calls them."""
    runtime = _runtime_knobs()
    if runtime is None:
        return False
    return all(h is None or not getattr(h, "calls", True) for h in (runtime.launch_enter_hook,
                                                                   runtime.launch_exit_hook))


@functools.cache
def _runtime_knobs():
    try:
        from triton import knobs
    except ImportError:  # a Triton before its knobs module: every relaunch through CompiledKernel[grid]
        return None
    return getattr(knobs, "runtime", None)


def _spec(arg, _tensor=torch.Tensor):
    """What Triton specializes a launch on for this argument, for what our callers pass: tensors, ints, bools,
    floats, None (a finer key is never wrong; any other object, which none passes, is keyed by its type only)."""
    if isinstance(arg, _tensor):
        return arg.dtype, not arg.data_ptr() & 15
    if isinstance(arg, bool):  # before int: a bool is an int
        return bool, arg
    if isinstance(arg, int):
        return int, arg == 1, not arg & 15, -2**31 <= arg < 2**31, arg < 2**63
    return type(arg)  # floats and the like: passed by value, not specialized
