"""Triton kernel behind train/kernels/nf4.py (which documents it); imported only where Triton is."""

import triton
import triton.language as tl


@triton.jit
def dequant(packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, table_ptr, out_ptr, n_bytes,
            BYTES: tl.constexpr, BLOCK: tl.constexpr, BLOCK2: tl.constexpr, NESTED: tl.constexpr):
    # program i: packed bytes i*BYTES..; each byte holds two weights, the first in the high nibble (bitsandbytes'
    # layout). A weight's scale is absmax[k // BLOCK]; nested (double quant): code2[absmax[b]] * absmax2[b // BLOCK2]
    # + offset, two fp32 roundings as bitsandbytes does them (the launch turns fp contraction off)
    idx = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    ok = idx < n_bytes
    byte = tl.load(packed_ptr + idx, mask=ok, other=0).to(tl.int32)
    blk = (idx * 2) // BLOCK
    if NESTED:
        q = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + blk // BLOCK2, mask=ok, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
    hi = tl.load(table_ptr + (byte >> 4)) * scale
    lo = tl.load(table_ptr + (byte & 15)) * scale
    pairs = tl.interleave(hi, lo).to(out_ptr.dtype.element_ty)
    outs = tl.program_id(0) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + outs, pairs, mask=outs < 2 * n_bytes)
