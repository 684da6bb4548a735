"""Host time of a GEMM whose row count (tokens) the process has not seen before, on the GPU (issue #21).

Why: session 12's trace of one 8B training step (H100) had five GEMM calls that held the host for 2.8-13 ms each
(~30 ms a step, ~5 % of it), with no CUDA call inside them: cuBLAS choosing a kernel for a shape it has not seen.
Packed batches give each step a new token count, so every step pays it again in the first layer of its forward
and of its backward. This prints, for the 8B's GEMM shapes, the host time of the first call with a new M against a
repeated M, under each BLAS backend torch offers; and whether rounding M up to a multiple of 64/128/256 makes later
steps hit (the rounded M repeats).

    python scripts/gemm_host.py [--rows 5000] [--new 12]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

# (name, K, N, op): x (M, K) @ (K, N), as train/kernels/fused_lora.py calls them on the 8B; "grad": x.T @ (M, N)
SHAPES = (
    ("q/o forward mm", 4096, 4096, "mm"),
    ("k/v forward mm", 4096, 1024, "mm"),
    ("gate/up forward mm", 4096, 14336, "mm"),
    ("down forward mm", 14336, 4096, "mm"),
    ("LoRA B addmm_ (r 16) onto q", 16, 4096, "addmm_"),
    ("LoRA B addmm_ (r 16) onto gate", 16, 14336, "addmm_"),
    ("LoRA B weight grad g.T @ h (the tokens are K)", 4096, 16, "grad"),
    ("LoRA A weight grad gh.T @ x (the tokens are K)", 48, 4096, "grad"),
)


def host_ms(op: str, m: int, k: int, n: int) -> float:
    """Host time of one call with M = m rows (the launch returns before the GPU ends; the GPU is drained first)."""
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16).t()  # a (out, in) weight, transposed as fused_lora does
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)  # mm's and addmm_'s output; "grad"'s right factor
    unused = out.new_empty(())
    grad = torch.empty(k, n, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    t0 = time.perf_counter()  # no allocation inside: a new M would mix a cudaMalloc into cuBLAS's choice
    if op == "mm":
        torch.mm(x, w, out=out)
    elif op == "addmm_":
        out.addmm_(x, w, alpha=0.5)
    else:  # a weight gradient as fused_lora's backward takes it: (K, M) @ (M, N), the tokens are the reduction
        torch.addmm(unused, x.t(), out, beta=0, alpha=0.5, out=grad)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3


def row(name, k, n, op, rows: int, new: int, step: int) -> list[str]:
    fresh = [host_ms(op, rows + 7 * i + 1000 * step, k, n) for i in range(new)]  # never seen
    again = [host_ms(op, rows + 7 * i + 1000 * step, k, n) for i in range(new)]  # the same M again
    return [name, f"{statistics.median(fresh):.2f}", f"{max(fresh):.2f}", f"{statistics.median(again):.3f}"]


def rounded(rows: int, new: int, multiple: int) -> str:
    """Steps whose token counts differ but round up to the same multiple: the share of them that run as fast as a
    repeated M (the first of each rounded value pays)."""
    k, n = 4096, 4096
    ms = [host_ms("mm", -(-(rows + 37 * i) // multiple) * multiple, k, n) for i in range(new * 3)]
    fast = sum(t < 0.5 for t in ms)
    return f"| {multiple} | {len({-(-(rows + 37 * i) // multiple) for i in range(new * 3)})} | {fast}/{len(ms)} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5000, help="smallest new M (tokens of a micro-batch; default 5000)")
    p.add_argument("--new", type=int, default=12, help="new M values per shape (default 12)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_host.py times cuBLAS: run it on a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"cuBLAS {torch.backends.cuda.preferred_blas_library()}")
    for step, backend in enumerate(("cublas", "cublaslt")):
        torch.backends.cuda.preferred_blas_library(backend)
        for op in ("mm", "addmm_", "grad"):  # the backend's handle and workspace, before the first timed call
            host_ms(op, 64, 64, 64)
        print(f"\n**{backend}**\n\n| shape | new M: median ms | max ms | repeated M: median ms |\n|---|---:|---:|---:|")
        for name, k, n, op in SHAPES:
            print("| " + " | ".join(row(name, k, n, op, args.rows, args.new, 10 * step + SHAPES.index((name, k, n, op))))
                  + " |")
    torch.backends.cuda.preferred_blas_library("cublas")
    print("\n**M rounded up** (q's mm; calls under 0.5 ms count as cached)\n\n| multiple | rounded values | fast calls |"
          "\n|---:|---:|---:|")
    for multiple in (64, 128, 256):  # token counts no earlier call used (rows 20,000 on)
        print(rounded(args.rows + 15_000 + 40 * multiple, args.new, multiple))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
