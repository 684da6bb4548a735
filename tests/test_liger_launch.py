"""train/kernels/liger_launch.py on CPU: Liger's kernels are wrapped once where its ops look them up, a wrapper passes
Triton's own launch through when switched off or given a computed grid, and a launch is keyed on the values of the
constexprs passed by position (the relaunch itself needs a GPU: tests/test_gpu.py)."""

import pytest

from train import patches
from train.kernels import launch, liger_launch


class FakeParam:
    def __init__(self, num, constexpr):
        self.num, self.is_constexpr = num, constexpr


class FakeKernel:
    """A @triton.jit function as Liger indexes it: kernel[grid](*args, **kw)."""

    arg_names = ["x_ptr", "n", "MODE", "BLOCK"]
    params = [FakeParam(0, False), FakeParam(1, False), FakeParam(2, True), FakeParam(3, True)]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


def test_swap_wraps_each_liger_kernel_once(monkeypatch):
    import importlib

    saved = {(m, n): getattr(importlib.import_module(m), n) for m, names in patches.LIGER_KERNELS.items() for n in names}
    try:
        count = sum(len(v) for v in patches.LIGER_KERNELS.values())
        assert liger_launch.install() == count == liger_launch.install()
        for (m, n), fn in saved.items():
            got = getattr(importlib.import_module(m), n)
            assert isinstance(got, liger_launch.Relaunch) and got.fn is (fn.fn if isinstance(fn, liger_launch.Relaunch)
                                                                           else fn)
            assert got.arg_names == got.fn.arg_names  # Liger and Triton read the kernel's attributes through it
    finally:
        for (m, n), fn in saved.items():
            setattr(importlib.import_module(m), n, fn)


def test_relaunch_passes_tritons_own_launch_through(monkeypatch):
    fn = FakeKernel()
    wrapped = liger_launch.Relaunch(fn)
    monkeypatch.setenv("TRAIN_LIGER_RELAUNCH", "0")
    wrapped[(4,)](1, 2, 0, BLOCK=64)  # switched off: Triton's path
    monkeypatch.setenv("TRAIN_LIGER_RELAUNCH", "1")
    wrapped[lambda meta: (meta["BLOCK"],)](1, 2, 0, BLOCK=64)  # a computed grid: Triton's path
    wrapped[(4,)](1, 2, 0, BLOCK=64)  # CPU arguments: launch.Kernel hands them to Triton too
    assert [c[2] for c in fn.calls] == [{"BLOCK": 64}] * 3 and fn.calls[0][1] == (1, 2, 0)
    assert wrapped.kernel.relaunches == 0


def test_launch_key_holds_positional_constexpr_values():
    """MODE=0 and MODE=32 have the same integer specialization (divisible by 16, not 1): only their values tell the
    compiled kernels apart."""
    k = launch.Kernel(FakeKernel())
    assert k.constexpr_positions == (2, 3)
    assert k.key((1, 2, 0), {"BLOCK": 64}, 0) != k.key((1, 2, 32), {"BLOCK": 64}, 0)
    assert k.key((1, 2, 0), {"BLOCK": 64}, 0) == k.key((1, 2, 0), {"BLOCK": 64}, 0)
    assert launch.Kernel(object()).constexpr_positions == ()  # a kernel without params: nothing extra to key on
