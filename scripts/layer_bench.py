"""Host and GPU cost of one QLoRA layer of Llama-8B's shapes, per call: the NF4 dequantization alone (bitsandbytes'
against train/kernels/nf4.py) and the fused layer's forward + backward (lora.kernel fused, fused_triton, peft); and
the optimizer step over the 8B's 448 LoRA tensors (bitsandbytes' paged AdamW against train/optim.py's).

Why: on the default workload the GPU waits for the host for much of a step (docs/benchmarks.md, session 6), and
whole-run tok/s on a shared host varies by +-10 % between runs, too much to see a change of a few percent in the
per-layer host work. Here each variant runs in the same process, alternating, and prints the medians of
  host us/call  a small call (64 tokens): the GPU keeps up, so the wall time per call is the host's (min, median)
  GPU ms/call   a large call (8,192 tokens), timed by CUDA events
Usage (a CUDA machine): python scripts/layer_bench.py [--tokens 8192] [--rounds 5] [--optimizer-only]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {"q_proj 4096->4096": (4096, 4096), "k_proj 4096->1024": (4096, 1024), "down_proj 14336->4096": (14336, 4096)}


def layer(n_in: int, n_out: int, kernel: str, dropout: float = 0.05):
    """A LoRA layer (r=16, alpha=32) over an NF4 double-quant Linear4bit on the GPU, as train.lora builds it."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from train.kernels import fused_lora

    base = torch.nn.Sequential()
    base.add_module("lin", bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=torch.bfloat16,
                                             compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8))
    w = torch.randn(n_out, n_in) * 0.02
    base.lin.weight = bnb.nn.Params4bit(w.bfloat16(), requires_grad=False, quant_type="nf4", compress_statistics=True)
    base = base.cuda()
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=["lin"]))
    for name, param in model.named_parameters():
        if "lora_" in name:  # the trainer's LoRA weights are in the compute dtype (bf16) too
            param.data = param.data.bfloat16()
    if kernel != "peft":
        fused_lora.install(model, triton_dropout=kernel == "fused_triton")
    return model.train()


def host_us(fn, calls: int = 200) -> float:
    """Wall us per call over `calls` calls with no sync between them (the GPU must keep up: small calls)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e6


def gpu_ms(fn, calls: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def step_fn(model, tokens: int, n_in: int):
    x = torch.randn(1, tokens, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def run():
        y = model(x)
        y.backward(torch.ones_like(y))
    return run


def dequant_fns(n_in: int, n_out: int) -> dict:
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, qs = quantize_4bit((torch.randn(n_out, n_in, device="cuda") * 0.02).bfloat16(), blocksize=64,
                               compress_statistics=True, quant_type="nf4")
    fns = {"bitsandbytes": lambda: dequantize_4bit(packed, qs)}
    try:
        from train.kernels import nf4
    except ImportError:  # a tree from before the kernel
        return fns
    assert torch.equal(nf4.dequantize(packed, qs, torch.bfloat16), dequantize_4bit(packed, qs))
    ours = {"ours (nf4.py)": lambda: nf4.dequantize(packed, qs, torch.bfloat16)}
    return {**fns, **launch_variants(ours)}


def launch_variants(fns: dict) -> dict:
    """Each fn twice where train/kernels/launch.py exists: Triton's own launch path, then our direct relaunch."""
    if importlib.util.find_spec("train.kernels.launch") is None:  # a tree from before it
        return fns
    out = {}
    for k, fn in fns.items():
        for direct in (False, True):
            out[f"{k}, {'direct' if direct else 'Triton'} launch"] = lambda fn=fn, d=direct: _with_direct(fn, d)
    return out


def _with_direct(fn, direct: bool):
    from train.kernels import launch

    launch.DIRECT = direct
    try:
        return fn()
    finally:
        launch.DIRECT = True


def optimizer_ms(rounds: int) -> dict:
    """ms per optimizer step (wall, synced) over Llama-8B's 448 LoRA tensors (r=16, bf16): bitsandbytes' paged
    32-bit AdamW against train/optim.py's one-step version of it, alternating."""
    import bitsandbytes as bnb

    try:
        from train import optim
    except ImportError:  # a tree from before it
        return {}
    layer = [(16, 4096), (4096, 16), (16, 4096), (1024, 16), (16, 4096), (1024, 16), (16, 4096), (4096, 16),
             (16, 4096), (14336, 16), (16, 4096), (14336, 16), (16, 14336), (4096, 16)]
    opts = {}
    for name, cls in (("bitsandbytes paged_adamw_32bit", bnb.optim.AdamW), ("ours (train/optim.py)",
                                                                           optim.flat_adamw_class())):
        ps = [torch.nn.Parameter(torch.randn(s, device="cuda").bfloat16() * 0.01) for s in layer * 32]
        for p in ps:
            p.grad = torch.randn_like(p) * 0.01
        opts[name] = cls(ps, lr=2e-4, optim_bits=32, is_paged=True, weight_decay=0.0)
    res = {k: [] for k in opts}
    for _ in range(rounds):
        for k, opt in opts.items():
            for _ in range(3):
                opt.step()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(10):
                opt.step()
            torch.cuda.synchronize()
            res[k].append((time.perf_counter() - t) / 10 * 1e3)
    return {k: statistics.median(v) for k, v in res.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the GPU-timed call (default 8192)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; medians are printed (default 5)")
    p.add_argument("--optimizer-only", action="store_true", help="only the optimizer step's timing")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("layer_bench.py: error: needs a CUDA GPU", file=sys.stderr)
        return 2
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for k, ms in optimizer_ms(args.rounds).items():
        print(f"optimizer step, 448 LoRA tensors of Llama-8B, {k}: {ms:.2f} ms")
    if args.optimizer_only:
        return 0
    # host: the fastest round as well as the median (a shared host's speed changes from one moment to the next; the
    # minimum is the least disturbed estimate of a variant's own cost)
    print("| what | shape | host us/call (64 tokens), min / median | GPU ms/call |")
    print("|---|---|---:|---:|")
    for shape, (n_in, n_out) in SHAPES.items():
        fns = dequant_fns(n_in, n_out)
        res = {k: ([], []) for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                res[k][0].append(host_us(fn, 1000))
                res[k][1].append(gpu_ms(fn, 100))
        for k, (h, g) in res.items():
            print(f"| dequant, {k} | {shape} | {min(h):.1f} / {statistics.median(h):.1f} | "
                  f"{statistics.median(g):.3f} |")
    for shape, (n_in, n_out) in SHAPES.items():
        models = {k: layer(n_in, n_out, k) for k in ("fused", "fused_triton", "peft")}
        small = launch_variants({k: step_fn(m, 64, n_in) for k, m in models.items()})
        large = launch_variants({k: step_fn(m, args.tokens, n_in) for k, m in models.items()})
        res = {k: ([], []) for k in small}
        for _ in range(args.rounds):
            for k in small:
                res[k][0].append(host_us(small[k]))
                res[k][1].append(gpu_ms(large[k]))
        for k, (h, g) in res.items():
            print(f"| fwd+bwd, lora.kernel={k} | {shape} | {min(h):.1f} / {statistics.median(h):.1f} | "
                  f"{statistics.median(g):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
