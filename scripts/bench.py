#!/usr/bin/env python3
"""One-GPU throughput benchmark: the same QLoRA workload trained three ways, one table.

    python scripts/bench.py                      # GPU: Llama-3.1-8B shape, ways a, b, c, c-fast
    python scripts/bench.py --ways a,c,c-fast    # any subset / order (see WAYS below)
    python scripts/bench.py --tiny               # CPU smoke test: tiny Llama, 3 steps
    python scripts/bench.py --profile c-fast     # + one extra step under torch.profiler (GPU time by kernel
                                                 #   group, kernel launches, sync calls, top host ops)
    python scripts/bench.py --plan-check         # memory planner (train/plan.py) vs measured peaks: way c at
                                                 #   micro-batches of 4x512, 16x512, 16x1024 tokens (2k/8k/16k)

Results: WORK/results/results.json (everything) and table.md; --report DIR copies both there after
each way. Numbers, method and findings: docs/benchmarks.md; predictions vs outcomes: docs/bench-notes.md.

Workload (identical for every way): a Llama-3.1-8B-shaped model (hidden 4096, intermediate 14336,
32 layers, 32 heads, 8 KV heads, vocab 128256) with random bf16 weights written to local disk
first, loaded as NF4 + double quant + bf16 compute; LoRA r=16 alpha=32 dropout=0.05 on all linear
layers; rows of random letters whose token lengths are lognormal (mean 400, sigma 1) capped at
2048, fixed seed; 16 sequences per optimizer step (except where a way packs rows into bins: then
its batch counts bins, as TRL's packing does).

Ways:
  a        the plain recipe: TRL SFTTrainer, pad to longest, sdpa, gradient checkpointing,
           paged_adamw_32bit, batch 4 x accumulation 4
  b        TRL's best flags: a + packing (BFD bins of 2048) + use_liger_kernel
  c        this project's default path: `python -m train fit` with our config, defaults untouched
  c-*      the project path with --set overrides, and (marked "proposed") with changes to train/
           that are not merged yet, applied here by monkeypatching (see PATCHES and docs/benchmarks.md).
           c-fast is the recommended fast path; once train/ makes it the default, way c is it.

Each way runs in its own process (clean peak-memory numbers, no kernel patches leaking between
ways). Timed: `--steps` optimizer steps after `--warmup` steps. Reported: non-padding tokens/s
(Trainer's num_input_tokens_seen, "non_padding"), peak torch.cuda.max_memory_allocated during
training, MFU = tokens/s x 6 x N_matmul / 790e12 (N_matmul: every Linear weight incl. lm_head;
6N = forward 2N + recompute under gradient checkpointing 2N + input-gradient backward 2N; the
frozen 4-bit base needs no weight gradients; attention-score FLOPs and LoRA FLOPs not counted),
and the loss of the first steps. Ways c* also run a per-sequence loss check: the same 8 rows
through the trained model alone, padded (way a's batching) and packed (the way's batching).

--plan-check (alone, or after --ways): way c's pipeline, defaults untouched except train.batch_size = B,
on rows of exactly L tokens, so every micro-batch is exactly B*L tokens; 3 optimizer steps per setting,
each in its own process. Compared: the measured training peak (the same max_memory_allocated as above)
and train.plan.torch_allocated(train.plan.estimate(cfg, config.json, tokens=B*L)), cfg loaded by
train.config.load_config with the same file and --set overrides the run used. Pass: every setting
within PLAN_TOLERANCE (15%). On CPU (--tiny) there is no CUDA peak: predictions only, measured n/a.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 790.0  # H100/H200 dense bf16, as measured on this workplace's machines (KINDS.md)
SEED = 1234

LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_theta=500000.0, tie_word_embeddings=False, initializer_range=0.02,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
)
# CPU smoke test: widths are multiples of 32 (bitsandbytes' CPU 4-bit kernels need that)
LLAMA_TINY = dict(
    hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=288, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False,
    initializer_range=0.02,
)

# name -> how it trains. kind "trl": TRL SFTTrainer directly; kind "ours": `python -m train fit`.
WAYS = {
    "a": dict(kind="trl", desc="TRL defaults: pad to longest, sdpa, GC, paged_adamw_32bit, 4x4",
              packing=False, liger=False),
    "b": dict(kind="trl", desc="TRL best flags: a + packing (BFD, 2048) + use_liger_kernel",
              packing=True, liger=True),
    "c": dict(kind="ours", desc="ours, current defaults (python -m train fit)", sets=[]),
    "c-pf": dict(kind="ours", desc="ours --set train.packing=padding_free", sets=["train.packing=padding_free"]),
    "c-pf-liger": dict(kind="ours", desc="ours --set train.packing=padding_free train.liger=true",
                       sets=["train.packing=padding_free", "train.liger=true"]),
    "c-pf-liger-flex": dict(kind="ours", desc="c-pf-liger + model.attn_implementation=flex_attention",
                            sets=["train.packing=padding_free", "train.liger=true",
                                  "model.attn_implementation=flex_attention"], warmup=3),
    "c-bf16": dict(kind="ours", desc="ours defaults + proposed bf16 k-bit prep", sets=[], patches=["bf16_prep"]),
    # Proposed fast path: rows flattened per micro-batch (16 rows = 16 sequences/step, no bins), varlen flash
    # attention, Liger, embeddings/lm_head kept in bf16.
    "c-fast": dict(kind="ours", desc="proposed: padding-free rows 16x1 + varlen attn + liger + bf16 prep",
                   sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16", "train.grad_accum=1"],
                   patches=["bf16_prep", "rows_padding_free", "varlen_attn"]),
    "c-fast-8x2": dict(kind="ours", desc="proposed fast path, batch 8 x accumulation 2",
                       sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=8",
                             "train.grad_accum=2"],
                       patches=["bf16_prep", "rows_padding_free", "varlen_attn"]),
    "c-fast-sdpa": dict(kind="ours", desc="proposed fast path with plain sdpa (dense block-diagonal mask)",
                        sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16",
                              "train.grad_accum=1"],
                        patches=["bf16_prep", "rows_padding_free"]),
    "c-fast-fp32prep": dict(kind="ours", desc="proposed fast path but today's fp32 k-bit prep",
                            sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16",
                                  "train.grad_accum=1"],
                            patches=["rows_padding_free", "varlen_attn"]),
    "c-fast-offload": dict(kind="ours", desc="proposed fast path + activation offloading (TRL)",
                           sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16",
                                 "train.grad_accum=1"],
                           patches=["bf16_prep", "rows_padding_free", "varlen_attn", "offload"]),
    "c-fast-lean": dict(kind="ours", desc="proposed fast path + reentrant checkpointing + sync-free token count",
                        sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16",
                              "train.grad_accum=1"],
                        patches=["bf16_prep", "rows_padding_free", "varlen_attn", "lean"]),
    "c-fast-8x2-lean": dict(kind="ours", desc="c-fast-lean with batch 8 x accumulation 2",
                            sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=8",
                                  "train.grad_accum=2"],
                            patches=["bf16_prep", "rows_padding_free", "varlen_attn", "lean"]),
    "c-fast-nodrop-lean": dict(kind="ours", desc="c-fast-lean + lora.dropout=0",
                               sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16",
                                     "train.grad_accum=1", "lora.dropout=0.0"],
                               patches=["bf16_prep", "rows_padding_free", "varlen_attn", "lean"]),
    "c-fast-nodrop": dict(kind="ours", desc="proposed fast path + lora.dropout=0",
                          sets=["train.packing=padding_free", "train.liger=true", "train.batch_size=16",
                                "train.grad_accum=1", "lora.dropout=0.0"],
                          patches=["bf16_prep", "rows_padding_free", "varlen_attn"]),
}
# Session 3: the LoRA layer and the optimizer step, attributed against today's default (c)
WAYS.update({
    "c-peft": dict(kind="ours", desc="ours with lora.kernel=peft (peft's own LoRA modules and dropout)",
                   sets=["lora.kernel=peft"]),
    "c-lean": dict(kind="ours", desc="ours with the lean dropout but peft's LoRA forward (session 2's default)",
                   sets=[], patches=["lean_only"]),
    "c-torchdrop": dict(kind="ours", desc="ours with the fused LoRA layer but torch's dropout (no Triton kernels)",
                        sets=[], patches=["torch_dropout"]),
    "c-triton": dict(kind="ours", desc="ours with lora.kernel=fused_triton (LoRA dropout in Triton kernels)",
                     sets=["lora.kernel=fused_triton"]),
    "c-nosync": dict(kind="ours", desc="ours, bitsandbytes' optimizer without its per-parameter device sync",
                     sets=[], patches=["optim_nosync"]),
})
DEFAULT_WAYS = "a,b,c,c-fast"

# --plan-check settings, "BxL": B rows per micro-batch of exactly L tokens (micro-batch tokens 2k / 8k / 16k)
PLAN_SETTINGS = "4x512,16x512,16x1024"
PLAN_SETTINGS_TINY = "4x32,16x32,16x64"  # the same shapes scaled down: CPU minutes, every code path
PLAN_TOLERANCE = 0.15  # the bar: |predicted - measured| / measured within 15% at every setting
PLAN_WARMUP, PLAN_STEPS = 1, 2  # 3 optimizer steps: the peak is reached in step 1's backward already


# --------------------------------------------------------------------------------------------
# Workload: model on disk, data


def model_config(tiny: bool):
    from transformers import LlamaConfig

    return LlamaConfig(**(LLAMA_TINY if tiny else LLAMA_8B), bos_token_id=0, eos_token_id=1, pad_token_id=2)


def matmul_params(cfg) -> int:
    """Weights of every Linear (what the 6N FLOP count multiplies): attention, MLP, lm_head."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    per_layer = h * h * 2 + h * kv * 2 + h * i * 3
    return L * per_layer + h * cfg.vocab_size


def ensure_model(work: Path, tiny: bool) -> tuple[Path, dict]:
    """Random bf16 weights in HF format (sharded safetensors + index) with the byte-level tokenizer.

    Tensors are drawn on the GPU (seeded), copied to the CPU and written shard by shard: no full
    model object is ever built, so the 16 GB write is the whole cost."""
    import torch
    from safetensors.torch import save_file

    from train import tiny as tiny_mod
    from train.model import meta_model

    target = work / ("model-tiny" if tiny else "model-8b")
    stamp = target / "bench_model.json"
    if stamp.is_file():
        return target, json.loads(stamp.read_text())
    t0 = time.perf_counter()
    target.mkdir(parents=True, exist_ok=True)
    cfg = model_config(tiny)
    cfg.save_pretrained(target)
    tok = tiny_mod.build_tokenizer()
    tok.model_max_length = cfg.max_position_embeddings  # rows reach 2048 tokens; silence the 1024 warning
    tok.save_pretrained(target)
    shapes = {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(SEED)
    shard, shard_bytes, shards, weight_map = {}, 0, [], {}
    limit = 4 * 1024**3
    total = 0

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(target / name), metadata={"format": "pt"})
            shards.append(name)
            weight_map.update({k: name for k in shard})
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device)
            t.normal_(0.0, cfg.initializer_range, generator=gen)
            t = t.cpu()
        nbytes = t.numel() * 2
        if shard_bytes + nbytes > limit:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        total += nbytes
    flush()
    # shards were named without the total; rename to HF's -of- form
    final_map = {}
    for i, name in enumerate(shards, 1):
        new = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(target / name, target / new)
        final_map.update({k: new for k, v in weight_map.items() if v == name})
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": final_map}, indent=1))
    info = {"params": sum(math.prod(s) for s in shapes.values()), "bytes": total, "shards": len(shards),
            "write_s": round(time.perf_counter() - t0, 1), "matmul_params": matmul_params(cfg)}
    stamp.write_text(json.dumps(info))
    return target, info


def ensure_data(work: Path, tiny: bool, rows: int) -> tuple[Path, Path, dict]:
    """Rows of random ASCII letters: byte-level tokenization gives BOS + one token per letter + EOS (our
    data.py appends EOS), so a row of L-2 letters is exactly L tokens. Lengths ~ lognormal with mean
    400 (sigma 1, mu = ln 400 - 1/2), rounded, clipped to [16, 2048]. The token ids that ways a/b
    train on are the ones our tokenizer produces for the same text."""
    import numpy as np

    from train import tiny as tiny_mod

    mean, cap, lo = (64, 256, 8) if tiny else (400, 2048, 16)
    target = work / f"data-{'tiny' if tiny else '8b'}-{rows}"
    stamp = target / "stats.json"
    if stamp.is_file():
        return target / "train.jsonl", target / "ids.json", json.loads(stamp.read_text())
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    sigma = 1.0
    lengths = np.clip(np.rint(rng.lognormal(math.log(mean) - sigma**2 / 2, sigma, rows)), lo, cap).astype(int)
    tok = tiny_mod.build_tokenizer()
    texts, ids = [], []
    for n in lengths:
        text = random_letters(rng, n - 2)
        texts.append(text)
        ids.append(tok(text)["input_ids"] + [tok.eos_token_id])  # exactly what train/data.py encode_text does
        assert len(ids[-1]) == n, (len(ids[-1]), n)
    with (target / "train.jsonl").open("w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    (target / "ids.json").write_text(json.dumps(ids))
    stats = {"rows": rows, "mean": float(lengths.mean()), "median": float(np.median(lengths)),
             "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max()), "capped": int((lengths == cap).sum()),
             "sigma": sigma, "cap": cap}
    stamp.write_text(json.dumps(stats))
    return target / "train.jsonl", target / "ids.json", stats


def random_letters(rng, n: int) -> str:
    """n random ASCII letters: one byte-level token each (BOS and EOS make a row n + 2 tokens)."""
    import numpy as np

    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
    return letters[rng.integers(0, len(letters), n)].tobytes().decode()


def ensure_fixed_data(work: Path, length: int, rows: int) -> Path:
    """Rows of exactly `length` tokens for --plan-check: a micro-batch of B rows is then exactly B*length tokens
    whatever the batching (padding-free, or padded on CPU: equal rows need no pad), so the planner is asked
    about the very token count the run trains on."""
    import numpy as np

    from train import tiny as tiny_mod

    target = work / f"data-fixed-{length}x{rows}" / "train.jsonl"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED + length)
    tok = tiny_mod.build_tokenizer()
    lines = []
    for _ in range(rows):
        text = random_letters(rng, length - 2)
        n = len(tok(text)["input_ids"]) + 1  # + EOS, which train/data.py encode_text appends
        assert n == length, (n, length)
        lines.append(json.dumps({"text": text}))
    tmp = target.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, target)  # a cut-short file is never mistaken for a finished one
    return target


def write_our_config(work: Path, model_dir: Path, data_file: Path, ctx: dict) -> Path:
    """The config a user of this project writes for this workload; everything else stays default."""
    import yaml

    cfg = {
        "run": {"output_dir": str(work / "runs" / "c"), "seed": 42},
        "model": {"name_or_path": str(model_dir)},
        "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(data_file), "format": "text", "max_length": ctx["max_length"]},
        "train": {"max_steps": ctx["warmup"] + ctx["steps"], "save_every": 100000, "resume": "never"},
    }
    path = work / "bench_c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# Measuring (inside each way's process)


def make_timer(warmup: int, steps: int, profile: bool = False):
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()

    class Timer(TrainerCallback):
        """Step-end timestamps (after a device sync), tokens seen, losses, peak memory during training.
        With profile, one extra step after the timed ones runs under torch.profiler (not timed)."""

        def __init__(self):
            self.marks, self.losses, self.peak_train = [], [], 0
            self.profile_step = warmup + steps + 1 if profile else None
            self.prof, self.profile = None, None

        def on_step_begin(self, args, state, control, **kw):
            if self.profile_step and state.global_step + 1 == self.profile_step:
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.prof_t0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.marks.append((0, time.perf_counter(), state.num_input_tokens_seen))

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen))
            if self.prof is not None and state.global_step == self.profile_step:
                wall = time.perf_counter() - self.prof_t0
                self.prof.__exit__(None, None, None)
                self.profile = profile_summary(self.prof, wall)
                self.prof = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                self.peak_train = torch.cuda.max_memory_allocated()
                self.reserved = torch.cuda.max_memory_reserved()

        def summary(self) -> dict:
            if len(self.marks) <= warmup + 1:
                return {"error": f"only {len(self.marks) - 1} steps ran"}
            (_, t0, n0), (step, t1, n1) = self.marks[warmup], self.marks[min(warmup + steps, len(self.marks) - 1)]
            step_s = [round(b[1] - a[1], 3) for a, b in zip(self.marks, self.marks[1:])]
            return {"profile": self.profile, "timed_steps": step - warmup, "timed_s": round(t1 - t0, 3),
                    "timed_tokens": int(n1 - n0),
                    "tok_per_s": (n1 - n0) / (t1 - t0), "step_s": step_s, "losses": self.losses,
                    "peak_alloc_gb": self.peak_train / 1e9,
                    "peak_reserved_gb": getattr(self, "reserved", 0) / 1e9}

    return Timer()


KERNEL_GROUPS = (  # first match wins: where the GPU time of one training step goes
    ("annotation (not a kernel)", ("Optimizer.step", "ProfilerStep", "##")),
    ("attention", ("flash", "fmha", "attention", "_efficient_attention")),
    ("bnb dequant", ("dequant", "kDequantize")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "wgmma", "ampere_")),
    ("dropout", ("dropout",)),
    ("elementwise/reduce/copy", ("elementwise", "vectorized", "reduce", "unrolled", "index", "copy", "cat",
                                 "memcpy", "memset", "fill")),
    ("liger/triton", ("_rms_norm", "_swiglu", "_rope", "triton", "liger", "_kernel")),
)


def profile_summary(prof, wall_s: float) -> dict:
    """GPU time of the profiled step by kernel group, busy fraction, and the top kernels."""
    groups: dict = {}
    kernels = []
    for evt in prof.key_averages():
        if "CUDA" not in str(getattr(evt, "device_type", "")):  # kernels only: CPU ops would count them twice
            continue
        dev = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0) or 0
        if dev <= 0:
            continue
        name = evt.key
        low = name.lower()
        group = next((g for g, keys in KERNEL_GROUPS if any(k.lower() in low for k in keys)), "other")
        groups[group] = groups.get(group, 0) + dev
        kernels.append((dev, evt.count, name[:90], group))
    total = sum(v for g, v in groups.items() if not g.startswith("annotation"))
    kernels.sort(reverse=True)
    cpu_ops = sorted(((e.self_cpu_time_total, e.count, e.key[:80]) for e in prof.key_averages()
                      if "CUDA" not in str(getattr(e, "device_type", ""))), reverse=True)
    launches = sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel",
                                                                         "cudaLaunchKernelExC", "cuLaunchKernelEx"))
    syncs = {e.key: e.count for e in prof.key_averages()
             if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize",
                          "aten::item", "aten::_local_scalar_dense", "aten::nonzero")}
    return {"wall_ms": round(wall_s * 1e3, 1), "gpu_busy_ms": round(total / 1e3, 1), "kernel_launches": launches,
            "sync_like_calls": syncs,
            "groups_ms": {g: round(v / 1e3, 1) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [f"{d / 1e3:8.1f} ms x{c:<5d} [{g}] {n}" for d, c, n, g in kernels[:20]],
            "top_cpu_self": [f"{t / 1e3:8.1f} ms x{c:<6d} {n}" for t, c, n in cpu_ops[:15]]}


def count_batches(collate, log: list):
    """Wrap a data collator: per micro-batch, sequences, real and computed (incl. padding) tokens."""

    def wrapped(examples):
        out = collate(examples)
        ids = out["input_ids"]
        if "position_ids" in out and "attention_mask" not in out:
            seqs = int((out["position_ids"] == 0).sum())
            real = int(ids.numel())
        else:
            seqs = int(ids.shape[0])
            real = int(out["attention_mask"].sum()) if "attention_mask" in out else int(ids.numel())
        log.append({"seqs": seqs, "real": real, "computed": int(ids.numel()),
                    "lens": sorted(len(e["input_ids"]) for e in examples)})
        return out

    return wrapped


def batch_stats(log: list, accum: int, warmup: int, steps: int) -> dict:
    """Sequences and padding per optimizer step over the timed steps (micro-batch i belongs to step i//accum)."""
    timed = log[warmup * accum:(warmup + steps) * accum]
    if not timed:
        return {}
    per_step = [sum(b["seqs"] for b in timed[i:i + accum]) for i in range(0, len(timed), accum)]
    real, computed = sum(b["real"] for b in timed), sum(b["computed"] for b in timed)
    first = log[:accum]
    return {"seqs_per_step": per_step, "pad_fraction": round(1 - real / computed, 4), "timed_real_tokens": real,
            "tokens_per_microbatch_max": max(b["computed"] for b in log[:(warmup + steps) * accum]),
            "first_step_lens": sorted(n for b in first for n in b["lens"]),
            # real tokens of every step run (warm-up, timed, profiled), to set each step's time against its work
            "step_real_tokens": [sum(b["real"] for b in log[i:i + accum]) for i in range(0, len(log), accum)]}


def run_trl(way: dict, ctx: dict) -> dict:
    """Ways a and b: the TRL SFTTrainer recipe, written the way its docs show it."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    cuda = torch.cuda.is_available()
    model_dir = ctx["model_dir"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0} if cuda else None,
    )
    load_s = time.perf_counter() - t0
    ids = json.loads(Path(ctx["ids_file"]).read_text())
    ds = Dataset.from_dict({"input_ids": ids})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(Path(ctx["work"]) / "runs" / ctx["way"]),
        per_device_train_batch_size=4, gradient_accumulation_steps=4,
        gradient_checkpointing=True, optim="paged_adamw_32bit" if cuda else "adamw_torch",
        bf16=True, use_cpu=not cuda, max_length=ctx["max_length"],
        learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3,  # as ours
        max_steps=ctx["warmup"] + ctx["steps"] + ctx["profile"], logging_steps=1, save_strategy="no", report_to="none",
        seed=42, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        packing=way["packing"], use_liger_kernel=way["liger"] and cuda,
    )
    timer = make_timer(ctx["warmup"], ctx["steps"], ctx["profile"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[timer])
    log: list = []
    trainer.data_collator = count_batches(trainer.data_collator, log)
    trainer.train()
    res = timer.summary()
    res.update(batch_stats(log, 4, ctx["warmup"], ctx["steps"]))
    res["load_s"] = round(load_s, 1)
    res["attn"] = trainer.model.config._attn_implementation
    return res


# --------------------------------------------------------------------------------------------
# Proposed changes to train/, applied by monkeypatching (PATCHES); docs/benchmarks.md gives the code


def patch_bf16_prep():
    """train.model.prepare_for_kbit without peft's cast of every non-4-bit weight to fp32: with bf16 compute,
    embed_tokens and lm_head stay bf16 (2.1 GB less for an 8B) and the residual stream stays bf16
    (half-size checkpointed activations), which is what TRL's own QLoRA path does."""
    import train.model as m

    original = m.prepare_for_kbit

    def prepare_for_kbit(model, cfg):
        if cfg.quant.mode == "none" or cfg.quant.compute_dtype != "bfloat16":
            return original(model, cfg)
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    m.prepare_for_kbit = prepare_for_kbit


def patch_rows_padding_free():
    """train.packing=padding_free flattens each micro-batch's rows into one row (TRL padding_free without
    packing): batch_size still counts sequences; no bins, no pad tokens. Rows are already cut to
    data.max_length by train/data.py, so TRL's max_length is not needed (TRL refuses it here)."""
    import train.trainer as t

    original = t.build_sft_config

    def build_sft_config(cfg, run, has_eval):
        args = original(cfg, run, has_eval)
        if cfg.train.packing == "padding_free":
            args.packing = False
            args.padding_free = True
            args.max_length = None
        return args

    t.build_sft_config = build_sft_config


VARLEN_INFO: dict = {}


def register_varlen_attention(name: str = "sdpa_varlen") -> str:
    """Register attention `name` with transformers: for padding-free batches (TRL passes cu_seq_lens_q), one
    varlen flash-attention call per layer over all sequences, each causal on its own; for anything
    else (padded batches, generation) exactly transformers' sdpa. Backend picked by a self-test:
    torch.nn.attention.varlen (FA2 inside PyTorch, GQA native or with repeated KV heads), else a
    loop of causal sdpa calls, one per sequence."""
    import inspect

    import torch
    import torch.nn.functional as F
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    try:
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
    except ImportError:
        varlen_attn, params = None, {}

    def run_varlen(q, k, v, cu, max_len, scale, gqa):  # q: (T, H, D), k/v: (T, Hkv, D)
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "scale" in params:
            kw["scale"] = scale
        if k.shape[1] != q.shape[1]:
            if gqa == "native" and "enable_gqa" in params:
                kw["enable_gqa"] = True
            elif gqa == "repeat":
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    cache: list = [None, None]

    def bounds(cu):
        if cache[0] is not cu:  # one device->host copy per forward, not per layer
            cache[0], cache[1] = cu, cu.tolist()
        return cache[1]

    def run_loop(q, k, v, cu, scale):  # q: (1, H, T, D)
        b = bounds(cu)
        outs = [F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], is_causal=True,
                                               scale=scale, enable_gqa=True) for s, e in zip(b, b[1:])]
        return torch.cat(outs, dim=2)

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None or query.shape[0] != 1 or query.shape[2] == 1:
            return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                          scaling=scaling, is_causal=is_causal, **kwargs)
        if query.dtype not in (torch.float16, torch.bfloat16):  # fp32 residual stream (peft's k-bit prep)
            dt = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) \
                else torch.bfloat16
            query, key, value = query.to(dt), key.to(dt), value.to(dt)
        mode = VARLEN_INFO["mode"]
        if mode == "loop":
            out = run_loop(query, key, value, cu, scaling).transpose(1, 2)
        else:
            max_len = kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max())
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
            out = run_varlen(q, k, v, cu.to(torch.int32), int(max_len), scaling, mode.split("-")[1])[None]
        return out, None

    VARLEN_INFO["mode"] = pick_varlen_mode(run_varlen if varlen_attn else None, run_loop)
    AttentionInterface.register(name, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)  # padded batches get sdpa's mask
    return name


def pick_varlen_mode(run_varlen, run_loop) -> str:
    """Check each backend's output and gradients against per-sequence sdpa on random data; first that passes."""
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available() or run_varlen is None:
        VARLEN_INFO["tried"] = {"varlen": "no CUDA or no torch.nn.attention.varlen"}
        return "loop"
    g = torch.Generator(device="cuda").manual_seed(0)
    lens = [37, 5, 300, 128]
    T, H, Hkv, D = sum(lens), 8, 2, 128
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")

    def rand(*s):
        return torch.randn(*s, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_(True)

    q, k, v = rand(T, H, D), rand(T, Hkv, D), rand(T, Hkv, D)
    do = torch.randn(T, H, D, generator=g, device="cuda", dtype=torch.bfloat16)
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = torch.cat([F.scaled_dot_product_attention(
        qf[s:e].transpose(0, 1)[None], kf[s:e].transpose(0, 1)[None], vf[s:e].transpose(0, 1)[None],
        is_causal=True, enable_gqa=True)[0].transpose(0, 1) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    ref.backward(do.float())
    tried = {}
    for mode in ("varlen-native", "varlen-repeat"):
        try:
            for t in (q, k, v):
                t.grad = None
            out = run_varlen(q, k, v, cu, max(lens), None, mode.split("-")[1])
            out.backward(do)
            errs = [float((a.detach().float() - b).norm() / b.norm()) for a, b in
                    ((out, ref), (q.grad, qf.grad), (k.grad, kf.grad), (v.grad, vf.grad))]
            tried[mode] = [round(e, 5) for e in errs]
            if max(errs) < 2e-2:
                VARLEN_INFO["tried"] = tried
                return mode
        except Exception as e:  # noqa: BLE001 - any failure means: try the next backend
            tried[mode] = f"{type(e).__name__}: {str(e)[:200]}"
    VARLEN_INFO["tried"] = tried
    return "loop"


def patch_offload():
    """TRL's activation offloading: tensors saved for backward (with checkpointing: each layer's input hidden
    state) go to pinned CPU memory on a side stream during forward and come back during backward."""
    import train.trainer as t

    original = t.build_sft_config

    def build_sft_config(cfg, run, has_eval):
        import torch

        args = original(cfg, run, has_eval)
        args.activation_offloading = torch.cuda.is_available()  # CUDA streams and pinned memory: GPU only
        return args

    t.build_sft_config = build_sft_config


def patch_lean():
    """Less host work per step, same math: reentrant checkpointing (the first forward runs under no_grad, so
    no autograd graph and no saved-tensor hooks are built for it), and for padding-free batches count
    tokens with numel() (no pad tokens exist) instead of a device sum + .item() sync per micro-batch."""
    import train.trainer as t

    original = t.build_sft_config

    def build_sft_config(cfg, run, has_eval):
        args = original(cfg, run, has_eval)
        args.gradient_checkpointing_kwargs = {"use_reentrant": True}
        if args.padding_free:
            args.include_num_input_tokens_seen = "all"
        return args

    t.build_sft_config = build_sft_config


def patch_lean_only():
    """lora.kernel=fused without the fused 4-bit LoRA forward: only the lean dropout (session 2's default)."""
    import train.fused_lora as f

    f.install = lambda peft_model: 0


def patch_torch_dropout():
    """The fused LoRA layer with torch's dropout and mask replay instead of the Triton kernels."""
    import train.lora_kernels as k

    k.usable = lambda x, a: False


def patch_optim_nosync():
    """Measurement only: bitsandbytes 0.50's Optimizer8bit.step calls torch.cuda.synchronize() after every
    parameter (448 LoRA tensors here). Everything runs on one stream, so the order holds without them."""
    import bitsandbytes.optim.optimizer as o

    o.sync_gpu = lambda t: None


PATCHES = {"lean_only": patch_lean_only, "torch_dropout": patch_torch_dropout, "optim_nosync": patch_optim_nosync, "bf16_prep": patch_bf16_prep, "rows_padding_free": patch_rows_padding_free, "offload": patch_offload,
           "lean": patch_lean}


def run_ours(way: dict, ctx: dict) -> dict:
    """Ways c*: `python -m train fit CONFIG --set ...` in this process (train.cli.main), with a timing
    callback added to the trainer our pipeline builds."""
    import train.config as config_mod
    import train.trainer as trainer_mod
    from train import cli

    patches = way.get("patches", [])
    for p in patches:
        if p in PATCHES:
            PATCHES[p]()
    import torch

    # the bench's own varlen registration predates train/attention.py, which owns the name now and falls
    # back to padded batches without CUDA; on CPU (--tiny) leave it to train/attention.py
    if "varlen_attn" in patches and torch.cuda.is_available():
        name = register_varlen_attention()
        original_load = config_mod.load_config

        def load_config(*a, **k):  # our config's Literal does not list it yet: set it after validation
            cfg = original_load(*a, **k)
            cfg.model.attn_implementation = name
            return cfg

        config_mod.load_config = load_config

    timer = make_timer(ctx["warmup"], ctx["steps"], ctx["profile"])
    log: list = []
    captured: dict = {}
    original_build = trainer_mod.build_trainer

    def build_trainer(cfg, *a, callbacks=(), **k):
        tr = original_build(cfg, *a, callbacks=[*callbacks, timer], **k)
        tr.data_collator = count_batches(tr.data_collator, log)
        captured.update(trainer=tr, cfg=cfg)
        return tr

    trainer_mod.build_trainer = build_trainer
    t0 = time.perf_counter()
    argv = ["fit", ctx["config"], "--overwrite", *[x for s in our_sets(way, ctx) for x in ("--set", s)]]
    rc = cli.main(argv)
    wall = time.perf_counter() - t0
    if rc != 0 or "trainer" not in captured:
        return {"error": f"python -m train {' '.join(argv)} exited {rc}"}
    res = timer.summary()
    tr, cfg = captured["trainer"], captured["cfg"]
    res.update(batch_stats(log, cfg.train.grad_accum, ctx["warmup"], ctx["steps"]))
    res["fit_wall_s"] = round(wall, 1)
    res["attn"] = cfg.model.attn_implementation
    res["varlen"] = dict(VARLEN_INFO)
    res["embed_dtype"] = str(tr.model.get_input_embeddings().weight.dtype)
    if not way.get("check", True):  # plan-check runs: memory only, and ids_file is not their data
        return res
    try:
        res["check"] = packing_check(tr, ctx)
    except Exception as e:  # noqa: BLE001 - the timing result stands on its own; say why the check failed
        res["check"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if way.get("layer_check", ctx["way"] == "c"):
        try:
            res["fused_layers"] = fused_layer_check(tr.model, res.get("tokens_per_microbatch_max", 64))
        except Exception as e:  # noqa: BLE001
            res["fused_layers"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


def fused_layer_check(model, tokens: int) -> dict:
    """One trained 4-bit LoRA layer of each shape, training mode, dropout on. Correctness: the fused forward
    and backward (train/fused_lora.py, with the Triton dropout kernels on GPU) against fp32 autograd over
    the same dequantized weight and the kernels' own mask (relative to the reference's largest value).
    Speed: forward + backward time of peft's layer and of the fused one."""
    import torch

    from train import fused_lora, lora_kernels

    layers = {}
    for name, m in model.named_modules():
        if isinstance(m, fused_lora.FusedLinear4bit):
            layers.setdefault((m.in_features, m.out_features), (name, m))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, new_seed = {}, lora_kernels.new_seed
    for (n_in, n_out), (name, layer) in layers.items():
        was = layer.training
        layer.train()
        adapter = layer.active_adapters[0]
        a_w, b_w = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        p = getattr(layer.lora_A[adapter], "dropout_p", 0.0)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(1, tokens, n_in, generator=g, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(1, tokens, n_out, generator=g, device=dev, dtype=torch.bfloat16)
        ms, got = {}, None
        for label, cls in (("peft", fused_lora.PeftLinear4bit), ("fused", fused_lora.FusedLinear4bit)):
            layer.__class__ = cls
            for rep in range(4):  # the last of 4 is timed: the first ones warm up kernels and allocator
                layer.zero_grad(set_to_none=True)
                xi = x.clone().requires_grad_(True)
                seed = 1234 + rep
                lora_kernels.new_seed = lambda seed=seed: seed
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    y = layer(xi)
                y.backward(dy)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                ms[label] = round((time.perf_counter() - t0) * 1e3, 3)
            if label == "fused":
                got = (y.detach().float(), xi.grad.float(), a_w.grad.float(), b_w.grad.float(), seed)
        layer.__class__ = fused_lora.FusedLinear4bit
        layer.train(was)
        lora_kernels.new_seed = new_seed
        kernels = layer.triton_dropout and lora_kernels.usable(x.reshape(-1, n_in), a_w.to(torch.bfloat16))
        row = {"layer": name, "tokens": tokens, "dropout_path": "triton" if kernels else "torch",
               "ms_peft": ms["peft"], "ms_fused": ms["fused"]}
        out[f"{n_in}->{n_out}"] = row
        if p > 0 and not kernels:  # torch's dropout mask is not reproducible outside the layer: time only
            continue
        base = layer.get_base_layer()
        dense = fused_lora._weight(base.weight, base.weight.quant_state, torch.float32)
        keep = (lora_kernels.keep_mask((tokens, n_in), got[4], p, dev).view(x.shape) if p > 0
                else torch.ones_like(x, dtype=torch.bool))
        xr, ar, br = (t.detach().float().requires_grad_(True) for t in (x, a_w, b_w))
        scale = layer.scaling[adapter]
        yr = xr @ dense.t() + scale * ((xr * keep / (1 - p)) @ ar.t()) @ br.t()
        yr.backward(dy.float())
        rel = {k: float((f - r).abs().max() / r.abs().max().clamp_min(1e-12)) for k, f, r in
               zip(("out", "grad_x", "grad_A", "grad_B"), got[:4], (yr.detach(), xr.grad, ar.grad, br.grad))}
        lora_term = float((yr.detach() - xr.detach() @ dense.t()).abs().max() / yr.detach().abs().max())
        row.update(max_rel_diff_vs_fp32=rel, lora_term_rel=lora_term)
        del dense, xr, yr
    model.zero_grad(set_to_none=True)
    return out


def our_sets(way: dict, ctx: dict) -> list[str]:
    """The --set overrides ways c* pass to `python -m train fit`; --plan-check loads its config with these too."""
    out_dir = Path(ctx["work"]) / "runs" / ctx["way"]
    return [f"run.output_dir={out_dir}", f"train.max_steps={ctx['warmup'] + ctx['steps'] + ctx['profile']}",
            *way.get("sets", [])]


def packing_check(trainer, ctx: dict, k: int = 8) -> dict:
    """Per-sequence mean loss of the same k rows through the trained model (eval mode, training autocast):
    alone (batch of one: the ground truth), padded with an attention mask (way a's batching), and
    packed padding-free (one row, position_ids restart per sequence, cu_seq_lens: this project's
    padding-free batching). A negative control packs them with position_ids 0..T-1 (cross-attention
    between sequences allowed): the check must see that."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = trainer.model
    dev = next(p for p in model.parameters()).device
    ids = json.loads(Path(ctx["ids_file"]).read_text())[:k]
    exs = [{"input_ids": x} for x in ids]
    pad_id = trainer.processing_class.pad_token_id
    packed = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)(exs)
    padded = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=False)(exs)
    lens = [len(x) for x in ids]
    starts = [0, *torch.tensor(lens).cumsum(0).tolist()]

    def ce(logits, tokens):
        return float(F.cross_entropy(logits[:-1].float(), tokens[1:].to(logits.device)))

    def fwd(**inputs):
        inputs = {kk: (v.to(dev) if torch.is_tensor(v) else v) for kk, v in inputs.items() if kk != "labels"}
        return model(**inputs).logits[0] if inputs["input_ids"].shape[0] == 1 else model(**inputs).logits

    was_training = model.training
    model.eval()
    amp = torch.autocast(dev.type, dtype=torch.bfloat16)
    out = {"rows": k, "lens": lens}
    with torch.no_grad(), amp:
        alone = [ce(fwd(input_ids=torch.tensor([x])), torch.tensor(x)) for x in ids]
        lg = fwd(**padded)
        pad = [ce(lg[i, :n], torch.tensor(x)) for i, (x, n) in enumerate(zip(ids, lens))]
        del lg
        lg = fwd(**packed)
        pk = [ce(lg[s:e], torch.tensor(x)) for x, s, e in zip(ids, starts, starts[1:])]
        del lg
        flat = packed["input_ids"]
        lg = fwd(input_ids=flat, position_ids=torch.arange(flat.shape[1])[None])
        bad = [ce(lg[s:e], torch.tensor(x)) for x, s, e in zip(ids, starts, starts[1:])]
        del lg
        try:  # the training loss path (TRL's fused LM head, Liger if on) on the packed batch
            tok_w = [n - 1 for n in lens]
            ref_mean = sum(l * w for l, w in zip(alone, tok_w)) / sum(tok_w)
            loss = trainer.compute_loss(model, trainer._prepare_inputs(dict(packed)))
            out["train_loss_packed"] = round(float(loss), 5)
            out["train_loss_ref"] = round(ref_mean, 5)
        except Exception as e:  # noqa: BLE001
            out["train_loss_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    model.train(was_training)

    def maxdiff(a, b):
        return max(abs(x - y) for x, y in zip(a, b))

    out.update({
        "alone": [round(x, 5) for x in alone], "padded": [round(x, 5) for x in pad],
        "packed": [round(x, 5) for x in pk], "control_no_reset": [round(x, 5) for x in bad],
        "max_abs_packed_vs_padded": round(maxdiff(pk, pad), 5),
        "max_abs_packed_vs_alone": round(maxdiff(pk, alone), 5),
        "max_abs_padded_vs_alone": round(maxdiff(pad, alone), 5),
        "max_abs_control_vs_alone": round(maxdiff(bad, alone), 5),
    })
    # bf16 tolerance: per-sequence mean losses of ~10 nats agree to ~1e-2 across kernels and batch shapes
    tol = 2e-3 * max(alone) + 1e-2
    out["tolerance"] = round(tol, 5)
    out["pass"] = out["max_abs_packed_vs_padded"] <= tol and out["max_abs_packed_vs_alone"] <= tol
    out["control_detected"] = out["max_abs_control_vs_alone"] > tol
    return out


def way_ctx(ctx: dict, name: str) -> tuple[dict, dict]:
    """A way's definition (WAYS, or a --plan-check setting) and the context its process runs with."""
    way = dict(WAYS[name]) if name in WAYS else dict(ctx["plan_ways"][name])
    ctx = {**ctx, "way": name, "profile": int(name in ctx.get("profile_ways", []))}
    ctx.update({k: way[k] for k in ("warmup", "steps") if k in way})
    return way, ctx


def child(way_name: str, ctx_file: Path) -> int:
    way, ctx = way_ctx(json.loads(ctx_file.read_text()), way_name)
    out = Path(ctx["out"]) / f"way-{way_name}.json"
    t0 = time.perf_counter()
    try:
        res = run_trl(way, ctx) if way["kind"] == "trl" else run_ours(way, ctx)
    except Exception as e:  # noqa: BLE001 - report it in the table, keep the other ways
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    import torch

    res.update(way=way_name, desc=way["desc"], patches=way.get("patches", []), sets=way.get("sets", []),
               warmup=ctx["warmup"], process_s=round(time.perf_counter() - t0, 1))
    if torch.cuda.is_available():
        res["peak_alloc_gb_process"] = torch.cuda.max_memory_allocated() / 1e9
    if "tok_per_s" in res:
        res["mfu"] = res["tok_per_s"] * 6 * ctx["matmul_params"] / (PEAK_TFLOPS * 1e12)
    out.write_text(json.dumps(res, indent=1, default=str))
    return 0


# --------------------------------------------------------------------------------------------
# Orchestration and the table


def versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger_kernel", "datasets"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "absent"
    return out


def table(results: list[dict]) -> str:
    rows = ["| way | tok/s | vs a | vs b | peak GB | MFU | seqs/step | pad % | loss, first steps | check |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    by = {r["way"]: r for r in results}
    a, b = by.get("a", {}).get("tok_per_s"), by.get("b", {}).get("tok_per_s")
    for r in results:
        if "tok_per_s" not in r:
            rows.append(f"| {r['way']} | error: {r.get('error', '?')[:120]} | | | | | | | | |")
            continue
        tps = r["tok_per_s"]
        seqs = r.get("seqs_per_step") or []
        chk = r.get("check", {})
        chk_s = "" if not chk else ("error" if "error" in chk else
                                    f"{'pass' if chk['pass'] else 'FAIL'} ({chk['max_abs_packed_vs_padded']:.3g})")
        vs_a = f"{tps / a:.2f}x" if a else ""
        vs_b = f"{tps / b:.2f}x" if b else ""
        losses = ", ".join(f"{x:.3f}" for x in r.get("losses", [])[:4])
        rows.append(f"| {r['way']} | {tps:,.0f} | {vs_a} | {vs_b} | {r.get('peak_alloc_gb', 0):.2f} |"
                    f" {100 * r.get('mfu', 0):.1f}% | {sum(seqs) / max(len(seqs), 1):.1f} |"
                    f" {100 * r.get('pad_fraction', 0):.0f} | {losses} | {chk_s} |")
    return "\n".join(rows)


# --------------------------------------------------------------------------------------------
# --plan-check: train/plan.py's predicted peak against the measured one


def parse_plan_settings(spec: str) -> list[tuple[int, int]]:
    """"BxL" items (B rows of exactly L tokens), or token counts N: rows of 512 tokens up to N = 8192,
    else 1024 (2048 -> 4x512, 8192 -> 16x512, 16384 -> 16x1024). Raises ValueError."""
    out = []
    for item in (x.strip().lower() for x in spec.split(",") if x.strip()):
        if "x" in item:
            b, length = (int(v) for v in item.split("x"))
        else:
            n = int(item)
            length = 512 if n <= 8192 else 1024
            b, rem = divmod(n, length)
            if rem:
                raise ValueError(f"{n} tokens is not a whole number of {length}-token rows; give it as BxL")
        if b < 1 or length < 3:  # a row is BOS + at least one letter + EOS
            raise ValueError(f"{item}: need at least 1 row of at least 3 tokens")
        out.append((b, length))
    return out


def plan_ways(settings: list[tuple[int, int]], work: Path) -> dict:
    """Way c (our config, no patches) per setting: B rows per micro-batch, one micro-batch per step, rows of
    exactly L tokens; data.max_length = L, so no row is cut and the planner's default tokens equal B*L too."""
    ways = {}
    for b, length in settings:
        data = ensure_fixed_data(work, length, max(64, 4 * b))  # >= 3 steps of B rows, shuffled as usual
        ways[f"plan-{b}x{length}"] = dict(
            kind="ours", desc=f"plan check: way c, {b} rows x {length} tokens = {b * length:,} tokens per micro-batch",
            sets=[f"train.batch_size={b}", "train.grad_accum=1", f"data.train={data}", f"data.max_length={length}"],
            rows=b, row_tokens=length, tokens=b * length, warmup=PLAN_WARMUP, steps=PLAN_STEPS, check=False)
    return ways


def plan_prediction(ctx: dict, name: str) -> dict:
    """The planner's view of the run `name` makes: the same YAML and --set overrides (our_sets) through
    train.config.load_config, as `python -m train fit` loads them, the model's config.json, tokens = B*L."""
    from train import plan
    from train.config import load_config
    from train.model import load_model_config, resolve_model_path

    way, wctx = way_ctx(ctx, name)
    cfg = load_config(wctx["config"], our_sets(way, wctx))
    model_config = load_model_config(resolve_model_path(cfg.model), cfg.model)
    est = plan.estimate(cfg, model_config, tokens=way["tokens"])
    return {"predicted_gb": plan.torch_allocated(est) / plan.GB, "total_gb": est["total"] / plan.GB,
            "cfg_tokens": plan.micro_batch_tokens(cfg),
            "components_gb": {k: round(v, 6) for k, v in plan.as_gb(est).items()}}


def plan_row(name: str, way: dict, pred: dict, res: dict, cuda: bool) -> dict:
    """One setting: measured training peak vs predicted torch-visible peak. Measured is n/a without CUDA, and
    the comparison is void if the run's largest micro-batch was not exactly B*L tokens."""
    measured = res.get("peak_alloc_gb") if cuda else None
    predicted = pred.get("predicted_gb")
    seen = res.get("tokens_per_microbatch_max")
    row = {"setting": name, "rows": way["rows"], "row_tokens": way["row_tokens"], "tokens": way["tokens"],
           "tokens_seen_max": seen, "measured_gb": measured, "predicted_gb": predicted, "rel_err": None,
           "pass": None, "error": pred.get("error") or res.get("error")}
    if seen is not None and seen != way["tokens"]:
        row["error"] = f"micro-batch had {seen} tokens, not {way['tokens']}: comparison void"
    elif measured and predicted is not None:
        row["rel_err"] = (predicted - measured) / measured
        row["pass"] = abs(row["rel_err"]) <= PLAN_TOLERANCE
    return {**row, "plan": pred, "run": res}


def plan_verdict(rows: list[dict]) -> str:
    """PASS: every setting measured and within tolerance, at least three of them (the issue's bar). FAIL names
    the settings outside it or without a result (error, skipped); n/a when there is no CUDA peak to compare."""
    bad = [r["setting"] for r in rows if r["error"] or r["pass"] is False]
    if bad:
        return f"FAIL: {', '.join(bad)}: not within {PLAN_TOLERANCE:.0%}, or no result"
    if any(r["pass"] is None for r in rows):
        return "n/a (no CUDA peak measured here: predictions only)"
    if len(rows) < 3:
        return f"FAIL: all within {PLAN_TOLERANCE:.0%}, but only {len(rows)} settings (the bar is at least 3)"
    return f"PASS: {len(rows)} settings within {PLAN_TOLERANCE:.0%}"


def plan_table(rows: list[dict]) -> str:
    out = [f"Plan check (train/plan.py torch_allocated vs max_memory_allocated; tolerance {PLAN_TOLERANCE:.0%})", "",
           "| setting | micro-batch tokens | seen | measured peak GB | predicted GB | error | within |",
           "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        meas = "n/a" if r["measured_gb"] is None else f"{r['measured_gb']:.3f}"
        pred = "error" if r["predicted_gb"] is None else f"{r['predicted_gb']:.3f}"
        err = "" if r["rel_err"] is None else f"{100 * r['rel_err']:+.1f}%"
        seen = "" if r["tokens_seen_max"] is None else f"{r['tokens_seen_max']:,}"
        within = r["error"][:100] if r["error"] else ("n/a" if r["pass"] is None else ("yes" if r["pass"] else "NO"))
        out.append(f"| {r['setting']} | {r['tokens']:,} | {seen} | {meas} | {pred} | {err} |"
                   f" {within} |")
    return "\n".join(out + ["", plan_verdict(rows)])


def run_plan_check(ctx: dict, ctx_file: Path, cuda: bool, budget_left, rows: list, report) -> None:
    """Each setting: the prediction (here: config.json only, no GPU), then the run in its own process (clean
    peak); appends to `rows` and calls report() after each, so a cut-short run still leaves its table."""
    for name, way in ctx["plan_ways"].items():
        try:
            pred = plan_prediction(ctx, name)
        except Exception as e:  # noqa: BLE001 - still measure; the row says why there is no prediction
            pred = {"error": f"plan: {type(e).__name__}: {str(e)[:300]}"}
        print(f"[bench] {name}: predicted torch-visible peak {pred.get('predicted_gb', float('nan')):.3f} GB"
              f" {pred.get('error', '')}", flush=True)
        left = budget_left()
        if left is not None and left < 45:
            res = {"way": name, "error": f"skipped: {left:.0f}s of budget left"}
        else:
            res = run_child(name, way["desc"], ctx_file, Path(ctx["out"]), left)
        rows.append(plan_row(name, way, pred, res, cuda))
        report()
        r = rows[-1]
        print(f"[bench] {name}: " + json.dumps({k: r[k] for k in (
            "tokens_seen_max", "measured_gb", "predicted_gb", "rel_err", "pass", "error")}), flush=True)


def run_child(name: str, desc: str, ctx_file: Path, out: Path, left: float | None) -> dict:
    """One way in its own process (clean peak memory, no patches leaking); its result JSON, or why none."""
    (out / f"way-{name}.json").unlink(missing_ok=True)
    print(f"[bench] way {name}: {desc}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TQDM_DISABLE", "1")  # progress bars would bury the log
    try:
        subprocess.run([sys.executable, __file__, "--child", name, str(ctx_file)], env=env, check=False,
                       timeout=left - 5 if left else None)
    except subprocess.TimeoutExpired:
        return {"way": name, "error": "timed out (budget)"}
    f = out / f"way-{name}.json"
    return json.loads(f.read_text()) if f.is_file() else {"way": name, "error": "child wrote no result"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny Llama, 3 steps")
    p.add_argument("--ways", default=None, help=f"comma-separated, from: {', '.join(WAYS)} (default {DEFAULT_WAYS})")
    p.add_argument("--work", default=None, help="model, data and run directories (default /tmp/qlora-bench)")
    p.add_argument("--out", default=None, help="per-way results directory (default WORK/results)")
    p.add_argument("--report", default=None, help="also write results.json and table.md here after each way")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first (default 2; tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (default 6; tiny 2)")
    p.add_argument("--rows", type=int, default=None, help="data rows (default 1500; tiny 300)")
    p.add_argument("--profile", default="", help="comma-separated ways to profile one extra (untimed) step of")
    p.add_argument("--budget-s", type=float, default=None, help="stop starting ways after this many seconds")
    p.add_argument("--plan-check", action="store_true",
                   help="validate train/plan.py against measured peaks (way c at fixed micro-batch sizes);\n"
                        "runs only this unless --ways is given too")
    p.add_argument("--plan-tokens", default=None,
                   help=f"--plan-check settings: BxL (B rows of L tokens) or token counts\n"
                        f"(default {PLAN_SETTINGS}; tiny {PLAN_SETTINGS_TINY})")
    p.add_argument("--child", nargs=2, metavar=("WAY", "CTX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]))

    start = time.perf_counter()
    ways = args.ways.split(",") if args.ways else ([] if args.plan_check else DEFAULT_WAYS.split(","))
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        p.error(f"unknown way(s) {unknown}; choose from {', '.join(WAYS)}")
    try:
        settings = parse_plan_settings(args.plan_tokens or (PLAN_SETTINGS_TINY if args.tiny else PLAN_SETTINGS))
    except ValueError as e:
        p.error(f"--plan-tokens: {e}")
    work = Path(args.work or "/tmp/qlora-bench").resolve()
    out = Path(args.out).resolve() if args.out else work / "results"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    steps = args.steps if args.steps is not None else (2 if args.tiny else 6)
    rows = args.rows or (300 if args.tiny else 1500)

    import torch

    meta = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "tiny": args.tiny,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "warmup": warmup, "steps": steps, "command": " ".join(["python", *sys.argv]),
            "plan_check": [f"{b}x{n}" for b, n in settings] if args.plan_check else None}
    t0 = time.perf_counter()
    model_dir, model_info = ensure_model(work, args.tiny)
    meta["model"] = {**model_info, "ensure_s": round(time.perf_counter() - t0, 1)}
    data_file, ids_file, data_stats = ensure_data(work, args.tiny, rows)
    meta["data"] = data_stats
    print(f"[bench] model {model_dir} ({model_info}), data {data_stats}", flush=True)
    ctx = {"work": str(work), "out": str(out), "model_dir": str(model_dir), "ids_file": str(ids_file),
           "warmup": warmup, "steps": steps, "max_length": 256 if args.tiny else 2048,
           "matmul_params": model_info["matmul_params"], "profile_ways": [w for w in args.profile.split(",") if w]}
    ctx["config"] = str(write_our_config(work, model_dir, data_file, ctx))
    ctx["plan_ways"] = plan_ways(settings, work) if args.plan_check else {}
    ctx_file = work / "bench_ctx.json"
    ctx_file.write_text(json.dumps(ctx))
    results: list = []
    plan_rows: list = []

    def report(meta) -> str:
        text = "\n\n".join(([table(results)] if results else []) + ([plan_table(plan_rows)] if plan_rows else []))
        doc = {"meta": meta, "results": results}
        if args.plan_check:
            doc["plan_check"] = {"tolerance": PLAN_TOLERANCE, "verdict": plan_verdict(plan_rows), "settings": plan_rows}
        for d in {out, Path(args.report).resolve() if args.report else out}:
            d.mkdir(parents=True, exist_ok=True)
            (d / "results.json").write_text(json.dumps(doc, indent=1, default=str))
            (d / "table.md").write_text(text + "\n")
        return text

    def budget_left() -> float | None:
        return None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)

    for way in ways:
        left = budget_left()
        if left is not None and left < 45:
            results.append({"way": way, "error": f"skipped: {left:.0f}s of budget left"})
            continue
        res = run_child(way, WAYS[way]["desc"], ctx_file, out, left)
        results.append(res)
        report(meta)
        print(f"[bench] {way}: " + json.dumps({k: res.get(k) for k in (
            "tok_per_s", "peak_alloc_gb", "mfu", "losses", "seqs_per_step", "pad_fraction", "error")}), flush=True)
        if "check" in res:
            print(f"[bench] {way} check: " + json.dumps(res["check"]), flush=True)
    if args.plan_check:
        run_plan_check(ctx, ctx_file, torch.cuda.is_available(), budget_left, plan_rows, lambda: report(meta))
    meta["total_s"] = round(time.perf_counter() - start, 1)
    text = report(meta)
    print(f"\n{meta['device']}; {json.dumps(meta['versions'])}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
