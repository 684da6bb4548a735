#!/usr/bin/env python3
"""Throughput benchmark: one QLoRA workload trained by this project, by Unsloth and by TRL, side by side.

    python scripts/bench.py                            # GPU: ways c, unsloth, b, a
    python scripts/bench.py --ways c,a --steps 8 --profile c
    python scripts/bench.py --plan-check               # train/plan.py against measured peaks (2k/8k/16k tokens)
    python scripts/bench.py --plan-check --base Qwen/Qwen2.5-7B --plan-tokens 1x16384  # another family
    python scripts/bench.py --tiny                     # CPU smoke test of ways c, a, b: tiny Llama, 3 steps
    python scripts/bench.py --cpu --model /tmp/smollm2 # CPU: our fit step against a plain peft + bnb step

Workload (scripts/bench_workload.py; docs/benchmarks.md): Llama-3.1-8B's architecture with random bf16 weights on
local disk, NF4 + double quant + bf16 compute; LoRA r=16 alpha=32 dropout=0.05 on all linear layers; 1,500 rows
of random letters, lognormal token lengths (mean 400, sigma 1) capped at 2048; 16 sequences per optimizer step
(b packs rows into 2048-token bins, so its batch counts bins); paged_adamw_32bit, lr 2e-4 cosine, clip 0.3.

--base NAME (issue #20): the random model has another architecture of train.plan_shape.KNOWN_BASES instead
(Qwen/Qwen2.5-7B, google/gemma-2-9b, ...; case-insensitive, an instruct id means its base), written once to its own
folder WORK/model-<name> with the same tokenizer and rows; everything else stays as above. Our ways, the plan check
and the TRL ways follow the base (TRL gets the model's own attention: eager for Gemma 2); the Unsloth ways need
Llama's projection names (TARGETS) and refuse a base without them (Phi-3). Not with --tiny or --cpu.

Ways, each in its own process (clean peak memory, nothing leaks between ways):
  c        ours: `python -m train fit CONFIG` (train.cli.main: train.model.load_base, prepare_for_kbit,
           train.lora.wrap, train.trainer.build_trainer as a user runs them), observed by a callback only
  unsloth  Unsloth's FastLanguageModel and patched SFTTrainer, padding-free 16 rows a step, same LoRA settings,
           with its own packages (--unsloth-site; ../shared/tools/unsloth-wheels.sh) first on its PYTHONPATH.
           unsloth-nodrop: lora_dropout=0, which Unsloth's fast LoRA kernels need
  a        TRL defaults: SFTTrainer, pad to longest, sdpa, gradient checkpointing, batch 4 x accumulation 4
  b        TRL's best flags: a + packing (BFD bins of 2048) + use_liger_kernel

Reported (scripts/bench_measure.py): tok/s = real tokens of the timed steps / their wall time, the first step
apart, peak torch.cuda.max_memory_allocated, MFU (6N FLOP per token: forward, recompute, input-gradient backward),
the first losses; for c also `train plan`'s peak at its largest micro-batch, the per-sequence loss check (the same
8 rows alone, padded, packed) and the fused-layer check. The table and results.json name the base.

--memory-peak: for our ways (c, c-offload, c-resident and the --plan-check ways) the CUDA allocator's history over the first
timed optimizer step (torch.cuda.memory._record_memory_history), replayed by scripts/memory_peak.py to the moment of
most live bytes; what is live then, grouped by allocation site, lands in REPORT (else OUT)/memory-peak-WAY/
memory_peak.{md,json} and results.json. Needs CUDA: without it a one-line error, exit 2. Off, it costs nothing.

--cpu (issue #12): with a real model folder (--model), our fit step (fit's model pipeline, the Trainer that
train.trainer.build_trainer builds, real optimizer steps) against a plain peft + bitsandbytes NF4 loop on the same
batch (--batch x --seq-len; reentrant checkpointing, bf16 autocast, AdamW + our cosine schedule, clip 0.3, bf16
LoRA weights as TRL keeps them): step 1's losses agree, so both compute the same step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 790.0  # H100/H200 dense bf16, as measured on this workplace's machines
# = all-linear for Llama, Qwen2/3, Mistral and Gemma; the Unsloth ways refuse a base whose Linears differ (Phi-3)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

WAYS = {
    "c": dict(kind="ours", label="ours", desc="ours: python -m train fit with our defaults"),
    "c-offload": dict(kind="ours", label="ours, offload", sets=["train.offload_checkpoints=true"],
                      desc="ours with train.offload_checkpoints=true (auto, the default, is the same on a GPU)"),
    "c-resident": dict(kind="ours", label="ours, resident", sets=["train.offload_checkpoints=false"],
                       desc="ours with the checkpointed inputs kept on the GPU (issue #21: what offload costs)"),
    "unsloth": dict(kind="unsloth", label="Unsloth", dropout=0.05,
                    desc="Unsloth: FastLanguageModel + its SFTTrainer, padding-free 16 rows, same LoRA settings"),
    "unsloth-nodrop": dict(kind="unsloth", label="Unsloth, dropout 0", dropout=0.0,
                           desc="Unsloth with lora_dropout=0 (its fast LoRA kernels need it): not our LoRA settings"),
    "a": dict(kind="trl", label="TRL defaults", packing=False, liger=False,
              desc="TRL defaults: pad to longest, sdpa, GC, paged_adamw_32bit, 4x4"),
    "b": dict(kind="trl", label="TRL best", packing=True, liger=True,
              desc="TRL best flags: a + packing (BFD, 2048) + use_liger_kernel"),
    "cpu-ours": dict(kind="cpu-ours", label="ours", desc="CPU: fit's pipeline and train.trainer.build_trainer's Trainer"),
    "cpu-plain": dict(kind="cpu-plain", label="plain peft + bnb", desc="CPU: plain peft + bitsandbytes NF4 loop"),
}
DEFAULT_WAYS, TINY_WAYS = "c,unsloth,b,a", "c,a,b"
SIDE_BY_SIDE = ("c", "c-offload", "c-resident", "unsloth", "unsloth-nodrop", "a", "b")
PLAN_SETTINGS, PLAN_SETTINGS_TINY = "4x512,16x512,16x1024", "4x32,16x32,16x64"  # B rows x L tokens
PLAN_TOLERANCE = 0.10  # |predicted - measured| / measured at every setting (measured: +1.8..+5.0 %)


# --------------------------------------------------------------------------------------------
# The ways (each runs inside its own process: `bench.py --child WAY CTX`)


def run_ours(way: dict, ctx: dict) -> dict:
    """Way c: `python -m train fit CONFIG --set ...` in this process. fit builds its trainer through
    train.trainer.build_trainer; the wrapper only adds the timer and counts what the collator returns."""
    import train.trainer as trainer_mod
    from train import cli
    from bench_measure import (count_batches, fused_layer_check, make_timer, packing_check, plan_prediction,
                                     summarize)

    timer = make_timer(ctx["warmup"], ctx["steps"], ctx["profile"], trace_path(ctx))
    log: list = []
    seen: dict = {}
    build = trainer_mod.build_trainer

    def observed(cfg, *a, callbacks=(), **k):
        extra = [memory_recorder(ctx, log, cfg.train.grad_accum, seen)] if ctx.get("memory_peak") else []
        tr = build(cfg, *a, callbacks=[*callbacks, timer, *extra], **k)
        tr.data_collator = count_batches(tr.data_collator, log)
        seen.update(trainer=tr, cfg=cfg)
        return tr

    trainer_mod.build_trainer = observed
    out_dir = Path(ctx["work"]) / "runs" / ctx["way"]
    sets = [f"run.output_dir={out_dir}", f"train.max_steps={ctx['warmup'] + ctx['steps'] + ctx['profile']}",
            *way.get("sets", []), *ctx["sets"]]
    argv = ["fit", ctx["config"], "--overwrite", *[x for s in sets for x in ("--set", s)]]
    try:
        rc = cli.main(argv)
    finally:  # a run that failed in the recorded step (an OOM, say) still gets its analysis
        if "recorder" in seen:
            seen["recorder"].finish()
    rec = seen.get("recorder")
    mem = {"memory_peak": rec.summary or {"error": f"step {ctx['warmup'] + 1} was not recorded"}} if rec else {}
    if rc != 0 or "trainer" not in seen:
        return {"error": f"python -m train {' '.join(argv)} exited {rc}", **mem}
    tr, cfg = seen["trainer"], seen["cfg"]
    res = {**summarize(timer, log, cfg.train.grad_accum, ctx["warmup"], ctx["steps"]), **mem}
    if "error" in res:
        return res
    res.update(attn=tr.model.config._attn_implementation, padding_free=bool(tr.args.padding_free),
               embed_dtype=str(tr.model.get_input_embeddings().weight.dtype))
    res["plan"] = plan_prediction(cfg, res["tokens_per_microbatch_max"])
    for key, check, wanted in (("check", lambda: packing_check(tr, ctx["ids_file"]), way.get("check", True)),
                               ("fused_layers", lambda: fused_layer_check(tr.model, res["tokens_per_microbatch_max"]),
                                ctx["way"] == "c")):
        if wanted:
            try:
                res[key] = check()
            except Exception as e:  # noqa: BLE001 - the timing result stands on its own
                res[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return res


def memory_recorder(ctx: dict, log: list, accum: int, seen: dict):
    """--memory-peak: scripts/memory_peak.py's recorder of the first timed optimizer step (warm-up + 1), writing to
    REPORT (else OUT)/memory-peak-WAY; the step's tokens: its largest micro-batch (the collator's log holds the
    micro-batches in training order, the data loader's look-ahead after them)."""
    from memory_peak import make_recorder

    step = ctx["warmup"] + 1
    out_dir = Path(ctx.get("report") or ctx["out"]) / f"memory-peak-{ctx['way']}"
    rec = make_recorder(step, out_dir, lambda: max((b["computed"] for b in log[(step - 1) * accum:step * accum]),
                                                   default=0))
    seen["recorder"] = rec
    return rec


def run_trl(way: dict, ctx: dict) -> dict:
    """Ways a and b: the TRL SFTTrainer recipe as its docs show it, on our tokenizer's ids of the same rows."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from bench_measure import count_batches, make_timer, summarize
    from train.kernels.attention import own_attention

    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(ctx["model_dir"])
    attn = own_attention(AutoConfig.from_pretrained(ctx["model_dir"]))[0]  # sdpa; eager where it has none (Gemma 2)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        ctx["model_dir"], quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16),
        dtype=torch.bfloat16, attn_implementation=attn, device_map={"": 0} if cuda else None)
    load_s = time.perf_counter() - t0
    args = SFTConfig(
        output_dir=str(Path(ctx["work"]) / "runs" / ctx["way"]), per_device_train_batch_size=4,
        gradient_accumulation_steps=4, gradient_checkpointing=True,
        optim="paged_adamw_32bit" if cuda else "adamw_torch",
        bf16=True, use_cpu=not cuda, max_length=ctx["max_length"], learning_rate=2e-4, lr_scheduler_type="cosine",
        warmup_steps=0.03, max_grad_norm=0.3, max_steps=ctx["warmup"] + ctx["steps"] + ctx["profile"], logging_steps=1,
        save_strategy="no", report_to="none", seed=42, include_num_input_tokens_seen="non_padding", disable_tqdm=True,
        packing=way["packing"], use_liger_kernel=way["liger"] and cuda)
    timer = make_timer(ctx["warmup"], ctx["steps"], ctx["profile"], trace_path(ctx))
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    ds = Dataset.from_dict({"input_ids": json.loads(Path(ctx["ids_file"]).read_text())})
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora,
                         callbacks=[timer])
    log: list = []
    trainer.data_collator = count_batches(trainer.data_collator, log)
    trainer.train()
    res = summarize(timer, log, 4, ctx["warmup"], ctx["steps"])
    res.update(load_s=round(load_s, 1), attn=trainer.model.config._attn_implementation)
    return res


def run_unsloth(way: dict, ctx: dict) -> dict:
    """Unsloth on the same ids, model folder and LoRA settings, 16 rows per padding-free step. Runs in a process
    whose PYTHONPATH starts with Unsloth's own packages (its pinned TRL/peft/bitsandbytes, the image's
    transformers), never the project's; bench_measure imports nothing of the project."""
    import torch

    if not torch.cuda.is_available():
        return {"error": "Unsloth needs a CUDA GPU"}
    import unsloth  # noqa: F401 - first: it patches transformers, TRL and peft as it imports
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from unsloth import FastLanguageModel

    from bench_measure import count_batches, make_timer, summarize

    t0 = time.perf_counter()
    model, tok = FastLanguageModel.from_pretrained(model_name=ctx["model_dir"], max_seq_length=ctx["max_length"],
                                                   dtype=torch.bfloat16, load_in_4bit=True)
    load_s = time.perf_counter() - t0
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=way["dropout"], bias="none",
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=42, max_seq_length=ctx["max_length"])
    timer = make_timer(ctx["warmup"], ctx["steps"], ctx["profile"], trace_path(ctx))
    ds = Dataset.from_dict({"input_ids": json.loads(Path(ctx["ids_file"]).read_text())})
    kw = dict(output_dir=str(Path(ctx["work"]) / "runs" / ctx["way"]), per_device_train_batch_size=way.get("batch", 16),
              gradient_accumulation_steps=1, padding_free=True, optim="paged_adamw_32bit", bf16=True,
              learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.03, max_grad_norm=0.3, seed=42,
              max_steps=ctx["warmup"] + ctx["steps"] + ctx["profile"], logging_steps=1, save_strategy="no",
              report_to="none", include_num_input_tokens_seen="all", disable_tqdm=True)
    try:  # rows are already <= max_length; TRL refuses max_length with padding_free and no packing
        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=None, **kw), train_dataset=ds,
                             processing_class=tok, callbacks=[timer])
    except (ValueError, TypeError) as e:  # an Unsloth that wants its cap: give it the same one
        print(f"[bench] unsloth: retrying with max_length={ctx['max_length']} ({e})", flush=True)
        trainer = SFTTrainer(model=model, args=SFTConfig(max_length=ctx["max_length"], **kw), train_dataset=ds,
                             processing_class=tok, callbacks=[timer])
    log: list = []
    trainer.data_collator = count_batches(trainer.data_collator, log)
    trainer.train()
    res = summarize(timer, log, 1, ctx["warmup"], ctx["steps"])
    quant = getattr(model.config, "quantization_config", None)
    quant = quant.to_dict() if hasattr(quant, "to_dict") else quant
    res.update(load_s=round(load_s, 1), padding_free=bool(trainer.args.padding_free), lora_dropout=way["dropout"],
               attn=getattr(model.config, "_attn_implementation", None), gradient_checkpointing="unsloth",
               quant={k: (quant or {}).get(k) for k in ("quant_method", "bnb_4bit_quant_type",
                                                        "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype")})
    return res


def run_cpu_ours(way: dict, ctx: dict) -> dict:
    """Our fit step on CPU: fit's model pipeline (train/fit.py step 3) and the Trainer build_trainer makes."""
    from datasets import Dataset
    from transformers import set_seed

    from train import lora, model as model_mod, trainer as trainer_mod
    from bench_measure import count_batches, make_timer, summarize
    from train.config import load_config

    cfg = load_config(None, [  # our defaults; the batch and the step count set
        f"model.name_or_path={ctx['model_dir']}", f"data.train={ctx['ids_file']}", f"data.max_length={ctx['seq_len']}",
        f"train.batch_size={ctx['batch']}", "train.grad_accum=1", f"train.max_steps={ctx['warmup'] + ctx['steps']}",
        f"run.output_dir={Path(ctx['work']) / 'runs' / 'cpu-ours'}", "train.save_every=100000", "train.resume=never",
        *ctx["sets"]])
    path = model_mod.resolve_model_path(cfg.model)
    tok = model_mod.load_tokenizer(path, cfg.model)
    t0 = time.perf_counter()
    base = model_mod.prepare_for_kbit(model_mod.load_base(cfg, path), cfg)
    base.config.use_cache = False  # as fit
    set_seed(cfg.run.seed)
    peft_model = lora.wrap(base, cfg.lora)
    load_s = time.perf_counter() - t0
    rows = json.loads(Path(ctx["ids_file"]).read_text())
    run = Path(cfg.run.output_dir)
    run.mkdir(parents=True, exist_ok=True)
    timer = make_timer(ctx["warmup"], ctx["steps"])
    tr = trainer_mod.build_trainer(cfg, peft_model, tok, Dataset.from_dict({"input_ids": rows, "labels": rows}),
                                   None, run, callbacks=[timer])
    log: list = []
    tr.data_collator = count_batches(tr.data_collator, log)
    tr.train()
    lora_dtype = str(next(p.dtype for p in tr.model.parameters() if p.requires_grad))
    return {**summarize(timer, log, 1, ctx["warmup"], ctx["steps"]), "load_s": round(load_s, 1),
            "optimizer": tr.args.optim, "lora_dtype": lora_dtype}


def run_cpu_plain(way: dict, ctx: dict) -> dict:
    """The same step written by hand with peft and bitsandbytes: no Trainer, no project code."""
    import math
    import types

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_cosine_schedule_with_warmup

    from bench_measure import summarize

    t0 = time.perf_counter()
    nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(ctx["model_dir"], dtype=torch.bfloat16, attn_implementation="sdpa",
                                                 quantization_config=nf4)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    torch.manual_seed(42)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(torch.bfloat16)  # TRL's cast for a quantized base: the same dtypes as ours
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    total = ctx["warmup"] + ctx["steps"]
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.03 * total), total)  # ours: cosine, 3 % warm-up
    load_s = time.perf_counter() - t0
    batch = torch.tensor(json.loads(Path(ctx["ids_file"]).read_text()))
    model.train()
    timer = types.SimpleNamespace(marks=[(0, time.perf_counter(), 0, time.process_time())], losses=[], peak=0,
                                  reserved=0, profile=None)
    for step in range(1, total + 1):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        timer.losses.append(round(float(loss.detach()), 4))
        timer.marks.append((step, time.perf_counter(), step * batch.numel(), time.process_time()))
    rows, n = batch.shape
    log = [{"seqs": rows, "real": rows * n, "computed": rows * n, "lens": [n] * rows} for _ in timer.marks[1:]]
    return {**summarize(timer, log, 1, ctx["warmup"], ctx["steps"]), "load_s": round(load_s, 1),
            "optimizer": "torch AdamW"}


def trace_path(ctx: dict) -> str | None:
    """--trace: where this way's profiled step writes its timeline (REPORT or OUT/trace-WAY.json.gz)."""
    if not ctx.get("trace"):
        return None
    return str(Path(ctx["report"] or ctx["out"]) / f"trace-{ctx['way']}.json")


RUNNERS = {"ours": run_ours, "trl": run_trl, "unsloth": run_unsloth, "cpu-ours": run_cpu_ours,
           "cpu-plain": run_cpu_plain}


def child(name: str, ctx_file: Path) -> int:
    ctx = json.loads(ctx_file.read_text())
    way = dict(WAYS.get(name) or ctx["plan_ways"][name])
    ctx.update(way=name, profile=int(name in ctx["profile_ways"]),
               **{k: way[k] for k in ("warmup", "steps", "ids_file", "max_length") if k in way})
    t0 = time.perf_counter()
    try:
        res = RUNNERS[way["kind"]](way, ctx)
    except Exception as e:  # noqa: BLE001 - report it in the table, keep the other ways
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    import resource

    import torch

    from bench_measure import versions

    res.update(way=name, desc=way["desc"], base=ctx.get("base"), warmup=ctx["warmup"],
               process_s=round(time.perf_counter() - t0, 1),
               versions=versions(), peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
               loadavg=[round(x, 1) for x in os.getloadavg()])
    if "tok_per_s" in res and torch.cuda.is_available():
        res["mfu"] = res["tok_per_s"] * 6 * ctx["matmul_params"] / (PEAK_TFLOPS * 1e12)
    (Path(ctx["out"]) / f"way-{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return 0


def run_child(name: str, way: dict, ctx: dict, ctx_file: Path, left: float | None) -> dict:
    """One way in its own process; its result JSON, or why there is none. Unsloth's process gets only its own
    package folder and this repo on PYTHONPATH (the project's .site would shadow the versions it pins)."""
    out = Path(ctx["out"]) / f"way-{name}.json"
    out.unlink(missing_ok=True)
    print(f"[bench] way {name}: {way['desc']}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.setdefault("TQDM_DISABLE", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # every way reads local files only
    cwd = None
    if way["kind"] == "unsloth":
        site = Path(ctx["unsloth_site"])
        if not site.is_dir():
            return {"way": name, "error": f"no Unsloth packages at {site}: build them with ../shared/tools/"
                    f"unsloth-wheels.sh, pip install --no-deps --target {site} .unsloth-wheels/*.whl (or --unsloth-site)"}
        env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT)])
        cwd = ctx["work"]  # its compile cache (unsloth_compiled_cache/) lands there, not in the repo
    try:
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", name, str(ctx_file)], env=env,
                       cwd=cwd, check=False, timeout=left - 5 if left else None)
    except subprocess.TimeoutExpired:
        return {"way": name, "error": "timed out (budget)"}
    return json.loads(out.read_text()) if out.is_file() else {"way": name, "error": "child wrote no result"}


# --------------------------------------------------------------------------------------------


def pick_base(args, ways: list[str]) -> tuple[str | None, list[str], str | None]:
    """(the KNOWN_BASES id --base names, the ways to run, an error line or None). None for --tiny and --cpu,
    which bring their own model. Unsloth's ways take TARGETS (Llama's projection names): a base whose Linear
    layers are named otherwise (Phi-3's fused qkv_proj) drops them from the default ways and refuses them
    when asked for."""
    import bench_workload as wl

    if args.base is not None and (args.tiny or args.cpu):
        return None, ways, "--base picks the GPU workload's architecture; --tiny and --cpu bring their own model"
    if args.tiny or args.cpu:
        return None, ways, None
    from train.plan_shape import KNOWN_BASES

    base = wl.resolve_base(args.base or wl.DEFAULT_BASE)
    if base is None:
        return None, ways, f"--base: unknown base {args.base!r}; known: {', '.join(KNOWN_BASES)}"
    if base == wl.DEFAULT_BASE:
        return base, ways, None
    names = wl.linear_names(wl.model_config(base=base))
    unsloth = [w for w in ways if WAYS[w]["kind"] == "unsloth"] + (["--plan-stacks unsloth"] if args.plan_check
                                                                    and "unsloth" in args.plan_stacks else [])
    if not unsloth or set(names) == set(TARGETS):
        return base, ways, None
    why = f"its Linear layers are {', '.join(names)}, not Unsloth's targets here ({', '.join(TARGETS)})"
    if args.ways is None and not args.plan_check:
        print(f"[bench] {base}: no Unsloth way ({why})", flush=True)
        return base, [w for w in ways if WAYS[w]["kind"] != "unsloth"], None
    return None, ways, f"--base {base}: {', '.join(unsloth)} cannot run ({why}); leave Unsloth out"


def memory_peak_refusal(args, ways: list[str]) -> str | None:
    """--memory-peak: why it cannot run here (no CUDA; no way of ours on the GPU to record), or None."""
    if not args.memory_peak:
        return None
    import torch

    if not torch.cuda.is_available():
        return "--memory-peak records the CUDA allocator and needs a GPU (torch.cuda.is_available() is False)"
    if args.cpu or not ((args.plan_check and "ours" in args.plan_stacks) or any(WAYS[w]["kind"] == "ours"
                                                                                for w in ways)):
        return "--memory-peak records our ways (c, c-offload, c-resident, --plan-check); none of them is asked for"
    return None


def model_line(args, ctx: dict) -> str:
    """The table's first line: which model every way trained."""
    if args.cpu:
        return f"Model: {ctx['model_dir']}"
    if args.tiny:
        return "Model: tiny Llama (CPU smoke test), random weights"
    return f"Model: {ctx['base']}'s architecture, random bf16 weights ({ctx['model_dir']})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test of the GPU ways: tiny Llama, 3 steps")
    p.add_argument("--cpu", action="store_true", help="CPU: our fit step vs a plain peft + bitsandbytes step (--model)")
    p.add_argument("--model", help="--cpu: a model folder (config.json, weights, tokenizer), e.g. /tmp/smollm2")
    p.add_argument("--base", help="the random model's architecture, from train.plan_shape.KNOWN_BASES, e.g.\n"
                   "Qwen/Qwen2.5-7B, google/gemma-2-9b (default meta-llama/Llama-3.1-8B); not with --tiny/--cpu")
    p.add_argument("--batch", type=int, default=16, help="--cpu: rows per step (default 16)")
    p.add_argument("--seq-len", type=int, default=182, help="--cpu: tokens per row (default 182)")
    p.add_argument("--ways", help=f"comma-separated from {', '.join(w for w in WAYS if not w.startswith('cpu'))}"
                   f" (default {DEFAULT_WAYS}; --tiny {TINY_WAYS})")
    p.add_argument("--work", default="/tmp/qlora-bench", help="model, data and run directories")
    p.add_argument("--out", help="per-way results directory (default WORK/results)")
    p.add_argument("--report", help="also write results.json and table.md here after each way")
    p.add_argument("--warmup", type=int, help="untimed optimizer steps first (default 2; --tiny, --cpu 1)")
    p.add_argument("--steps", type=int, help="timed optimizer steps (default 6; --tiny 2; --cpu 3)")
    p.add_argument("--rows", type=int, help="data rows (default 1500; --tiny 300)")
    p.add_argument("--profile", default="", help="comma-separated ways to profile one extra (untimed) step of")
    p.add_argument("--trace", action="store_true", help="--profile ways also write their profiled step's timeline\n"
                   "(REPORT/trace-WAY.json.gz, Chrome trace: open in Perfetto)")
    p.add_argument("--budget-s", type=float, help="start no way after this many seconds")
    p.add_argument("--prepare", action="store_true", help="write the model and data these arguments need, then stop\n"
                   "(long_context_check.sh prepare: the issue run's inputs in a call of their own)")
    p.add_argument("--plan-first", action="store_true", help="run the --plan-check ways before --ways: a long row\n"
                   "gets the most of --budget-s (a 350K-token step takes minutes)")
    p.add_argument("--plan-check", action="store_true", help="train/plan.py against measured peaks: way c at fixed\n"
                   "micro-batches (--plan-tokens); only this unless --ways is given too")
    p.add_argument("--plan-stacks", default="ours", help="--plan-check: ours, unsloth or ours,unsloth (Unsloth on\n"
                   "the same rows after each setting: the long-row ladder side by side, issue #21)")
    p.add_argument("--plan-tokens", help=f"BxL settings (default {PLAN_SETTINGS}; --tiny {PLAN_SETTINGS_TINY})")
    p.add_argument("--memory-peak", action="store_true", help="our ways (c, c-offload, c-resident, --plan-check): record the CUDA\n"
                   "allocator over the first timed step and list what is live at its peak by allocation site\n"
                   "(REPORT or OUT/memory-peak-WAY/memory_peak.md); needs CUDA; the step's timings include it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for our ways (c, plan-*, cpu-ours), e.g. lora.kernel=fused_triton")
    p.add_argument("--unsloth-site", default="/tmp/unsloth-site", help="Unsloth's package folder (pip --target)")
    p.add_argument("--child", nargs=2, metavar=("WAY", "CTX"), help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.child:
        return child(args.child[0], Path(args.child[1]))
    start = time.perf_counter()
    if args.cpu and not args.model:
        p.error("--cpu needs --model PATH (a model folder, e.g. /tmp/smollm2)")
    ways = ["cpu-ours", "cpu-plain"] if args.cpu else (args.ways or ("" if args.plan_check else (
        TINY_WAYS if args.tiny else DEFAULT_WAYS))).split(",")
    ways = [w for w in ways if w]
    if bad := [w for w in ways if w not in WAYS]:
        p.error(f"unknown way(s) {bad}; choose from {', '.join(WAYS)}")
    base, ways, why = pick_base(args, ways)
    why = why or memory_peak_refusal(args, ways)
    if why:
        print(f"bench.py: error: {why}", file=sys.stderr)
        return 2
    ctx, meta = context(args, base)
    ctx_file = Path(ctx["work"]) / "bench_ctx.json"
    ctx_file.write_text(json.dumps(ctx))
    if args.prepare:
        print(f"[bench] prepared in {time.perf_counter() - start:.0f} s: {ctx['work']}", flush=True)
        return 0
    results = run_ways(args, ways, ctx, ctx_file, meta, start)
    meta["total_s"] = round(time.perf_counter() - start, 1)
    print(f"\n{meta['device']}; {json.dumps(meta['versions'])}\n{write_report(args, ctx, meta, results)}")
    return 0


def context(args, base: str | None) -> tuple[dict, dict]:
    """(what every way's child reads: directories, step counts, the model and data, written here once; the run's
    metadata for results.json)."""
    import torch

    import bench_workload as wl
    from bench_measure import versions

    small = args.tiny or args.cpu
    work = Path(args.work).resolve()
    out = Path(args.out).resolve() if args.out else work / "results"
    for d in (work, out):
        d.mkdir(parents=True, exist_ok=True)
    ctx = {"work": str(work), "out": str(out), "warmup": args.warmup if args.warmup is not None else (1 if small else 2),
           "steps": args.steps if args.steps is not None else (3 if args.cpu else 2 if args.tiny else 6),
           "profile_ways": [w for w in args.profile.split(",") if w],
           "unsloth_site": str(Path(args.unsloth_site).resolve()),
           "plan_ways": {}, "max_length": 256 if args.tiny else 2048, "sets": args.set,
           "memory_peak": args.memory_peak, "trace": args.trace,
           "report": str(Path(args.report).resolve()) if args.report else None,
           "base": base or ("tiny Llama" if args.tiny else args.model)}  # results name the model every way trained
    meta = {"date": time.strftime("%Y-%m-%d"), "versions": versions(), "command": " ".join(["python", *sys.argv]),
            "train_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("TRAIN_")},  # staged switches
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "base": ctx["base"]}
    spec = args.plan_tokens or (PLAN_SETTINGS_TINY if args.tiny else PLAN_SETTINGS)
    if args.cpu:
        ids = wl.cpu_batch(args.model, args.batch, args.seq_len)
        ids_file = work / f"cpu-batch-{args.batch}x{args.seq_len}.json"
        ids_file.write_text(json.dumps(ids))
        ctx.update(model_dir=str(Path(args.model).resolve()), ids_file=str(ids_file), batch=args.batch,
                   seq_len=args.seq_len, matmul_params=0)
    else:
        longest = max([ctx["max_length"], *(n for _, n in wl.plan_settings(spec) if args.plan_check)])
        model_dir, info = wl.ensure_model(work, args.tiny, base or wl.DEFAULT_BASE, positions=longest)
        data_file, ids_file, stats = wl.ensure_data(work, args.tiny, args.rows or (300 if args.tiny else 1500))
        meta.update(model=info, data=stats)
        print(f"[bench] model {model_dir} ({info}), data {stats}", flush=True)
        config = wl.write_our_config(work, model_dir, data_file, ctx["max_length"], ctx["warmup"] + ctx["steps"])
        ctx.update(model_dir=str(model_dir), ids_file=str(ids_file), matmul_params=info["matmul_params"],
                   config=str(config))
    if args.plan_check:
        ctx["plan_ways"] = wl.plan_check_ways(work, spec, args.plan_stacks)
    return ctx, meta


def run_ways(args, ways: list[str], ctx: dict, ctx_file: Path, meta: dict, start: float) -> list[dict]:
    """Each way in its own child process, in order (the plan-check ways first with --plan-first), within --budget-s;
    the report is rewritten after each, so a run cut short keeps what it measured."""
    results: list[dict] = []
    plan_names = [k for k, w in ctx["plan_ways"].items() if not w.get("skip")]
    for name in [*plan_names, *ways] if args.plan_first else [*ways, *plan_names]:
        way = WAYS.get(name) or ctx["plan_ways"][name]
        left = None if args.budget_s is None else args.budget_s - (time.perf_counter() - start)
        res = ({"way": name, "error": f"skipped: {left:.0f}s of budget left"} if left is not None and left < 45
               else run_child(name, way, ctx, ctx_file, left))
        results.append(res)
        write_report(args, ctx, meta, results)
        print(f"[bench] {name}: " + json.dumps({k: res.get(k) for k in (
            "tok_per_s", "first_step_s", "peak_alloc_gb", "losses", "plan", "error")}, default=str), flush=True)
    return results


def write_report(args, ctx: dict, meta: dict, results: list[dict]) -> str:
    """results.json and table.md (in OUT, and REPORT when given) from the results so far; returns the table text."""
    import bench_workload as wl
    from bench_measure import cpu_table, long_rows_table, plan_check_table, side_by_side

    main_rows = [r for r in results if r["way"] not in ctx["plan_ways"]]
    labels = {w: v["label"] for w, v in WAYS.items()}
    table = cpu_table(main_rows, ctx, labels) if args.cpu else side_by_side(main_rows, labels, SIDE_BY_SIDE)
    env = " ".join(f"{k}={v}" for k, v in meta["train_env"].items())
    parts = [model_line(args, ctx) + (f"; environment: {env}" if env else "")] + ([table] if main_rows else [])
    doc = {"meta": meta, "results": results}
    if ctx["plan_ways"]:
        ours = {k: w for k, w in ctx["plan_ways"].items() if w["kind"] == "ours" and not w.get("skip")}
        text, doc["plan_check_verdict"] = plan_check_table(results, ours, PLAN_TOLERANCE)
        parts.append(f"Plan check (train/plan.py torch_allocated vs max_memory_allocated, tolerance "
                     f"{PLAN_TOLERANCE:.0%})\n\n{text}")
        # Unsloth's 342K-token claim is for Llama-3.1-8B: shown beside that base only
        claim = (args.base and wl.resolve_base(args.base) or wl.DEFAULT_BASE) == wl.DEFAULT_BASE
        parts.append(f"Long rows, ours and Unsloth side by side\n\n"
                     f"{long_rows_table(results, ctx['plan_ways'], claim=claim)}")
    parts += [f"Memory at the peak, {r['way']} (scripts/memory_peak.py)\n\n{r['memory_peak']['table']}"
              for r in results if "table" in (r.get("memory_peak") or {})]
    text = "\n\n".join(parts)
    for d in {Path(ctx["out"]), Path(args.report).resolve() if args.report else Path(ctx["out"])}:
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps(doc, indent=1, default=str))
        (d / "table.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
