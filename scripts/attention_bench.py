#!/usr/bin/env python3
"""Attention kernels for one long causal row, timed on a GPU: the varlen kernel our padding-free path calls
(train/kernels/attention.py) against sdpa's backends (flash, cuDNN, memory-efficient) and, where torch can
activate them, FlashAttention 3/4. Issue #21: at 131,072 tokens Unsloth's step (sdpa) took 52.5 s against
our 83.5 s, and attention is most of a step that long.

    python scripts/attention_bench.py [--tokens 16384,131072] [--heads 32 --kv-heads 8 --head-dim 128]

Prints, per kernel and length: forward ms, forward + backward ms, TFLOP/s (causal: 2 * T^2 * heads * head_dim
forward, 2.5x that backward), peak extra GB of one forward + backward, and the largest output and gradient gap
against the first kernel that ran (bf16). The q/k/v layouts are the ones each caller passes: (1, heads, T, d)
for sdpa, transposed views (T, heads, d) for varlen, as attention.py does.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

WARMUP, REPEATS = 1, 3  # long rows: one untimed call (kernel selection, autotune), the best of three timed


def flops(tokens: int, heads: int, head_dim: int) -> float:
    """Causal attention, forward + backward: 2 matmuls of 2 * T^2 * h * d / 2 forward, 2.5x that backward."""
    return 3.5 * 2 * tokens * tokens * heads * head_dim


def inputs(tokens: int, heads: int, kv_heads: int, head_dim: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = lambda h: (1, h, tokens, head_dim)  # noqa: E731  transformers' (batch, heads, tokens, head_dim)
    q, k, v = (torch.randn(shape(h), generator=g, device="cuda", dtype=torch.bfloat16)
               for h in (heads, kv_heads, kv_heads))
    grad = torch.randn(shape(heads), generator=g, device="cuda", dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (q, k, v)], grad


def varlen(q, k, v):
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    # as train/kernels/attention.py: torch 2.11's varlen_attn has no enable_gqa and takes fewer k/v heads natively
    gqa = {"enable_gqa": True} if "enable_gqa" in inspect.signature(varlen_attn).parameters else {}

    tokens = q.shape[2]
    cu = torch.tensor([0, tokens], device="cuda", dtype=torch.int32)
    qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))
    return varlen_attn(qt, kt, vt, cu, cu, tokens, tokens, window_size=(-1, 0), **gqa)[None].transpose(1, 2)


def sdpa_with(backend, expand: bool = False):
    """sdpa on one backend; expand=True repeats k/v to every query head (transformers' repeat_kv), for backends
    that refuse enable_gqa."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        if expand:
            k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=not expand)
    return run


def kernels() -> dict:
    from torch.nn.attention import SDPBackend

    found = {"varlen (ours)": varlen}
    for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        found[name] = sdpa_with(backend)
        found[f"{name}, k/v expanded"] = sdpa_with(backend, expand=True)
    return found


def time_one(fn, q, k, v, grad) -> dict:
    for t in (q, k, v):
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    best_f = best_fb = float("inf")
    for i in range(WARMUP + REPEATS):
        start = time.perf_counter()
        out = fn(q, k, v)
        torch.cuda.synchronize()
        mid = time.perf_counter()
        out.backward(grad)
        torch.cuda.synchronize()
        end = time.perf_counter()
        if i >= WARMUP:
            best_f, best_fb = min(best_f, mid - start), min(best_fb, end - start)
        if i < WARMUP + REPEATS - 1:
            for t in (q, k, v):
                t.grad = None
    peak = (torch.cuda.max_memory_allocated() - base) / 1e9
    return {"fwd_ms": best_f * 1e3, "fwd_bwd_ms": best_fb * 1e3, "peak_extra_gb": peak, "out": out.detach(),
            "grads": [t.grad.detach().clone() for t in (q, k, v)]}


def bench(tokens: int, heads: int, kv_heads: int, head_dim: int, impls: list[str]) -> list[str]:
    rows, ref = [], None
    (q, k, v), grad = inputs(tokens, heads, kv_heads, head_dim)
    runs = dict(kernels())
    for impl in impls:  # FlashAttention 3/4 replace sdpa flash's kernel while active
        runs[f"sdpa flash {impl}"] = ("impl", impl)
    for name, fn in runs.items():
        try:
            if isinstance(fn, tuple):
                torch.nn.attention.activate_flash_attention_impl(fn[1])
                try:
                    r = time_one(sdpa_with(torch.nn.attention.SDPBackend.FLASH_ATTENTION), q, k, v, grad)
                finally:
                    getattr(torch.nn.attention, "restore_flash_attention_impl", lambda: None)()
            else:
                r = time_one(fn, q, k, v, grad)
        except (RuntimeError, ValueError, ImportError, NotImplementedError, AttributeError) as e:
            rows.append(f"| {tokens:,} | {name} | not run: {str(e).splitlines()[0][:90]} | | | | |")
            continue
        ref = ref or r
        gap = max([(r["out"].float() - ref["out"].float()).abs().max().item()]
                  + [(a.float() - b.float()).abs().max().item() for a, b in zip(r["grads"], ref["grads"])])
        tflops = flops(tokens, heads, head_dim) / (r["fwd_bwd_ms"] / 1e3) / 1e12
        rows.append(f"| {tokens:,} | {name} | {r['fwd_ms']:.1f} | {r['fwd_bwd_ms']:.1f} | {tflops:.0f} | "
                    f"{r['peak_extra_gb']:.2f} | {gap:.3g} |")
        del r
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="16384,131072", help="comma-separated row lengths")
    p.add_argument("--heads", type=int, default=32, help="query heads (default: Llama-3.1-8B's 32)")
    p.add_argument("--kv-heads", type=int, default=8, help="key/value heads (default: Llama-3.1-8B's 8)")
    p.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: attention_bench.py times CUDA kernels; no CUDA GPU is visible to torch")
    impls = [i for i in getattr(torch.nn.attention, "list_flash_attention_impls", lambda: [])()]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"flash impls torch lists: {impls or 'none'}")
    print("| tokens | kernel | fwd ms | fwd+bwd ms | TFLOP/s | peak extra GB | max gap vs first |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        for row in bench(tokens, args.heads, args.kv_heads, args.head_dim, impls):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
