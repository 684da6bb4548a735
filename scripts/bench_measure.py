"""What scripts/bench.py measures inside each way's process: step times, tokens, peak memory, the profile of one
step, and two correctness checks of a trained model (per-sequence losses; the fused QLoRA layer against fp32);
and the tables it prints from the results.

Only observation: a Trainer callback, and a wrapper around the data collator that counts what it returns. The
model, the loss and the optimizer step are the trainer's own. Imports are lazy, so the Unsloth way's process,
which runs its own transformers/TRL/peft, can use this module too.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from train import patches

# switches a training step reads afresh each time (train/fused_head.py, kernels/lean_recompute.py, liger_launch.py,
# step_walks.py, and kernels/launch.py's DIRECT, read at import, so the timer sets that attribute too):
# BENCH_ALTERNATE may flip one between the timed steps of one process
ALTERNATABLE = ("TRAIN_SYNC_FREE_HEAD", "TRAIN_LEAN_RECOMPUTE", "TRAIN_LIGER_RELAUNCH", "TRAIN_DIRECT_LAUNCH",
                "TRAIN_FLAT_WALKS")


def set_switch(name: str, value: str):
    """Turn an ALTERNATABLE switch to "1" or "0" for the next step."""
    os.environ[name] = value
    if name == "TRAIN_DIRECT_LAUNCH":  # read once at import: the module attribute is what each launch reads
        from train.kernels import launch
        launch.DIRECT = value == "1"

KERNEL_GROUPS = (  # first match wins: issue #21's kernel families, where the GPU time of one training step goes
    ("annotation (not a kernel)", ("Optimizer.step", "ProfilerStep", "##")),
    ("attention", ("flash", "fmha", "attention", "_efficient_attention", "sdpa")),
    ("NF4 dequant", ("dequant", "kDequantize")),
    ("optimizer + grad norm", ("kOptimizer", "multi_tensor_apply")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas", "wgmma", "ampere_")),
    ("LoRA dropout", ("dropout", "addcmul")),  # torch's dropout and the backward's mask-and-add
    ("norm/rope/swiglu (Liger)", ("_rms_norm", "_swiglu", "_rope")),
    ("elementwise/reduce/copy", ("elementwise", "vectorized", "reduce", "unrolled", "index", "copy", "cat",
                                 "memcpy", "memset", "fill")),
    ("loss and other Triton", ("triton", "liger", "_kernel")),
)
# our Triton kernels by exact name (train/kernels/_lora_triton.py, _nf4_triton.py): too short to match as substrings
EXACT_KERNELS = {"a_fwd": "LoRA dropout", "a_grad": "LoRA dropout", "x_grad": "LoRA dropout", "dequant": "NF4 dequant"}


def kernel_group(name: str) -> str:
    """The family of a profiled kernel (KERNEL_GROUPS, EXACT_KERNELS), "other" when none matches."""
    if name in EXACT_KERNELS:
        return EXACT_KERNELS[name]
    low = name.lower()
    return next((g for g, keys in KERNEL_GROUPS if any(k.lower() in low for k in keys)), "other")


def gpu_idle_ms(prof) -> float | None:
    """Time in the profiled step when no kernel or copy ran on the GPU (any stream): the host gaps, between the
    first and the last event the profiler recorded. None without GPU events."""
    from trace_gaps import union_us

    events = [e for e in prof.events() if getattr(e, "time_range", None) is not None]
    gpu = [(e.time_range.start, e.time_range.end) for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
    if not gpu:
        return None
    span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
    return round((span - union_us(gpu)) / 1e3, 1)


def versions(names=("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "liger_kernel",
                    "datasets", "unsloth", "unsloth_zoo")) -> dict:
    import importlib.metadata as md

    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def make_timer(warmup: int, steps: int, profile: bool = False, trace: str | None = None):
    """A TrainerCallback: step-end times with the process's CPU time, the Trainer's token count, logged losses, the peak
    memory of training. A step's end is a CUDA event recorded behind its work, read when training ends: timing does
    not make the host wait for the GPU each step, which training itself need not do (BENCH_STEP_SYNC=1: a device
    sync at each step end instead, the way runs before session 9 were timed). With `profile`, one more step after
    the timed ones runs under torch.profiler, synced at both ends; with `trace` too, that step's timeline is written
    there (Chrome trace, gzipped: which stream ran what when, where the GPU waited for the host). BENCH_SYNC_DEBUG=1
    lists every host-GPU sync from the last warm-up step's end to the first timed step's end (sync_recorder).
    BENCH_ALTERNATE=VAR (one of ALTERNATABLE) sets VAR to 1 for the warm-up steps and even timed steps, 0 for odd
    ones: an A/B inside one process, whose host speed is the same for both (between processes it moves by up to 2x,
    docs/benchmarks.md); summarize splits the timed steps by setting."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    step_sync = not cuda or os.environ.get("BENCH_STEP_SYNC") == "1"
    sync_debug = os.environ.get("BENCH_SYNC_DEBUG") == "1"
    alternate = os.environ.get("BENCH_ALTERNATE") or None
    if alternate is not None and alternate not in ALTERNATABLE:
        raise ValueError(f"BENCH_ALTERNATE={alternate}: only a switch read at every step can alternate: "
                         f"{', '.join(ALTERNATABLE)}")
    if alternate is not None:  # on from the start: the trainer, built after this, installs what =1 needs (the head's
        set_switch(alternate, "1")  # collator), and the warm-up steps run with it

    class Timer(TrainerCallback):
        def __init__(self):
            self.marks, self.losses, self.peak, self.reserved = [], [], 0, 0
            self.events = []  # a CUDA event at train begin and at each step end (not with step_sync)
            self.timing = "device sync at each step end" if step_sync else "CUDA events (no per-step sync)"
            self.profile_step = warmup + steps + 1 if profile else None
            self.prof, self.profile, self.syncs = None, None, None
            self.alternate, self.settings = alternate, []  # BENCH_ALTERNATE: each step's setting, in step order

        def on_train_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            self.mark(state)

        def mark(self, state):
            if cuda and not step_sync:
                self.events.append(torch.cuda.Event(enable_timing=True))
                self.events[-1].record()
            self.marks.append((state.global_step, time.perf_counter(), state.num_input_tokens_seen,
                               time.process_time()))

        def on_step_begin(self, args, state, control, **kw):
            if self.alternate:
                timed = state.global_step - warmup  # this step's place among the timed ones (< 0: warm-up)
                set_switch(self.alternate, "0" if timed >= 0 and timed % 2 else "1")
                self.settings.append(os.environ[self.alternate])
            if self.profile_step and state.global_step + 1 == self.profile_step:
                if cuda:
                    torch.cuda.synchronize()
                acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
                self.prof = torch.profiler.profile(activities=acts)
                self.prof.__enter__()
                self.prof_t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if self.syncs is not None:
                self.sync_sites = self.syncs()
                self.syncs = None
            if cuda and (step_sync or state.global_step == self.profile_step):
                torch.cuda.synchronize()
            self.mark(state)
            if cuda and sync_debug and state.global_step == warmup:  # one whole step, with the log at its start
                self.syncs = sync_recorder()
            if self.prof is not None and state.global_step == self.profile_step:
                wall = time.perf_counter() - self.prof_t0
                self.prof.__exit__(None, None, None)
                self.profile = profile_summary(self.prof, wall)
                if trace:
                    write_trace(self.prof, trace)
                self.prof = None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 4))

        def on_train_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
                self.peak, self.reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
            if self.events:  # each mark's time: train begin's wall time + the GPU's time since then
                t0 = self.marks[0][1]
                self.marks = [(s, t0 + self.events[0].elapsed_time(e) / 1e3, n, c)
                              for (s, _, n, c), e in zip(self.marks, self.events)]

    return Timer()


def sync_recorder():
    """Until the returned stop() is called, every CUDA operation that makes the host wait for the GPU (torch's sync
    debug mode) is recorded with the Python frames that called it; stop() returns the distinct call sites, most
    frequent first. Each one is a point where the host stops running ahead of the GPU."""
    import collections
    import traceback
    import warnings

    import torch

    sites: collections.Counter = collections.Counter()
    shown = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" not in str(message):
            return shown(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if "/warnings.py" not in f.filename][-6:]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames))] += 1

    catcher = warnings.catch_warnings()
    catcher.__enter__()
    warnings.simplefilter("always")
    warnings.showwarning = record
    torch.cuda.set_sync_debug_mode("warn")

    def stop():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("default")
        catcher.__exit__(None, None, None)
        return [f"{n}x {site}" for site, n in sites.most_common()]

    return stop


def write_trace(prof, path: str) -> None:
    """The profiled step's Chrome trace as PATH.gz (a few MB instead of tens)."""
    import gzip
    import shutil

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(path)
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    Path(path).unlink()


def count_batches(collate, log: list):
    """Wrap a data collator: per micro-batch, sequences, real and computed (incl. padding) tokens, row lengths.
    BENCH_SAME_BATCH=1: every micro-batch is the first one's examples again (the first this collator sees: the
    bench's ways evaluate nothing before training), so the steps of a BENCH_ALTERNATE A/B do the same work (session
    12: with each step its own packed batch, one switch alternated twice on one H100 gave =1/=0 of 0.869 and 1.001,
    and the same batch took 0.44-0.69 s in different processes)."""
    same = os.environ.get("BENCH_SAME_BATCH") == "1"
    first: list = []

    def wrapped(examples):
        if same:
            first[:] = first or [list(examples)]
            examples = first[0]
        out = collate(examples)
        ids = out["input_ids"]
        if "position_ids" in out and "attention_mask" not in out:  # padding-free: one row, positions restart
            seqs, real = int((out["position_ids"] == 0).sum()), int(ids.numel())
        else:
            seqs = int(ids.shape[0])
            real = int(out["attention_mask"].sum()) if "attention_mask" in out else int(ids.numel())
        log.append({"seqs": seqs, "real": real, "computed": int(ids.numel()),
                    "lens": sorted(len(e["input_ids"]) for e in examples)})
        return out

    return wrapped


def summarize(timer, log: list, accum: int, warmup: int, steps: int) -> dict:
    """The way's numbers. tok/s = real tokens the collator handed to the timed steps / their time (the same count for
    every stack; on a GPU the time between CUDA events behind the last warm-up step and the last timed step,
    make_timer); the Trainer's own num_input_tokens_seen is kept beside it as a cross-check.
    first_step_s is the first optimizer step (compilation, autotuning, allocator warm-up) on its own. timed_cpu_s is
    the process's CPU time (all threads) over the timed steps, and step_cpu_s per step."""
    marks = timer.marks
    if len(marks) <= warmup + 1:
        return {"error": f"only {len(marks) - 1} steps ran"}
    end = min(warmup + steps, len(marks) - 1)
    (_, t0, n0, c0), (step, t1, n1, c1) = marks[warmup], marks[end]
    per_step = [sum(b["real"] for b in log[i:i + accum]) for i in range(0, len(log), accum)]
    timed = log[warmup * accum:end * accum]
    real = sum(b["real"] for b in timed)
    computed = sum(b["computed"] for b in timed)
    source = "collator"
    if not real:  # a trainer that swapped our counting collator out: its own count (padding-free: every token)
        real, source = int(n1 - n0), "trainer"
    return {"timed_steps": step - warmup, "timed_s": round(t1 - t0, 3), "timed_cpu_s": round(c1 - c0, 3),
            "timed_tokens": real, "tokens_source": source,
            "tok_per_s": real / (t1 - t0), "trainer_timed_tokens": int(n1 - n0),
            "first_step_s": round(marks[1][1] - marks[0][1], 3),
            "step_s": [round(b[1] - a[1], 3) for a, b in zip(marks, marks[1:])], "losses": timer.losses,
            "step_cpu_s": [round(b[3] - a[3], 3) for a, b in zip(marks, marks[1:])],
            # None without CUDA
            "peak_alloc_gb": timer.peak / 1e9 or None, "peak_reserved_gb": timer.reserved / 1e9 or None,
            "profile": timer.profile, "sync_sites": getattr(timer, "sync_sites", None),
            "step_timing": getattr(timer, "timing", None),
            "seqs_per_step": [sum(b["seqs"] for b in timed[i:i + accum]) for i in range(0, len(timed), accum)],
            "pad_fraction": round(1 - real / computed, 4) if computed else None,
            # every micro-batch trained (warm-up, timed, profiled): the peak memory covers all of them
            "tokens_per_microbatch_max": max((b["computed"] for b in log[:(len(marks) - 1) * accum]), default=0),
            "first_step_lens": sorted(n for b in log[:accum] for n in b["lens"]),
            "step_real_tokens": per_step, "alternate": alternated(timer, per_step, warmup, end)}


# two-sided 95 % Student t quantiles by degrees of freedom (1-30); beyond, the normal's 1.96
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def alternated(timer, per_step: list, warmup: int, end: int) -> dict | None:
    """BENCH_ALTERNATE's split of the timed steps: per setting, its steps, their tokens and time, and tok/s; and
    `paired`, the =1 / =0 tok/s ratio of each =1 step against the =0 steps on either side, with its 95 % interval."""
    settings = getattr(timer, "settings", [])
    if not getattr(timer, "alternate", None) or len(settings) < end:
        return None
    out = {"switch": timer.alternate}
    secs = {i: timer.marks[i + 1][1] - timer.marks[i][1] for i in range(warmup, end)}
    for value in ("1", "0"):
        steps = [i for i in range(warmup, end) if settings[i] == value]
        tokens = sum(per_step[i] for i in steps if i < len(per_step))
        total = sum(secs[i] for i in steps)
        out[value] = {"steps": len(steps), "tokens": tokens, "s": round(total, 3),
                      "tok_per_s": round(tokens / total, 1) if total else None}
    rates = {i: per_step[i] / secs[i] for i in secs if i < len(per_step) and secs[i] > 0}
    out["paired"] = paired_interval([rates[i] / math.sqrt(rates[i - 1] * rates[i + 1]) for i in rates
                                     if i - 1 in rates and i + 1 in rates
                                     and settings[i] == "1" and settings[i - 1] == settings[i + 1] == "0"])
    return out


def paired_interval(ratios: list) -> dict | None:
    """The geometric mean of per-step ratios and its 95 % Student t interval (on their logs).

    Why each =1 step against the =0 steps on either side of it (the geometric mean of their tok/s): the host's speed
    moves within a process (session 12: the same batch took 0.44-0.69 s), and those three steps see nearly the same
    host, so a steady drift cancels, which the ratio of the two settings' totals keeps. Neighbouring ratios share a =0
    step, so the interval is a little narrower than it should be. An interval containing 1: not resolved."""
    if len(ratios) < 2:
        return None
    logs = [math.log(r) for r in ratios]
    mean, se = statistics.fmean(logs), statistics.stdev(logs) / math.sqrt(len(logs))
    df = len(logs) - 1
    half = (T95[df - 1] if df <= len(T95) else 1.96) * se
    low, high = math.exp(mean - half), math.exp(mean + half)
    return {"ratios": len(ratios), "ratio": round(math.exp(mean), 4), "low": round(low, 4), "high": round(high, 4),
            "resolved": not low <= 1.0 <= high}


def plan_prediction(cfg, tokens: int) -> dict:
    """What `train plan` predicts for a run's config: at `tokens` (the largest micro-batch the run made, to set
    against its measured peak; torch-visible part) and at the planner's worst case (every row at full length)."""
    from train import plan

    try:
        model_config = plan.plan_model_config(cfg.model)
        est, worst = plan.estimate(cfg, model_config, tokens=tokens), plan.estimate(cfg, model_config)
    except Exception as e:  # noqa: BLE001 - the measurement stands; say why there is no prediction
        return {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return {"tokens": tokens, "predicted_gb": plan.torch_allocated(est) / plan.GB, "total_gb": est["total"] / plan.GB,
            "worst_case_tokens": plan.micro_batch_tokens(cfg), "worst_case_gb": plan.torch_allocated(worst) / plan.GB}


def side_by_side(results: list[dict], labels: dict, order=()) -> str:
    """scripts/bench.py's summary: one column per way (ours first, then `order`), speed, memory, ratios to ours,
    `train plan`'s peak next to ours' measured one, and notes (errors, the per-sequence check)."""
    by = {r["way"]: r for r in results}
    cols = [w for w in dict.fromkeys([*order, *by]) if w in by]
    ours = by.get("c") or by.get("cpu-ours") or {}

    def ratio(key, r, inverse=False):
        a, b = ours.get(key), r.get(key)
        return f"{(b / a if inverse else a / b):.2f}x" if a and b else ""

    def plan_cell(r):
        p = r.get("plan") or {}
        if "predicted_gb" not in p:
            return p.get("error", "")[:60]
        meas = r.get("peak_alloc_gb")
        err = f" ({(p['predicted_gb'] - meas) / meas:+.1%})" if meas else ""
        return f"{p['predicted_gb']:.2f} at {p['tokens']:,} tokens{err}; worst case {p['worst_case_gb']:.1f}"

    lines = {
        "tok/s (steady state)": lambda r: f"{r['tok_per_s']:,.0f}",
        "ours / this (tok/s)": lambda r: ratio("tok_per_s", r),
        "peak GB (max_memory_allocated)": lambda r: f"{r['peak_alloc_gb']:.2f}",
        "this / ours (peak)": lambda r: ratio("peak_alloc_gb", r, inverse=True),
        "`train plan` peak GB": plan_cell,
        "first step s": lambda r: f"{r['first_step_s']:.1f}",
        "step s (timed)": lambda r: f"{r['timed_s'] / max(r['timed_steps'], 1):.2f}",
        "CPU s a step (process)": lambda r: f"{r['timed_cpu_s'] / max(r['timed_steps'], 1):.1f}",
        "MFU": lambda r: f"{100 * r['mfu']:.1f}%" if "mfu" in r else "",
        "seqs/step, pad %": lambda r: (f"{sum(r['seqs_per_step']) / max(len(r['seqs_per_step']), 1):.1f},"
                                       f" {100 * r['pad_fraction']:.0f}"),
        "loss, first steps": lambda r: ", ".join(f"{x:.3f}" for x in r["losses"][:4]),
        "step 1 rows = ours'": lambda r: "yes" if r["first_step_lens"] == ours.get("first_step_lens") else "no",
        "peak RSS GB (process)": lambda r: f"{r['peak_rss_gb']:.1f}",
    }
    head = ["| |" + "".join(f" {w}: {labels.get(w, w)} |" for w in cols), "|---|" + "---:|" * len(cols)]
    body = []
    for label, fn in lines.items():
        cells = []
        for w in cols:
            r = by[w]
            try:
                cells.append("error" if "error" in r and "tok_per_s" not in r else fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("")
        body.append(f"| {label} |" + "".join(f" {c} |" for c in cells))
    notes = [f"- {w}: {by[w]['error'][:300]}" for w in cols if "error" in by[w]]
    chk = ours.get("check") or {}
    if "pass" in chk:
        notes.append(f"- per-sequence check (c): {'pass' if chk['pass'] else 'FAIL'}: packed vs padded"
                     f" {chk['max_abs_packed_vs_padded']:.4f}, packed vs alone {chk['max_abs_packed_vs_alone']:.4f}"
                     f" nats (tolerance {chk['tolerance']:.3f}); cross-attention control"
                     f" {chk['max_abs_control_vs_alone']:.3f} ({'detected' if chk['control_detected'] else 'NOT detected'})")
    elif chk:
        notes.append(f"- per-sequence check (c): {chk.get('error')}")
    for w in cols:
        alt = by[w].get("alternate")
        if alt and alt["1"]["tok_per_s"] and alt["0"]["tok_per_s"]:
            pair = alt.get("paired")
            verdict = "" if not pair else (
                f"; each =1 step against its =0 neighbours: {pair['ratio']:.3f}, 95 % interval {pair['low']:.3f}-"
                f"{pair['high']:.3f} over {pair['ratios']} steps, "
                f"{'resolved' if pair['resolved'] else 'not resolved: it contains 1'}")
            notes.append(f"- {w}, {alt['switch']} alternating in one process: =1 {alt['1']['tok_per_s']:,.0f} tok/s over "
                         f"{alt['1']['steps']} steps, =0 {alt['0']['tok_per_s']:,.0f} over {alt['0']['steps']} "
                         f"(=1 / =0: {alt['1']['tok_per_s'] / alt['0']['tok_per_s']:.3f}{verdict})")
    return "\n".join(head + body + ([""] + notes if notes else []))


def cpu_table(results: list[dict], ctx: dict, labels: dict) -> str:
    """scripts/bench.py --cpu: the side-by-side table and the step-time ratio ours / plain (wall, CPU time)."""
    by = {r["way"]: r for r in results}
    text = [f"CPU: {ctx['model_dir']}, {ctx['batch']} x {ctx['seq_len']} tokens a step, {ctx['warmup']} warm-up +"
            f" {ctx['steps']} timed steps, {os.cpu_count()} cores", "", side_by_side(results, labels)]
    ours, plain = by.get("cpu-ours", {}), by.get("cpu-plain", {})
    if "timed_s" in ours and "timed_s" in plain:
        wall, cpu = (ours[k] / ours["timed_steps"] / (plain[k] / plain["timed_steps"])
                     for k in ("timed_s", "timed_cpu_s"))
        med = statistics.median(ours["step_s"][ctx["warmup"]:]) / statistics.median(plain["step_s"][ctx["warmup"]:])
        text += ["", f"step time ours / plain: {wall:.2f} (mean wall), {med:.2f} (median wall), {cpu:.2f} (process CPU"
                     f" time); below 1: ours is faster. Load average at the end {ours.get('loadavg')} /"
                     f" {plain.get('loadavg')}; steps (s): ours {ours['step_s']}, plain {plain['step_s']}"]
    return "\n".join(text)


def plan_check_table(results: list[dict], plan_ways: dict, tolerance: float) -> tuple[str, str]:
    """scripts/bench.py --plan-check: each setting's measured training peak against `train plan` at its B*L
    tokens; (table, verdict)."""
    rows = ["| setting | tokens | seen | measured GB | predicted GB | error | within |", "|---|---:|---:|---:|---:|---:|---|"]
    bad = []
    for name, way in plan_ways.items():
        r = next((x for x in results if x["way"] == name), {})
        p, meas = r.get("plan") or {}, r.get("peak_alloc_gb") or None
        seen, pred = r.get("tokens_per_microbatch_max"), p.get("predicted_gb")
        err = (pred - meas) / meas if meas and pred is not None and seen == way["tokens"] else None
        why = r.get("error") or p.get("error") or ("" if seen == way["tokens"] else f"saw {seen} tokens: void")
        ok = err is not None and abs(err) <= tolerance
        bad += [] if ok else [name]
        rows.append(f"| {name} | {way['tokens']:,} | {seen or ''} | {f'{meas:.3f}' if meas else 'n/a'} |"
                    f" {f'{pred:.3f}' if pred is not None else ''} | {f'{err:+.1%}' if err is not None else ''} |"
                    f" {why[:80] or ('yes' if ok else 'NO' if meas else 'n/a')} |")
    measured = any(x.get("peak_alloc_gb") for x in results)
    verdict = ("n/a (no CUDA peak measured here: predictions only)" if not measured else
               f"FAIL: {', '.join(bad)} not within {tolerance:.0%} (or no result)" if bad else
               f"PASS: all {len(rows) - 2} within {tolerance:.0%}")
    return "\n".join(rows + ["", verdict]), verdict


UNSLOTH_CLAIM = 342_733  # tokens in one Llama-3.1-8B QLoRA row on an 80 GB GPU, as Unsloth states it (issue #21)


def long_rows_table(results: list[dict], plan_ways: dict, claim: bool = True) -> str:
    """--plan-check --plan-unsloth: per row length, ours (tok/s, peak, plan) beside Unsloth (tok/s, peak), and the
    longest row each trained here, next to Unsloth's claim when `claim` (it is for Llama-3.1-8B only)."""
    by = {r["way"]: r for r in results}
    rows = ["| tokens | ours tok/s | ours peak GB | plan GB | Unsloth tok/s | Unsloth peak GB |",
            "|---:|---:|---:|---:|---:|---:|"]
    longest = {"ours": 0, "unsloth": 0}

    def cell(r, key, fmt):
        if not r:
            return "not run"
        return fmt.format(r[key]) if r.get(key) is not None else (r.get("error") or "n/a")[:40]

    for name, way in plan_ways.items():
        if way["kind"] != "ours":
            continue
        o, u = by.get(name), by.get(name.replace("plan-", "unsloth-", 1))
        for who, r in (("ours", o), ("unsloth", u)):
            if r and r.get("peak_alloc_gb") and not r.get("error"):
                longest[who] = max(longest[who], way["tokens"])
        pred = ((o or {}).get("plan") or {}).get("predicted_gb")
        rows.append(f"| {way['tokens']:,} | {cell(o, 'tok_per_s', '{:,.0f}')} | {cell(o, 'peak_alloc_gb', '{:.2f}')} |"
                    f" {f'{pred:.2f}' if pred is not None else ''} | {cell(u, 'tok_per_s', '{:,.0f}')} |"
                    f" {cell(u, 'peak_alloc_gb', '{:.2f}')} |")
    rows += ["", f"Longest row trained here: ours {longest['ours']:,} tokens, Unsloth {longest['unsloth']:,}"
             + (f" (Unsloth claims {UNSLOTH_CLAIM:,} on an 80 GB GPU)" if claim else "")]
    return "\n".join(rows)


def profile_summary(prof, wall_s: float) -> dict:
    """GPU time of the profiled step by kernel family, the host gaps (GPU idle), kernel launches, sync-like calls, top
    kernels and host ops."""
    groups: dict = {}
    kernels = []
    events = prof.key_averages()
    for evt in events:
        if "CUDA" not in str(getattr(evt, "device_type", "")):  # kernels only: CPU ops would count them twice
            continue
        dev = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0) or 0
        if dev <= 0:
            continue
        group = kernel_group(evt.key)
        groups[group] = groups.get(group, 0) + dev
        kernels.append((dev, evt.count, evt.key[:90], group))
    total = sum(v for g, v in groups.items() if not g.startswith("annotation"))
    kernels.sort(reverse=True)
    cpu_ops = sorted(((e.self_cpu_time_total, e.count, e.key[:80]) for e in events
                      if "CUDA" not in str(getattr(e, "device_type", ""))), reverse=True)
    launch = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    sync = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaEventSynchronize",
            "aten::item", "aten::_local_scalar_dense", "aten::nonzero")
    return {"wall_ms": round(wall_s * 1e3, 1), "gpu_busy_ms": round(total / 1e3, 1), "gpu_idle_ms": gpu_idle_ms(prof),
            "kernel_launches": sum(e.count for e in events if e.key in launch),
            "sync_like_calls": {e.key: e.count for e in events if e.key in sync},
            "groups_ms": {g: round(v / 1e3, 1) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "top": [f"{d / 1e3:8.1f} ms x{c:<5d} [{g}] {n}" for d, c, n, g in kernels[:20]],
            "top_cpu_self": [f"{t / 1e3:8.1f} ms x{c:<6d} {n}" for t, c, n in cpu_ops[:15]]}


def packing_check(trainer, ids_file: str, k: int = 8) -> dict:
    """Per-sequence mean loss of the same k rows through the trained model (eval mode, training autocast):
    alone (a batch of one: the ground truth), padded with an attention mask (way a's batching), and packed
    padding-free (one row, position_ids restart per sequence, cu_seq_lens: this project's batching). A negative
    control packs them with position_ids 0..T-1, which lets sequences attend to each other: the check must see
    that. Also the training loss path (TRL's fused LM head, Liger if on) on the packed batch against the
    token-weighted mean of the alone losses."""
    import torch
    import torch.nn.functional as F
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = trainer.model
    dev = next(p for p in model.parameters()).device
    ids = json.loads(open(ids_file).read())[:k]
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
        logits = model(**inputs).logits
        return logits[0] if inputs["input_ids"].shape[0] == 1 else logits

    def per_row(logits):
        return [ce(logits[s:e], torch.tensor(x)) for x, s, e in zip(ids, starts, starts[1:])]

    was_training = model.training
    model.eval()
    out = {"rows": k, "lens": lens}
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
        alone = [ce(fwd(input_ids=torch.tensor([x])), torch.tensor(x)) for x in ids]
        lg = fwd(**padded)
        pad = [ce(lg[i, :n], torch.tensor(x)) for i, (x, n) in enumerate(zip(ids, lens))]
        pk = per_row(fwd(**packed))
        flat = packed["input_ids"]
        bad = per_row(fwd(input_ids=flat, position_ids=torch.arange(flat.shape[1])[None]))
        del lg
        try:
            weights = [n - 1 for n in lens]
            loss = trainer.compute_loss(model, patches.prepare_inputs(trainer, dict(packed)))
            out["train_loss_packed"] = round(float(loss), 5)
            out["train_loss_ref"] = round(sum(a * w for a, w in zip(alone, weights)) / sum(weights), 5)
        except Exception as e:  # noqa: BLE001 - the per-sequence comparison stands without it
            out["train_loss_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    model.train(was_training)

    def maxdiff(a, b):
        return round(max(abs(x - y) for x, y in zip(a, b)), 5)

    out.update({"alone": [round(x, 5) for x in alone], "padded": [round(x, 5) for x in pad],
                "packed": [round(x, 5) for x in pk], "control_no_reset": [round(x, 5) for x in bad],
                "max_abs_packed_vs_padded": maxdiff(pk, pad), "max_abs_packed_vs_alone": maxdiff(pk, alone),
                "max_abs_padded_vs_alone": maxdiff(pad, alone), "max_abs_control_vs_alone": maxdiff(bad, alone)})
    tol = 2e-3 * max(alone) + 1e-2  # bf16: per-sequence losses of ~10 nats agree to ~1e-2 across kernels
    out["tolerance"] = round(tol, 5)
    out["pass"] = out["max_abs_packed_vs_padded"] <= tol and out["max_abs_packed_vs_alone"] <= tol
    out["control_detected"] = out["max_abs_control_vs_alone"] > tol
    return out


def fused_layer_check(model, tokens: int) -> dict:
    """One trained 4-bit LoRA layer of each shape, training mode, dropout on: forward + backward time of peft's
    layer and of the fused one (train/kernels/fused_lora.py). With the Triton dropout (or no dropout) also correctness:
    output and gradients against fp32 autograd over the same dequantized weight and the kernels' own mask
    (relative to the reference's largest value). torch's dropout mask cannot be replayed outside the layer, so
    with it only the times are compared (tests/test_fused_lora.py checks that path against peft on CPU)."""
    import torch

    from train.kernels import fused_lora, lora_kernels

    layers = {}
    for name, m in model.named_modules():  # one of each shape, with and without a bias (Qwen2's q/k/v have one)
        if isinstance(m, fused_lora.FusedLinear4bit):
            layers.setdefault((m.in_features, m.out_features, m.get_base_layer().bias is not None), (name, m))
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out, new_seed = {}, lora_kernels.new_seed
    for (n_in, n_out, has_bias), (name, layer) in layers.items():
        was = layer.training
        # the layer alone: a group member would compute its siblings too (train/kernels/lora_group.py), timing three
        # layers as one, and its unclaimed outputs would switch the model's groups off
        group = layer.__dict__.pop("_lora_group", None)
        layer.train()
        adapter = layer.active_adapters[0]
        a_w, b_w = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        p = getattr(layer.lora_A[adapter], "dropout_p", 0.0)
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(1, tokens, n_in, generator=g, device=dev, dtype=torch.bfloat16)
        dy = torch.randn(1, tokens, n_out, generator=g, device=dev, dtype=torch.bfloat16)
        ms, got = {}, None
        try:
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
        finally:
            layer.__class__ = fused_lora.FusedLinear4bit
            layer.train(was)
            if group is not None:
                layer.__dict__["_lora_group"] = group
            lora_kernels.new_seed = new_seed
        kernels = layer.triton_dropout and lora_kernels.usable(x.reshape(-1, n_in), a_w.to(torch.bfloat16))
        row = {"layer": name, "tokens": tokens, "dropout_path": "triton" if kernels else "torch",
               "ms_peft": ms["peft"], "ms_fused": ms["fused"]}
        out[f"{n_in}->{n_out}" + (" +bias" if has_bias else "")] = row
        if p > 0 and not kernels:
            continue
        base = layer.get_base_layer()
        dense = fused_lora._weight(base.weight, base.weight.quant_state, torch.float32)
        keep = (lora_kernels.keep_mask((tokens, n_in), got[4], p, dev).view(x.shape) if p > 0
                else torch.ones_like(x, dtype=torch.bool))
        xr, ar, br = (t.detach().float().requires_grad_(True) for t in (x, a_w, b_w))
        scale = layer.scaling[adapter]
        yr = xr @ dense.t() + scale * ((xr * keep / (1 - p)) @ ar.t()) @ br.t()
        if base.bias is not None:
            yr = yr + base.bias.detach().float()
        yr.backward(dy.float())
        row["max_rel_diff_vs_fp32"] = {k: float((f - r).abs().max() / r.abs().max().clamp_min(1e-12)) for k, f, r in
                                       zip(("out", "grad_x", "grad_A", "grad_B"), got[:4],
                                           (yr.detach(), xr.grad, ar.grad, br.grad))}
        del dense, xr, yr
    model.zero_grad(set_to_none=True)
    return out
