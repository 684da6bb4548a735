"""Owns NF4 dequantization on the GPU in one kernel: a 4-bit weight (double quant included) to a dense matrix.

Why our own kernel: bitsandbytes' dequantize_4bit runs, for a double-quantized weight, three kernels behind two
Python-registered torch ops and ctypes calls (the 8-bit absmax, `absmax += offset`, then the 4-bit weight). The
fused QLoRA layer (train/kernels/fused_lora.py) dequantizes every base weight three times a step (forward,
recompute, backward): 672 times on an 8B, each paying that host work on a path whose GPU waits for the host
(docs/benchmarks.md). Here one Triton kernel reads the packed bytes and the nested scales and writes the weight,
with bitsandbytes' arithmetic (fp32 products, the offset added after rounding, one rounding to the output
dtype): bit-identical to its output (tests/test_nf4.py on CPU through Triton's interpreter, tests/test_gpu.py
on the GPU). Anything it does not cover (FP4, other block sizes, CPU tensors) goes to bitsandbytes.
"""

from __future__ import annotations

import functools
import math

import torch

from train.kernels import launch, lora_kernels

BYTES = 1024  # packed bytes per program: 2,048 weights, 32 scale blocks of 64

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def usable(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> bool:
    """The kernel handles this weight now: `covers` it, and a CUDA weight is on the current device (Triton launches
    there; a weight on another GPU of this process goes to bitsandbytes)."""
    return _launchable(weight) and covers(weight, quant_state, dtype)


def _launchable(weight: torch.Tensor) -> bool:
    """Not a CUDA tensor on another GPU than the current one (where Triton would launch)."""
    return not weight.is_cuda or lora_kernels.on_current_gpu(weight)


def covers(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> bool:
    """The kernel computes this weight: NF4 in bytes on a CUDA device (or Triton's CPU interpreter, for tests), in
    bitsandbytes' (n/2, 1) packed layout, blocks of 64 (nested scales in blocks of 256), an output dtype it writes."""
    qs = quant_state
    # Triton's CPU interpreter (tests) only for fp16: it has no bf16, and the CPU suite's fp32 fits stay on
    # bitsandbytes' CPU kernel instead of the interpreter's slow numpy
    here = weight.is_cuda or (lora_kernels.interpreting() and dtype == torch.float16)
    nested_ok = not qs.nested or (qs.state2.blocksize == 256 and qs.state2.absmax.dtype == torch.float32)
    return (lora_kernels.triton_module() is not None and here and qs.quant_type == "nf4" and qs.blocksize == 64
            and weight.dtype == torch.uint8 and dtype in _DTYPES and nested_ok
            and weight.shape[0] != 1  # (1, n/2) is bitsandbytes' old transposed layout: it returns that one transposed
            and weight.numel() * 2 == math.prod(qs.shape) and weight.numel() < 2**30)


def dequantize(weight: torch.Tensor, quant_state, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense (out, in) weight in `dtype`, as bitsandbytes' dequantize_4bit(weight, quant_state).to(dtype) gives
    it when quant_state.dtype is `dtype` (the fused layer's case: compute dtype = storage dtype); None where the
    kernel does not apply (`usable`). What a launch needs is worked out once per weight and kept on its
    quant_state (a frozen base never changes; a moved weight or state has other data pointers and gets it anew):
    the fast path waits for the host, so a call is one allocation and one launch."""
    qs = quant_state
    # bitsandbytes' Params4bit routes every tensor attribute and method (data_ptr, is_cuda, device, dtype, and the
    # launcher's own data_ptr) through a Python __torch_function__: ~1-5 us each, ~9 a call. Its .data is a plain
    # tensor of the same packed bytes: one such call, then plain attributes
    weight = weight.data
    key = (weight.data_ptr(), qs.absmax.data_ptr(), dtype)  # a moved weight or quant_state: worked out anew
    cached = getattr(qs, "_train_nf4", None)
    if cached is None or cached[0] != key:
        cached = qs._train_nf4 = (key, _launch_args(weight, qs) if covers(weight, qs, dtype) else None)
    args = cached[1]
    if args is None or not _launchable(weight):
        return None
    out = torch.empty(qs.shape, dtype=dtype, device=weight.device)
    grid, consts = args[-2:]
    _kernel()(grid, weight, *args[:-2], out, weight.numel(), **consts)
    return out


def _launch_args(weight: torch.Tensor, qs) -> tuple:
    """(absmax, code2, absmax2, offset, table, grid, constexprs) for the kernel."""
    if qs.nested:
        absmax, code2, absmax2, offset = qs.absmax, qs.state2.code, qs.state2.absmax, _offset(qs)
    else:
        absmax = qs.absmax.float()
        code2 = absmax2 = offset = absmax  # unread (NESTED is off); any pointer of the right device
    consts = dict(BYTES=BYTES, BLOCK=qs.blocksize, BLOCK2=qs.state2.blocksize if qs.nested else 1, NESTED=qs.nested,
                  num_warps=4, enable_fp_fusion=False)
    return absmax, code2, absmax2, offset, _table(qs.code, weight.device), (-(-weight.numel() // BYTES),), consts


def _offset(qs) -> torch.Tensor:
    """The nested offset as a one-element fp32 tensor on the weight's device (bitsandbytes keeps a 0-d tensor)."""
    off = qs.offset
    if not isinstance(off, torch.Tensor):
        off = torch.tensor(float(off))
    return off.to(device=qs.absmax.device, dtype=torch.float32).reshape(1)


@functools.lru_cache(maxsize=8)
def _table_cached(values: tuple, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _table(code: torch.Tensor, device) -> torch.Tensor:
    """The 16 NF4 values as fp32 on `device`: bitsandbytes' own quant_state.code when it is there already."""
    if code.device == device and code.dtype == torch.float32 and code.numel() == 16:
        return code
    return _table_cached(tuple(code.float().cpu().tolist()), str(device))


@functools.cache
def _kernel():
    import importlib

    return launch.Kernel(importlib.import_module("train.kernels._nf4_triton").dequant)
