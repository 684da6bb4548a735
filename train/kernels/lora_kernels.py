"""Triton kernels for LoRA's dropout on GPU: the mask is never stored nor written out.

Why our own kernels: with dropout, a LoRA layer's low-rank path makes several full passes over its
input x per step (torch: write dropout(x) and its mask, read them back for lora_A; in the backward
replay both, then mask and add the input gradient in two more elementwise kernels). On the 8B
benchmark these passes were ~70 ms of ~440 ms of GPU time per step. Here the mask is a pure function
of (seed, element index) computed inside each kernel (an integer hash, see train/kernels/_lora_triton.py), so:

    lora_a_forward   h      = (x * m) @ A.T / (1 - p)            one read of x
    lora_a_grad      grad_A = gh.T @ (x * m) / (1 - p)           one read of x
    lora_x_grad      grad_x += ((gh @ A) * m) / (1 - p)          one read and write of grad_x

Each kernel also takes a group of up to MAX_MEMBERS layers reading the same x (q/k/v, gate/up:
train/kernels/lora_group.py) in one launch: A stacked as (members*r, in), h and gh side by side as (tokens, members*r),
member j masked with its own seed (member_seed). lora_x_grad then adds every member's term in one pass over grad_x.

The same seed gives the same mask in the forward, the checkpointed recompute and the backward. Dropout
keeps each element with probability 1 - p, independently per layer and call (a fresh seed each call,
drawn from torch's CPU generator, which checkpointing and resume already save and restore). The
masks are not the ones torch.nn.Dropout would draw: the same distribution, different random numbers.
"""

from __future__ import annotations

import functools

import torch

from train.kernels import launch

RANKS = (16, 32, 64, 128)  # tl.dot needs dimensions >= 16; other ranks take the torch path
CHUNK = 1024  # input columns per forward program: 4-14 programs per 64 rows on Llama-8B shapes (a multiple of BK)


def usable(x: torch.Tensor, a: torch.Tensor) -> bool:
    """The kernels handle this call: CUDA (or Triton's CPU interpreter), 16-bit inputs, a supported rank,
    and element indices that fit the mask hash's 32-bit input."""
    interpretable = interpreting() and x.dtype == torch.float16  # the CPU interpreter has no bf16
    return (triton_module() is not None and (on_current_gpu(x) or interpretable)
            and x.dtype in (torch.bfloat16, torch.float16) and a.shape[0] in RANKS and x.numel() < 2**31)


def on_current_gpu(t: torch.Tensor) -> bool:
    """`t` is on the current CUDA device: Triton launches there, so a tensor on another GPU of this process must take
    the torch (or bitsandbytes) path."""
    return t.is_cuda and t.device.index == torch.cuda.current_device()


def new_seed() -> int:
    """A fresh dropout seed from torch's CPU generator: no device sync, and reproduced by checkpointing
    (which restores the CPU RNG state before a recompute) and by a resumed run."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device="cpu"))  # never a default CUDA device


def mix(seed: int) -> int:
    """The seed as the kernels use it: hashed once on the host with lowbias32 (the kernels' hash), so that
    nearby seeds differ in many bits; kept below 2**31 to pass as an int32."""
    x = seed & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    x ^= x >> 16
    return x & 0x7FFFFFFF


def _threshold(p: float) -> int:
    return int(round(p * (1 << 24)))  # the kernels drop an element when its 24 hash bits fall below this


MAX_MEMBERS = 3  # layers of one group that share an input (q/k/v): the kernels take this many seeds
_GOLDEN = 0x9E3779B9  # member j draws seed + j * this (mod new_seed's range): member 0 keeps the seed itself


def member_seed(seed: int, j: int) -> int:
    """The seed of group member j when the group drew `seed` (keep_mask(shape, member_seed(seed, j), p) is its mask)."""
    return (seed + j * _GOLDEN) % (2**31 - 1)


def _seeds(seed: int, members: int) -> tuple[int, int, int]:
    """The kernels' three mixed seed arguments for a group of `members` layers (unused ones 0)."""
    assert 1 <= members <= MAX_MEMBERS, f"{members} layers in one group: the kernels take 1 to {MAX_MEMBERS}"
    mixed = [mix(member_seed(seed, j)) for j in range(members)]
    return (*mixed, *[0] * (MAX_MEMBERS - members))


def lora_a_forward(x2: torch.Tensor, a: torch.Tensor, seed: int, p: float, members: int = 1) -> torch.Tensor:
    """(tokens, in) x (members*r, in) -> (tokens, members*r): member j's columns are dropout_j(x) @ A_j.T, each
    member (a layer of a group that reads the same x) with its own mask. The in dimension is split into chunks of
    CHUNK columns, one program each, so that a few thousand tokens still fill the GPU; the partial sums
    (fp32, a few MB) are added in a fixed order: deterministic."""
    k = _kernels()
    x2, a = x2.contiguous(), a.contiguous()  # the kernels index rows with stride n_in
    m, n_in = x2.shape
    r = a.shape[0] // members
    split = triton_cdiv(n_in, CHUNK)
    part = torch.empty(split, m, members * r, device=x2.device, dtype=torch.float32)
    bk = 128 if r <= 32 else 64  # A's tile is BK x r: keep 3 pipeline stages under ~100 KB of shared memory
    k["a_fwd"]((triton_cdiv(m, 64), split, members), x2, a, part, m, n_in, CHUNK, *_seeds(seed, members),
               _threshold(p), 1 / (1 - p), R=r, K=members, BM=64, BK=bk, num_warps=4, num_stages=3)
    return split_sum(part, x2.dtype)


def lora_a_grad(x2: torch.Tensor, gh: torch.Tensor, seed: int, p: float, members: int = 1,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Member j's rows j*r.. are gh_j.T @ dropout_j(x), gh (tokens, members*r) holding gh_j in columns j*r..:
    (members*r, in), summed over tokens in fp32 in up to 16 deterministic partial sums, returned in `dtype` (the A
    weights', so that no cast per member follows)."""
    k = _kernels()
    x2, gh = x2.contiguous(), gh.contiguous()
    m, n_in = x2.shape
    r = gh.shape[1] // members
    split = max(1, min(16, triton_cdiv(m, 512)))
    part = torch.empty(split, members * r, n_in, device=x2.device, dtype=torch.float32)
    rows_per = triton_cdiv(triton_cdiv(m, split), 64) * 64
    grid = (triton_cdiv(n_in, 64), split, members)
    k["a_grad"](grid, x2, gh, part, m, n_in, rows_per, *_seeds(seed, members), _threshold(p), 1 / (1 - p),
                R=r, K=members, BM=64, BK=64, num_warps=4, num_stages=3)
    return split_sum(part, dtype)


SUM_BLOCK = 1024  # elements per split_sum program


def split_sum(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """part.sum(0) in `dtype`: the kernels' fp32 partial sums added in a fixed order and cast in one launch instead of
    torch's two (a sum, then a cast); ~480 launches a step on the 8B, on a backward that waits for the host
    (docs/benchmarks.md, session 14)."""
    out = torch.empty(part.shape[1:], device=part.device, dtype=dtype)
    n = out.numel()
    _kernels()["split_sum"]((triton_cdiv(n, SUM_BLOCK),), part, out, n, part.shape[0], BLOCK=SUM_BLOCK, num_warps=4)
    return out


def lora_x_grad_(grad_x: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, seed: int, p: float,
                 members: int = 1) -> torch.Tensor:
    """grad_x += sum over members j of (gh_j @ A_j) * mask_j / (1 - p), in place on the (tokens, in) grad_x."""
    k = _kernels()
    assert grad_x.is_contiguous(), "lora_x_grad_ writes grad_x in place"
    gh, a = gh.contiguous(), a.contiguous()
    m, n_in = grad_x.shape
    grid = (triton_cdiv(m, 64), triton_cdiv(n_in, 64))
    k["x_grad"](grid, grad_x, gh, a, m, n_in, *_seeds(seed, members), _threshold(p), 1 / (1 - p),
                R=a.shape[0] // members, K=members, BM=64, BK=64, num_warps=4)
    return grad_x


def keep_mask(shape: tuple[int, int], seed: int, p: float, device) -> torch.Tensor:
    """The mask the kernels apply for (seed, p), as a bool tensor: for tests and checks only."""
    m, n = shape
    out = torch.empty(m, n, device=device, dtype=torch.int8)
    _kernels()["mask"][(triton_cdiv(m, 64), triton_cdiv(n, 64))](out, m, n, mix(seed), _threshold(p), BM=64, BK=64)
    return out.bool()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def triton_module():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    return triton


def interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _kernels() -> dict:
    """The kernels, compiled on first use. They live in their own module because Triton resolves a kernel's
    globals from its module, and reads TRITON_INTERPRET (CPU tests) when the module is imported."""
    import importlib

    mod = importlib.import_module("train.kernels._lora_triton")
    return {"a_fwd": launch.Kernel(mod.a_fwd), "a_grad": launch.Kernel(mod.a_grad), "x_grad": launch.Kernel(mod.x_grad),
            "split_sum": launch.Kernel(mod.split_sum), "mask": mod.mask}
