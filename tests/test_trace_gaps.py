"""scripts/trace_gaps.py: GPU idle between kernels is found and charged to the CPU op that launched the kernel after
each gap; the bench's trace writer produces what it reads."""

import gzip
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import trace_gaps  # noqa: E402
from bench_measure import write_trace  # noqa: E402


def _x(name, cat, ts, dur, tid=1, corr=None):
    e = {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "pid": 0}
    if corr is not None:
        e["args"] = {"correlation": corr}
    return e


def test_idle_is_charged_to_the_op_that_launched_the_late_kernel(tmp_path, capsys):
    events = [  # kernel A runs 0-100 us; the host launches B from inside aten::mm at 350 us; B runs 400-500 us
        _x("fwd", "cpu_op", 0, 600), _x("aten::add", "cpu_op", 5, 20), _x("cudaLaunchKernel", "cuda_runtime", 10, 5, corr=1),
        _x("aten::mm", "cpu_op", 300, 80), _x("cudaLaunchKernel", "cuda_runtime", 350, 5, corr=2),
        _x("kernelA", "kernel", 0, 100, tid=7, corr=1), _x("kernelB", "kernel", 400, 100, tid=7, corr=2),
        _x("Memcpy DtoH", "gpu_memcpy", 120, 50, tid=9)]
    path = tmp_path / "t.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    trace_gaps.report(str(path))
    out = capsys.readouterr().out
    assert "compute stream idle between kernels: 0.3 ms (1 gaps" in out
    assert "GPU busy (union of streams): 0.2 ms" in out  # 100 + 100 us of kernels, 50 us of copy: 0.25
    charged = out.split("idle charged")[1]
    assert "aten::mm" in charged.splitlines()[1] and "0.3" in charged.splitlines()[1]
    launches = out.split("GPU launches")[1].splitlines()
    assert launches[0].startswith(" (kernels, memsets, copies): 3;")
    rows = {name: [n, ms] for name, n, ms in (line.strip().rsplit(None, 2) for line in launches[1:])}
    assert rows == {"fwd > aten::add": ["1", "0.1"], "fwd > aten::mm": ["1", "0.1"], "(top level)": ["1", "0.1"]}


def test_launch_owner_names_the_function_and_the_aten_op_inside_it():
    chain = ["autograd::engine::evaluate_function: CheckpointFunctionBackward", "CheckpointFunctionBackward",
             "autograd::engine::evaluate_function: _QLoraGroupBackward", "_QLoraGroupBackward", "aten::addmm",
             "aten::addmm"]
    assert trace_gaps.launch_owner(chain) == "_QLoraGroupBackward > aten::addmm"
    assert trace_gaps.launch_owner(["CheckpointFunction", "_QLoraGroup"]) == "_QLoraGroup"  # a Triton launch
    assert trace_gaps.launch_owner(["aten::copy_"]) == "(top level) > aten::copy_"
    assert trace_gaps.launch_owner([]) == "(top level)"


def test_union_merges_overlaps():
    assert trace_gaps.union_us([(0, 10), (5, 20), (30, 40)]) == 30


def test_bench_trace_writer_output_reads_back(tmp_path, capsys):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.randn(64, 64) @ torch.randn(64, 64)
    write_trace(prof, str(tmp_path / "trace-c.json"))
    assert not (tmp_path / "trace-c.json").exists()  # only the gzipped copy stays
    events = trace_gaps.load(str(tmp_path / "trace-c.json.gz"))
    assert any(e["name"] == "aten::mm" for e in events)
    trace_gaps.report(str(tmp_path / "trace-c.json.gz"))
    assert "no GPU kernels" in capsys.readouterr().out


def test_kernel_families_of_a_real_step():
    """Kernel names from an H100 profile of the default workload (session 6) land in issue #21's families."""
    from bench_measure import kernel_group

    expect = {
        "nvjet_sm90_tst_256x160_64x4_2x1_v_bz_coopA_TNT": "matmul",
        "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float>": "matmul",
        "dequant": "NF4 dequant", "a_fwd": "LoRA dropout", "a_grad": "LoRA dropout", "x_grad": "LoRA dropout",
        "void at::native::(anonymous namespace)::fused_dropout_kernel_vec<c10::BFloat16, float>": "LoRA dropout",
        "void at::native::unrolled_elementwise_kernel<at::native::addcmul_cuda_kernel(at::TensorIteratorBase&)": "LoRA dropout",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false>>": "attention",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0": "attention",
        "_rms_norm_forward_kernel": "norm/rope/swiglu (Liger)", "_triton_rope": "norm/rope/swiglu (Liger)",
        "_swiglu_backward_kernel": "norm/rope/swiglu (Liger)",
        "void kOptimizer32bit2State<__nv_bfloat16, 0>(__nv_bfloat16*, float*)": "optimizer + grad norm",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor>": "optimizer + grad norm",
        "void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>": "elementwise/reduce/copy",
        "_forward_kernel": "loss and other Triton",
    }
    assert {name: kernel_group(name) for name in expect} == expect


def test_gpu_idle_is_the_span_minus_busy_time():
    from types import SimpleNamespace as NS

    from bench_measure import gpu_idle_ms

    def evt(start, end, device):
        return NS(time_range=NS(start=start, end=end), device_type=f"DeviceType.{device}")

    prof = NS(events=lambda: [evt(0, 10_000, "CPU"), evt(1_000, 3_000, "CUDA"), evt(2_000, 4_000, "CUDA"),
                              evt(8_000, 9_000, "CUDA")])
    assert gpu_idle_ms(prof) == 6.0  # 10 ms span, kernels busy 1-4 and 8-9 ms
    assert gpu_idle_ms(NS(events=lambda: [evt(0, 5, "CPU")])) is None


def test_self_time_subtracts_nested_ops_per_thread():
    events = [_x("outer", "cpu_op", 0, 100), _x("aten::mm", "cpu_op", 10, 30), _x("aten::view", "cpu_op", 15, 5),
              _x("aten::view", "cpu_op", 60, 10), _x("other-thread", "cpu_op", 0, 50, tid=2),
              _x("cudaLaunchKernel", "cuda_runtime", 20, 5)]  # runtime calls are not CPU ops
    tables = trace_gaps.self_times(events)
    assert tables[1] == {"outer": [1, 60.0], "aten::mm": [1, 25.0], "aten::view": [2, 15.0]}
    assert tables[2] == {"other-thread": [1, 50.0]}
