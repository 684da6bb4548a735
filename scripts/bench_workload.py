"""The benchmark's workload, written to disk once: a model with random weights (Llama-3.1-8B's architecture, or
another known base's: --base), rows of random letters, and the config a user of this project writes for them
(scripts/bench.py; docs/benchmarks.md "Workload").

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
# The base every earlier run measured (docs/benchmarks.md); --base picks another from train.plan_shape.KNOWN_BASES
DEFAULT_BASE = "meta-llama/Llama-3.1-8B"
# Llama-3.1-8B's architecture (train.plan.KNOWN_BASES) plus what a forward needs: Llama 3's RoPE scaling and eps
LLAMA_8B_EXTRA = dict(rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.02,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
# CPU smoke test (--tiny): widths are multiples of 32 (bitsandbytes' CPU 4-bit kernels need that)
LLAMA_TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=288, max_position_embeddings=1024, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, initializer_range=0.02)
# Token ids of the byte-level tokenizer every base is written with (train/tiny.py build_tokenizer: <s> </s> <pad>)
TOKEN_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)
# Row lengths: lognormal with sigma 1 and this mean before the cap, rounded and clipped to [low, cap]
LENGTHS = {"8b": dict(mean=400, cap=2048, low=16), "tiny": dict(mean=64, cap=256, low=8)}


def resolve_base(name: str) -> str | None:
    """The KNOWN_BASES id `name` means (case-insensitive; an instruct id gives its base's architecture), else None."""
    from train.plan_shape import KNOWN_BASES, KNOWN_VARIANTS

    ids = {k.lower(): k for k in (*KNOWN_BASES, *KNOWN_VARIANTS)}
    key = ids.get(name.strip().lower())
    return None if key is None else KNOWN_VARIANTS.get(key, key)


def model_dir_name(base: str, tiny: bool = False) -> str:
    """The model folder under WORK: one per base (model-qwen2.5-7b), so two bases never share weights."""
    return "model-tiny" if tiny else f"model-{base.rsplit('/', 1)[-1].lower()}"


def model_config(tiny: bool = False, base: str = DEFAULT_BASE, positions: int = 0):
    """The random model's config: `base`'s architecture from train.plan_shape.KNOWN_BASES (built like
    known_base, with AutoConfig.for_model), the tiny tokenizer's special ids, and max_position_embeddings of
    at least `positions` (the longest row a run trains). Llama-3.1-8B adds LLAMA_8B_EXTRA (its RoPE, eps)."""
    from transformers import AutoConfig, LlamaConfig

    from train.plan_shape import KNOWN_BASES

    if tiny:
        return LlamaConfig(**LLAMA_TINY, **TOKEN_IDS)
    key = resolve_base(base)
    if key is None:
        raise ValueError(f"unknown base {base!r}; known: {', '.join(KNOWN_BASES)}")
    fields = dict(KNOWN_BASES[key])
    fields["max_position_embeddings"] = max(fields.get("max_position_embeddings") or 0, positions)
    extra = LLAMA_8B_EXTRA if key == DEFAULT_BASE else {}
    return AutoConfig.for_model(fields.pop("model_type"), **fields, **extra, **TOKEN_IDS)


def matmul_params(cfg) -> int:
    """Weights of every Linear (what the 6N FLOP count multiplies): attention, MLP (fused or not), lm_head, from
    the meta-device model, so every family's widths (head_dim, fused projections) count as built; a tied
    lm_head is one Linear over the embedding matrix: h x vocab, once."""
    import torch

    from train.model import meta_model

    return sum(m.weight.numel() for m in meta_model(cfg).modules() if isinstance(m, torch.nn.Linear))


def linear_names(cfg) -> list[str]:
    """The Linear layers' leaf names but the output embedding's, in model order (q_proj, ..., down_proj)."""
    import torch

    from train.model import meta_model

    meta = meta_model(cfg)
    head = meta.get_output_embeddings()
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n, m in meta.named_modules()
                              if isinstance(m, torch.nn.Linear) and m is not head))


def ensure_model(work: Path, tiny: bool, base: str = DEFAULT_BASE, positions: int = 0) -> tuple[Path, dict]:
    """Random bf16 weights of `base` (normal, std initializer_range, norms at their identity, biases 0, seeded)
    in HF format with the byte-level tokenizer, in WORK/model-<base>. config.json and the tokenizer are written
    every run (max_position_embeddings follows `positions`, the longest row); the weights once."""
    from train import tiny as tiny_mod

    target = work / model_dir_name(base, tiny)
    target.mkdir(parents=True, exist_ok=True)
    cfg = model_config(tiny, base, positions)
    cfg.save_pretrained(target)
    tok = tiny_mod.build_tokenizer()
    tok.model_max_length = cfg.max_position_embeddings  # rows reach 2048 tokens; silence the 1024 warning
    tok.save_pretrained(target)
    stamp = target / "bench_model.json"
    if stamp.is_file():
        return target, json.loads(stamp.read_text())
    info = {"base": "tiny" if tiny else base, **write_weights(target, cfg), "matmul_params": matmul_params(cfg)}
    stamp.write_text(json.dumps(info))
    return target, info


def norm_identity(module) -> float:
    """A norm weight's neutral value, as the module's own constructor sets it: 1, or 0 where the norm scales
    by 1 + weight (Gemma)."""
    import torch

    try:
        fresh = type(module)(1)
    except TypeError:  # a constructor that wants more than the width: the usual RMSNorm/LayerNorm value
        return 1.0
    weight = getattr(fresh, "weight", None)
    return float(weight.detach().reshape(-1)[0]) if isinstance(weight, torch.Tensor) else 1.0


def write_weights(target: Path, cfg) -> dict:
    """Every tensor of the model's state dict, drawn on the GPU when there is one, copied to the CPU and written
    shard by shard: no model object is ever built, so the write (16 GB for the 8B: ~30 s) is the whole cost.
    Norm weights at their identity, biases (Qwen2's q/k/v) 0, the rest normal(0, initializer_range); a tied
    lm_head is the embedding and is not written (transformers ties it on load)."""
    import torch
    from safetensors.torch import save_file

    from train.model import meta_model

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(SEED)
    std = getattr(cfg, "initializer_range", None) or 0.02  # transformers' usual default where a config has none
    files, shard, size, total, params = [], {}, 0, 0, 0

    def flush():  # one shard at a time: the host never holds the whole model
        files.append(f"part-{len(files) + 1}.safetensors")
        save_file(shard, str(target / files[-1]), metadata={"format": "pt"})
        return {}, 0

    meta, names, seen = meta_model(cfg), {}, set()
    for name, ref in meta.state_dict(keep_vars=True).items():
        if id(ref) in seen:  # tied: lm_head.weight is embed_tokens.weight
            continue
        seen.add(id(ref))
        shape = tuple(ref.shape)
        if name.endswith("norm.weight"):
            t = torch.full(shape, norm_identity(meta.get_submodule(name.rsplit(".", 1)[0])), dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            t = torch.zeros(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen).cpu()
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
    return {"arch": type(meta).__name__, "params": params, "bytes": total, "shards": len(files),
            "write_s": round(time.perf_counter() - t0, 1)}


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


def plan_settings(spec: str) -> list[tuple[int, int]]:
    """--plan-tokens "4x512,16x1024" -> [(4, 512), (16, 1024)]: B rows x L tokens per setting."""
    return [tuple(int(x) for x in item.lower().split("x")) for item in spec.split(",") if item.strip()]


def plan_check_ways(work: Path, spec: str, stacks: str = "ours") -> dict:
    """--plan-check: per "BxL" setting, B rows of exactly L tokens, one micro-batch a step (B*L tokens): way c
    ("ours" in `stacks`) and Unsloth on the same rows ("unsloth"). A long micro-batch (>= LONG_ROW_TOKENS) runs
    one step, timed from the start (its minutes dwarf the start-up); shorter ones 1 warm-up + 2 timed."""
    ways = {}
    for b, n in plan_settings(spec):
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
