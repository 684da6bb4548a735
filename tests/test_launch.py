"""train/kernels/launch.py on CPU, with a stand-in for Triton's JIT function and compiled kernel: which launches go
through Triton, which through the compiled kernel's launcher, and with what arguments (the GPU run, bit for bit
against Triton's own launch: tests/test_gpu.py::test_direct_relaunch_equals_tritons_own_launch)."""

import pytest
import torch

from train import patches
from train.kernels import launch


class CudaLike(torch.Tensor):
    """A CPU tensor that says it is on CUDA: launch.Kernel takes its direct path for it."""

    is_cuda = True


class Compiled:
    """What Triton's launch returns: a CompiledKernel, with its launcher (`run`), handle and packed metadata."""

    function, packed_metadata = 7, ("meta",)

    def __init__(self, log):
        self.log = log
        self.run = lambda *a: log.append(("run", a))

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("getitem", grid, args))


class Jit:
    """A @triton.jit function: fn[grid](*args, **kw) compiles (once per signature here) and launches."""

    arg_names = ["x_ptr", "n", "BLOCK"]
    params = ()

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch_(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return Compiled(self.log)
        return launch_


@pytest.fixture
def gpu_like(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(patches, "cuda_stream_reader", lambda: (lambda device: 1234))
    monkeypatch.setattr(launch, "_hooks_idle", lambda: True)
    return torch.zeros(64).as_subclass(CudaLike)


def test_a_relaunch_calls_the_compiled_launcher_as_triton_does(gpu_like):
    """The first launch of a signature goes through Triton; the next ones call the compiled kernel's launcher with
    Triton's own argument order: grid (three dimensions), stream, handle, packed metadata, no launch metadata or
    hooks, then every argument and the constexprs in parameter order."""
    fn = Jit()
    k = launch.Kernel(fn)
    k((4,), gpu_like, 64, BLOCK=128)
    k((4,), gpu_like, 64, BLOCK=128)
    assert [e[0] for e in fn.log] == ["triton", "run"] and k.relaunches == k.direct == 1
    args = fn.log[1][1]
    assert args[:9] == (4, 1, 1, 1234, 7, ("meta",), None, None, None)
    assert args[9] is gpu_like and args[10:] == (64, 128)


def test_a_registered_hook_or_an_old_triton_keeps_the_compiled_kernels_own_launch(gpu_like, monkeypatch):
    fn = Jit()
    k = launch.Kernel(fn)
    k((4, 2), gpu_like, 64, BLOCK=128)
    monkeypatch.setattr(launch, "_hooks_idle", lambda: False)  # a profiler's launch hook: Triton must call it
    k((4, 2), gpu_like, 64, BLOCK=128)
    monkeypatch.setattr(launch, "_hooks_idle", lambda: True)
    monkeypatch.setattr(patches, "_triton_launch_ok", lambda: False)  # a Triton whose launch call differs
    k2 = launch.Kernel(fn)
    k2((4,), gpu_like, 64, BLOCK=128)
    k2((4,), gpu_like, 64, BLOCK=128)
    assert [e[0] for e in fn.log] == ["triton", "getitem", "triton", "getitem"] and k.direct == k2.direct == 0
    assert fn.log[1][1] == (4, 2, 1) and fn.log[3][2][1:] == (64, 128)


def test_a_left_out_constexpr_goes_through_triton_every_time(gpu_like):
    """BLOCK not passed (a defaulted constexpr): only Triton's binding knows its value, so no relaunch, and the
    signature is remembered as Triton's (no second look at the kernel's names)."""
    fn = Jit()
    k = launch.Kernel(fn)
    for _ in range(3):
        k((4,), gpu_like, 64)
    assert [e[0] for e in fn.log] == ["triton"] * 3 and k.relaunches == 0
    assert list(k.compiled.values()) == [launch.TRITONS]


def test_keyword_constexprs_in_any_order_reach_the_launcher_in_parameter_order(gpu_like):
    fn = Jit()
    fn.arg_names = ["x_ptr", "n", "BLOCK", "MODE"]
    k = launch.Kernel(fn)
    k((4,), gpu_like, 64, MODE=3, BLOCK=128)
    k((4,), gpu_like, 64, MODE=3, BLOCK=128)
    assert fn.log[1][1][10:] == (64, 128, 3)


def test_signatures_differ_where_triton_specializes(gpu_like):
    """A new compiled kernel for each change Triton specializes on: dtype, 16-byte alignment, an int equal to 1 or
    divisible by 16 (also for an int subclass), a keyword constexpr; the same key for the same specialization."""
    import enum

    class Size(enum.IntEnum):
        ONE = 1
        TWO = 2

    k = launch.Kernel(Jit())
    base = k.key((gpu_like, 64), {"BLOCK": 128}, 0)
    assert k.key((gpu_like, 48), {"BLOCK": 128}, 0) == base  # both divisible by 16, neither 1
    others = [k.key((gpu_like.half(), 64), {"BLOCK": 128}, 0), k.key((gpu_like[1:], 64), {"BLOCK": 128}, 0),
              k.key((gpu_like, 1), {"BLOCK": 128}, 0), k.key((gpu_like, 65), {"BLOCK": 128}, 0),
              k.key((gpu_like, 64), {"BLOCK": 64}, 0), k.key((gpu_like, 64), {"BLOCK": 128}, 1)]
    assert len({base, *others}) == len(others) + 1
    for member in Size:  # an int subclass is specialized as its value
        assert k.key((gpu_like, member), {"BLOCK": 128}, 0) == k.key((gpu_like, int(member)), {"BLOCK": 128}, 0)
    assert k.key((gpu_like, True), {"BLOCK": 128}, 0) != k.key((gpu_like, 1), {"BLOCK": 128}, 0)


def test_launch_hooks_are_read_from_tritons_knobs():
    """_hooks_idle asks Triton's runtime knobs at each launch: an added hook sends launches back to Triton's
    launcher."""
    knobs = pytest.importorskip("triton.knobs")
    assert launch._hooks_idle()
    hook = lambda *a: None  # noqa: E731
    knobs.runtime.launch_enter_hook.add(hook)
    try:
        assert not launch._hooks_idle()
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert launch._hooks_idle()
