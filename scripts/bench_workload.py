"""The benchmark's workload, written to disk once: a model with random weights, rows of random letters, and the
config a user of this project writes for them (scripts/bench.py; docs/benchmarks.md "Workload").

Nothing here trains. Everything is seeded, so two bench runs (or two machines) train on the same model and the
same rows; the CPU mode's batch comes from here too.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

SEED = 1234
# Llama-3.1-8B's architecture (train.plan.KNOWN_BASES) plus what a forward needs: Llama 3's RoPE scaling and eps
LLAMA_8B_EXTRA = dict(rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.02,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# CPU smoke test (--tiny): widths are multiples of 32 (bitsandbytes' CPU 4-bit kernels need that)
LLAMA_TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=288, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, initializer_range=0.02)
# Row lengths: lognormal with sigma 1 and this mean before the cap, rounded and clipped to [low, cap]
LENGTHS = {"8b": dict(mean=400, cap=2048, low=16), "tiny": dict(mean=64, cap=256, low=8)}


def model_config(tiny: bool):
    from transformers import LlamaConfig

    from train.plan import KNOWN_BASES

    fields = LLAMA_TINY if tiny else {**KNOWN_BASES["meta-llama/Llama-3.1-8B"], **LLAMA_8B_EXTRA}
    fields = {k: v for k, v in fields.items() if k != "model_type"}
    return LlamaConfig(**fields, bos_token_id=0, eos_token_id=1, pad_token_id=2)


def matmul_params(cfg) -> int:
    """Weights of every Linear (what the 6N FLOP count multiplies): attention, MLP, lm_head."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return layers * (h * h * 2 + h * kv * 2 + h * i * 3) + h * cfg.vocab_size


def ensure_model(work: Path, tiny: bool) -> tuple[Path, dict]:
    """Random bf16 weights (normal, std 0.02, norms 1, seeded) in HF format with the byte-level tokenizer.

    Tensors are drawn on the GPU when there is one, copied to the CPU and written shard by shard: no model
    object is ever built, so the 16 GB write is the whole cost (~30 s)."""
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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(SEED)
    files, shard, size, total, params = [], {}, 0, 0, 0

    def flush():  # one shard at a time: the host never holds the whole model
        files.append(f"part-{len(files) + 1}.safetensors")
        save_file(shard, str(target / files[-1]), metadata={"format": "pt"})
        return {}, 0

    names = {}
    for name, shape in ((k, tuple(v.shape)) for k, v in meta_model(cfg).state_dict().items()):
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, cfg.initializer_range,
                                                                                generator=gen).cpu()
        if shard and size + 2 * t.numel() > 4 * 1024**3:
            shard, size = flush()
        shard[name], names[name] = t, len(files)
        size, total, params = size + 2 * t.numel(), total + 2 * t.numel(), params + t.numel()
    flush()
    final = [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    for old, new in zip(files, final):
        os.replace(target / old, target / new)
    (target / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in names.items()}}, indent=1))
    info = {"params": params, "bytes": total, "shards": len(files),
            "write_s": round(time.perf_counter() - t0, 1), "matmul_params": matmul_params(cfg)}
    stamp.write_text(json.dumps(info))
    return target, info


def random_letters(rng, n: int) -> str:
    """n random ASCII letters: one byte-level token each (BOS and EOS make a row n + 2 tokens)."""
    import numpy as np

    letters = np.frombuffer(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
    return letters[rng.integers(0, len(letters), n)].tobytes().decode()


def ensure_data(work: Path, tiny: bool, rows: int) -> tuple[Path, Path, dict]:
    """Rows of random letters (train.jsonl, format text) and their token ids (ids.json: what the TRL and
    Unsloth ways train on). Byte-level tokens, BOS + letters + the EOS train/data.py appends: a row of L-2
    letters is exactly L tokens. Lengths ~ lognormal (LENGTHS), fixed seed."""
    import numpy as np

    from train import tiny as tiny_mod

    spec = LENGTHS["tiny" if tiny else "8b"]
    target = work / f"data-{'tiny' if tiny else '8b'}-{rows}"
    stamp = target / "stats.json"
    if stamp.is_file():
        return target / "train.jsonl", target / "ids.json", json.loads(stamp.read_text())
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    draw = rng.lognormal(math.log(spec["mean"]) - 0.5, 1.0, rows)
    lengths = np.clip(np.rint(draw), spec["low"], spec["cap"]).astype(int)
    tok = tiny_mod.build_tokenizer()
    texts = [random_letters(rng, n - 2) for n in lengths]
    ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]  # exactly what train/data.py encode_text does
    assert [len(x) for x in ids] == lengths.tolist()
    (target / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (target / "ids.json").write_text(json.dumps(ids))
    stats = {"rows": rows, "mean": float(lengths.mean()), "median": float(np.median(lengths)),
             "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max()),
             "capped": int((lengths == spec["cap"]).sum()), "sigma": 1.0, "cap": spec["cap"]}
    stamp.write_text(json.dumps(stats))
    return target / "train.jsonl", target / "ids.json", stats


def ensure_fixed_data(work: Path, length: int, rows: int) -> Path:
    """Rows of exactly `length` tokens (the plan check): a micro-batch of B rows is then exactly B*length tokens."""
    import numpy as np

    from train import tiny as tiny_mod

    target = work / f"data-fixed-{length}x{rows}" / "train.jsonl"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(SEED + length)
        tok = tiny_mod.build_tokenizer()
        texts = [random_letters(rng, length - 2) for _ in range(rows)]
        ids = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]  # what train/data.py encode_text makes
        assert all(len(x) == length for x in ids)
        (target.parent / "ids.json").write_text(json.dumps(ids))  # the Unsloth way's rows: the same tokens
        tmp = target.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        os.replace(tmp, target)  # a cut-short file is never mistaken for a finished one
    return target


LONG_ROW_TOKENS = 131072  # micro-batches this long run 0 + 1 steps: one 350K step takes ~7 min on an H200


def plan_check_ways(work: Path, spec: str, stacks: str = "ours") -> dict:
    """--plan-check: per "BxL" setting, B rows of exactly L tokens, one micro-batch a step (B*L tokens): way c
    ("ours" in `stacks`) and Unsloth on the same rows ("unsloth"). A long micro-batch (>= LONG_ROW_TOKENS) runs
    one step, timed from the start (its minutes dwarf the start-up); shorter ones 1 warm-up + 2 timed."""
    ways = {}
    for b, n in ((int(x) for x in item.lower().split("x")) for item in spec.split(",") if item.strip()):
        long = b * n >= LONG_ROW_TOKENS
        data = ensure_fixed_data(work, n, 4 * b if long else max(64, 4 * b))  # long: 1 step needs b rows
        warmup, steps = (0, 1) if long else (1, 2)
        ways[f"plan-{b}x{n}"] = dict(kind="ours", label=f"plan {b}x{n}", tokens=b * n, warmup=warmup, steps=steps,
                                     skip="ours" not in stacks, check=False,
                                     desc=f"plan check: way c, {b} rows x {n} tokens", sets=[
                                         f"train.batch_size={b}", "train.grad_accum=1", f"data.train={data}",
                                         f"data.max_length={n}"])
        if "unsloth" in stacks:
            ways[f"unsloth-{b}x{n}"] = dict(kind="unsloth", label=f"Unsloth {b}x{n}", tokens=b * n, warmup=warmup,
                                            steps=steps, dropout=0.05, batch=b, max_length=n,
                                            ids_file=str(data.parent / "ids.json"),
                                            desc=f"Unsloth, {b} rows x {n} tokens, same LoRA settings")
    return ways


def write_our_config(work: Path, model_dir: Path, data_file: Path, max_length: int, max_steps: int) -> Path:
    """The config a user of this project writes for this workload; everything else stays default."""
    import yaml

    cfg = {
        "run": {"output_dir": str(work / "runs" / "c"), "seed": 42},
        "model": {"name_or_path": str(model_dir)},
        "quant": {"mode": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 32, "target_modules": "all-linear"},
        "data": {"train": str(data_file), "format": "text", "max_length": max_length},
        "train": {"max_steps": max_steps, "save_every": 100000, "resume": "never"},
    }
    path = work / "bench_c.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def cpu_batch(model_dir: str, rows: int, length: int) -> list[list[int]]:
    """CPU mode: `rows` rows of exactly `length` token ids of the model's own tokenizer (BOS, random
    non-special ids, EOS), seeded: the one batch that both CPU ways train on every step."""
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    special = set(tok.all_special_ids)
    pool = np.array([i for i in range(len(tok)) if i not in special])
    rng = np.random.default_rng(SEED)
    head = [tok.bos_token_id] if tok.bos_token_id is not None else []
    body = length - len(head) - 1
    return [head + pool[rng.integers(0, len(pool), body)].tolist() + [tok.eos_token_id] for _ in range(rows)]
