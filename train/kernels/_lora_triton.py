"""Triton kernels behind train/kernels/lora_kernels.py (which documents them); imported only where Triton is.

Every kernel decides "keep element (row, col)" with the same _keep, so one (seed, threshold) names one
mask everywhere. `seed` is already mixed on the host (lora_kernels.mix); `threshold` is p * 2**24.
"""

import triton
import triton.language as tl


@triton.jit
def _keep(seed, rows, cols, n, threshold):
    # lowbias32 (C. Wellons' integer hash: two multiply-xorshift rounds) of the element index, with the seed
    # mixed in between the rounds (so two seeds' masks are not permutations of each other): each element
    # gets 24 well-mixed bits for a few integer ops. Triton's tl.rand (Philox, 10 rounds per element)
    # made the forward kernel compute-bound: 114 ms per step against 30 ms for torch's dropout
    x = (rows[:, None] * n + cols[None, :]).to(tl.uint32)
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x ^= seed.to(tl.uint32)
    x *= 0x846CA68B
    x ^= x >> 16
    return (x >> 8).to(tl.int32) >= threshold


@triton.jit
def _dropped(x_ptr, rows, cols, m, n, seed, threshold):
    # the (rows x cols) tile of x with dropped elements zeroed (and ragged edges read as zero)
    ok = (rows[:, None] < m) & (cols[None, :] < n)
    x = tl.load(x_ptr + rows[:, None] * n + cols[None, :], mask=ok, other=0.0)
    return tl.where(_keep(seed, rows, cols, n, threshold), x, 0.0)


@triton.jit
def _member_seed(member, seed0, seed1, seed2):
    # the mixed seed of group member `member` (0, 1 or 2): siblings reading one input draw independent masks
    return tl.where(member == 0, seed0, tl.where(member == 1, seed1, seed2))


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def a_fwd(x_ptr, a_ptr, part_ptr, m, n, chunk, seed0, seed1, seed2, threshold, scale,
          R: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # program (i, s, j): rows i*BM.., columns s*chunk..(s+1)*chunk of member j (rows j*R.. of the stacked A);
    # partial sums of dropout_j(x) @ A_j.T into columns j*R.. of the (tokens, K*R) partials
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    split = tl.program_id(1)
    member = tl.program_id(2)
    seed = _member_seed(member, seed0, seed1, seed2)
    ranks = tl.arange(0, R)
    a_ptr += member * R * n
    acc = tl.zeros((BM, R), dtype=tl.float32)
    start = split * chunk
    for k0 in range(start, tl.minimum(start + chunk, n), BK):
        cols = k0 + tl.arange(0, BK)
        x = _dropped(x_ptr, rows, cols, m, n, seed, threshold)
        a = tl.load(a_ptr + ranks[None, :] * n + cols[:, None], mask=cols[:, None] < n, other=0.0)
        acc += tl.dot(x, a)
    out = part_ptr + split * m * (K * R) + rows[:, None] * (K * R) + member * R + ranks[None, :]
    tl.store(out, acc * scale, mask=rows[:, None] < m)


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def a_grad(x_ptr, gh_ptr, part_ptr, m, n, rows_per, seed0, seed1, seed2, threshold, scale,
           R: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # program (j, s, i): columns j*BK.., rows s*rows_per.. of member i; partial sums of gh_i.T @ dropout_i(x)
    # (gh is (tokens, K*R): member i's columns i*R..) into rows i*R.. of the (K*R, n) partials
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    member = tl.program_id(2)
    seed = _member_seed(member, seed0, seed1, seed2)
    ranks = tl.arange(0, R)
    acc = tl.zeros((R, BK), dtype=tl.float32)
    start = split * rows_per
    for r0 in range(start, tl.minimum(start + rows_per, m), BM):
        rows = r0 + tl.arange(0, BM)
        x = _dropped(x_ptr, rows, cols, m, n, seed, threshold)
        gt = tl.load(gh_ptr + rows[None, :] * (K * R) + member * R + ranks[:, None], mask=rows[None, :] < m, other=0.0)
        acc += tl.dot(gt, x)
    out = part_ptr + split * (K * R) * n + (member * R + ranks[:, None]) * n + cols[None, :]
    tl.store(out, acc * scale, mask=cols[None, :] < n)


@triton.jit(do_not_specialize=["seed0", "seed1", "seed2"])
def x_grad(gx_ptr, gh_ptr, a_ptr, m, n, seed0, seed1, seed2, threshold, scale,
           R: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    # grad_x[tile] += sum over the K members of dropout_j-masked (gh_j @ A_j)[tile] * scale, read and written once
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, R)
    t = tl.zeros((BM, BK), dtype=tl.float32)
    for j in tl.static_range(K):
        gh = tl.load(gh_ptr + rows[:, None] * (K * R) + j * R + ranks[None, :], mask=rows[:, None] < m, other=0.0)
        a = tl.load(a_ptr + (j * R + ranks[:, None]) * n + cols[None, :], mask=cols[None, :] < n, other=0.0)
        keep = _keep(_member_seed(j, seed0, seed1, seed2), rows, cols, n, threshold)
        t += tl.where(keep, tl.dot(gh, a), 0.0)
    ok = (rows[:, None] < m) & (cols[None, :] < n)
    ptrs = gx_ptr + rows[:, None] * n + cols[None, :]
    g = tl.load(ptrs, mask=ok, other=0.0)
    tl.store(ptrs, (g.to(tl.float32) + t * scale).to(gx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def mask(out_ptr, m, n, seed, threshold, BM: tl.constexpr, BK: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ok = (rows[:, None] < m) & (cols[None, :] < n)
    keep = _keep(seed, rows, cols, n, threshold)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], keep.to(tl.int8), mask=ok)


@triton.jit
def split_sum(part_ptr, out_ptr, n, split, BLOCK: tl.constexpr):
    # out[i] = part[0, i] + part[1, i] + ... + part[split - 1, i], added in that order in fp32 and stored in out's
    # dtype: the reduction of a_fwd's and a_grad's partial sums and the cast to the caller's dtype in one launch
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(split):
        acc += tl.load(part_ptr + s * n + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)
