"""Triton kernels behind train/lora_kernels.py (which documents them); imported only where Triton is."""

import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, cols, n, p):
    return tl.rand(seed, rows[:, None] * n + cols[None, :]) >= p


@triton.jit
def a_fwd(x_ptr, a_ptr, h_ptr, m, n, seed, p, scale, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, R)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for k0 in range(0, n, BK):
        cols = k0 + tl.arange(0, BK)
        ok = (rows[:, None] < m) & (cols[None, :] < n)
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        x = tl.where(_keep(seed, rows, cols, n, p), x, 0.0)
        a = tl.load(a_ptr + ranks[None, :] * n + cols[:, None], mask=cols[:, None] < n, other=0.0)
        acc += tl.dot(x, a)
    tl.store(h_ptr + rows[:, None] * R + ranks[None, :], (acc * scale).to(h_ptr.dtype.element_ty),
             mask=rows[:, None] < m)


@triton.jit
def a_grad(x_ptr, gh_ptr, part_ptr, m, n, rows_per, seed, p, scale,
           R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    start = split * rows_per
    for r0 in range(start, tl.minimum(start + rows_per, m), BM):
        rows = r0 + tl.arange(0, BM)
        ok = (rows[:, None] < m) & (cols[None, :] < n)
        x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
        x = tl.where(_keep(seed, rows, cols, n, p), x, 0.0)
        gt = tl.load(gh_ptr + rows[None, :] * R + ranks[:, None], mask=rows[None, :] < m, other=0.0)
        acc += tl.dot(gt, x)
    tl.store(part_ptr + split * R * n + ranks[:, None] * n + cols[None, :], acc * scale,
             mask=cols[None, :] < n)


@triton.jit
def x_grad(gx_ptr, gh_ptr, a_ptr, m, n, seed, p, scale, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, R)
    gh = tl.load(gh_ptr + rows[:, None] * R + ranks[None, :], mask=rows[:, None] < m, other=0.0)
    a = tl.load(a_ptr + ranks[:, None] * n + cols[None, :], mask=cols[None, :] < n, other=0.0)
    t = tl.dot(gh, a) * scale
    t = tl.where(_keep(seed, rows, cols, n, p), t, 0.0)
    ok = (rows[:, None] < m) & (cols[None, :] < n)
    ptrs = gx_ptr + rows[:, None] * n + cols[None, :]
    g = tl.load(ptrs, mask=ok, other=0.0)
    tl.store(ptrs, (g.to(tl.float32) + t).to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def mask(out_ptr, m, n, seed, p, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rows[:, None] < m) & (cols[None, :] < n)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], _keep(seed, rows, cols, n, p).to(tl.int8), mask=ok)
