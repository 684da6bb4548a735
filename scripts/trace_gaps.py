"""Where the GPU waited for the host in one profiled training step: scripts/bench.py --profile WAY --trace writes
REPORT/trace-WAY.json.gz (torch.profiler's Chrome trace); this reads it and prints
  - each GPU stream's busy time (kernels, copies) and the union over streams, against the step's wall time;
  - the compute stream's idle time (gaps between its kernels), and how it is spread over the step (twentieths);
  - that idle time charged to the CPU op that launched the kernel ending each gap: the host work the GPU waited on;
  - the host time (inclusive, CPU) of the project's per-layer Functions and the optimizer step;
  - per host thread (the forward's, autograd's), the CPU ops' self time: where the host time goes, and by the
    us/call of plain ops (aten::view, aten::empty) how fast this host ran (session 6: 2x from one process to the next);
  - the GPU launches (kernels, memsets, copies) counted by who launched them: the nearest named Function or module op
    and the aten op inside it. A count does not depend on how fast the host ran, so two traces of the same batch
    compare exactly (session 14: what a change removed).
Usage: python scripts/trace_gaps.py TRACE.json.gz [...]
"""

from __future__ import annotations

import bisect
import collections
import gzip
import json
import sys

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_OPS = ("_QLoraGroup", "_QLoraGroupBackward",  # the fused layer (and, in older traces, its name before groups:)
            "_QLoraLinear", "_QLoraLinearBackward",
            "CheckpointFunction", "CheckpointFunctionBackward", "Optimizer.step#AdamW.step",
            "Optimizer.step#PagedAdamW.step", "aten::mm", "cuLaunchKernelEx", "cudaLaunchKernel")


def load(path: str) -> list[dict]:
    with gzip.open(path) if path.endswith(".gz") else open(path, "rb") as f:
        data = json.load(f)
    return [e for e in (data["traceEvents"] if isinstance(data, dict) else data) if e.get("ph") == "X"]


def union_us(intervals) -> float:
    total, cur = 0.0, None
    for s, e in sorted(intervals):
        if cur is None or s > cur[1]:
            total += (cur[1] - cur[0]) if cur else 0
            cur = [s, e]
        else:
            cur[1] = max(cur[1], e)
    return total + ((cur[1] - cur[0]) if cur else 0)


def launcher(kernel: dict, runtime: dict, ops: list[dict], starts: list[float]) -> str:
    """The innermost CPU op around the runtime call that launched `kernel` ("?" when the trace does not say)."""
    chain = launch_chain(kernel, runtime, ops, starts)
    return chain[-1] if chain else "?"


def launch_chain(kernel: dict, runtime: dict, ops: list[dict], starts: list[float]) -> list[str]:
    """The CPU ops around the runtime call that launched `kernel`, outermost first (among the 400 ops that started
    before it: deeper nesting is not looked for); [] when the trace does not say."""
    call = runtime.get(kernel.get("args", {}).get("correlation"))
    if call is None:
        return []
    i = bisect.bisect_right(starts, call["ts"]) - 1
    around = [ops[j] for j in range(i, max(-1, i - 400), -1)
              if ops[j].get("tid") == call.get("tid") and ops[j]["ts"] + ops[j]["dur"] >= call["ts"] + call["dur"]]
    return [o["name"] for o in sorted(around, key=lambda o: -o["dur"])]


def launch_owner(chain: list[str]) -> str:
    """`Function > aten op` for a launch chain: the innermost op that is not an aten op nor the autograd engine's
    wrapper (a Function, a module-level op such as torch_attn::_varlen_attn), and the outermost aten op inside it."""
    named = [i for i, n in enumerate(chain) if not n.startswith(("aten::", "autograd::engine"))]
    owner = chain[named[-1]] if named else "(top level)"
    inner = next((n for n in chain[(named[-1] + 1) if named else 0:] if n.startswith("aten::")), "")
    return f"{owner} > {inner}" if inner else owner


def print_launches(gpu: list[dict], runtime: dict, ops: list[dict], starts: list[float], top: int) -> None:
    """GPU launches by who launched them: count and GPU ms."""
    table = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        row = table[launch_owner(launch_chain(e, runtime, ops, starts))]
        row[0] += 1
        row[1] += e["dur"]
    print(f"  GPU launches (kernels, memsets, copies): {len(gpu)}; by launcher (count, GPU ms):")
    for name, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"    {name[:72]:<72} {n:6d} {us / 1e3:8.1f}")


def self_times(events: list[dict]) -> dict:
    """{thread id: {op name: [calls, self us]}} over the CPU ops: an op's time less that of the ops nested in it."""
    by_tid = collections.defaultdict(list)
    for e in events:
        if e.get("cat") == "cpu_op":
            by_tid[e.get("tid")].append(e)
    out = {}
    for tid, ops in by_tid.items():
        table, stack = collections.defaultdict(lambda: [0, 0.0]), []
        for e in sorted(ops, key=lambda e: (e["ts"], -e["dur"])):
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"]:
                stack.pop()
            if stack:
                table[stack[-1]["name"]][1] -= e["dur"]
            table[e["name"]][0] += 1
            table[e["name"]][1] += e["dur"]
            stack.append(e)
        out[tid] = dict(table)
    return out


def print_self_times(events: list[dict], top: int) -> None:
    tables = self_times(events)
    for tid, table in sorted(tables.items(), key=lambda kv: -sum(n for n, _ in kv[1].values()))[:2]:
        total = sum(us for _, us in table.values())
        print(f"  host thread {tid}: CPU ops' self time {total / 1e3:.1f} ms (calls, ms, us/call):")
        for name, (n, us) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"    {name[:48]:<48} {n:6d} {us / 1e3:8.1f} {us / n:8.1f}")


def report(path: str, top: int = 12) -> None:
    ev = load(path)
    gpu = [e for e in ev if e.get("cat") in GPU_CATS]
    host = [e for e in ev if e.get("cat") in ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver")]
    t0, t1 = min(e["ts"] for e in ev), max(e["ts"] + e["dur"] for e in ev)
    print(f"{path}: profiled step {(t1 - t0) / 1e3:.1f} ms wall")
    streams = collections.defaultdict(list)
    for e in gpu:
        streams[(e.get("tid"), e["cat"])].append((e["ts"], e["ts"] + e["dur"]))
    for (tid, cat), iv in sorted(streams.items(), key=lambda kv: -len(kv[1])):
        print(f"  stream {tid} {cat}: {len(iv)} events, busy {union_us(iv) / 1e3:.1f} ms")
    print(f"  GPU busy (union of streams): {union_us([(e['ts'], e['ts'] + e['dur']) for e in gpu]) / 1e3:.1f} ms")
    kernels = sorted((e for e in gpu if e["cat"] == "kernel"), key=lambda e: e["ts"])
    if not kernels:
        print("  no GPU kernels in this trace (a CPU run?): nothing waited for the host")
        return
    main = collections.Counter(e.get("tid") for e in kernels).most_common(1)[0][0]
    comp = [e for e in kernels if e.get("tid") == main]
    runtime = {e["args"].get("correlation"): e for e in host if e.get("cat") in ("cuda_runtime", "cuda_driver")
               and "args" in e}
    ops = sorted((e for e in host if e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"])
    starts = [e["ts"] for e in ops]
    charged, end, gaps = collections.Counter(), None, []
    for k in comp:
        if end is not None and k["ts"] > end:
            gaps.append((end, k["ts"]))
            charged[launcher(k, runtime, ops, starts)] += k["ts"] - end
        end = max(end or 0, k["ts"] + k["dur"])
    idle = sum(b - a for a, b in gaps)
    print(f"  compute stream idle between kernels: {idle / 1e3:.1f} ms ({len(gaps)} gaps; "
          f"{sum(b - a for a, b in gaps if b - a > 1000) / 1e3:.1f} ms in gaps over 1 ms)")
    width = (t1 - t0) / 20
    busy = [union_us([(max(s, t0 + i * width), min(e, t0 + (i + 1) * width)) for s, e in
                      ((k["ts"], k["ts"] + k["dur"]) for k in comp) if e > t0 + i * width and s < t0 + (i + 1) * width])
            / width for i in range(20)]
    print("  compute stream busy %, by twentieth of the step:", " ".join(f"{100 * b:.0f}" for b in busy))
    print("  idle charged to the op that launched the kernel after the gap (ms):")
    for name, us in charged.most_common(top):
        print(f"    {us / 1e3:8.1f}  {name[:80]}")
    incl = collections.defaultdict(lambda: [0, 0.0])
    for e in host:
        if e["name"] in HOST_OPS:
            incl[e["name"]][0] += 1
            incl[e["name"]][1] += e["dur"]
    print("  host time, inclusive (calls, ms, us/call):")
    for name in HOST_OPS:
        if name in incl:
            n, us = incl[name]
            print(f"    {name:<32} {n:6d} {us / 1e3:8.1f} {us / n:8.1f}")
    print_self_times(ev, top)
    print_launches(gpu, runtime, ops, starts, 2 * top)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for p in sys.argv[1:]:
        report(p)
