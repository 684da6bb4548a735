"""Where a training step's host time goes: a py-spy profile (`py-spy record --format raw`) of a bench run, summed by
the part of the step each sample was in and by function.

Why: on the default workload the step waits for the host (docs/benchmarks.md, session 10: the GPU was busy 383-404
ms of a 690-820 ms step), and torch.profiler's CPU view charges Python to whichever op runs next. py-spy samples the
Python stacks of every thread at a fixed rate and costs no code change. Its samples of the forward come from the
training step's thread; the backward's from the autograd engine's thread, whose Python frames start at a custom
autograd Function's backward (the checkpoint's recompute among them).

    long_context_check.sh spy       (records bench.py --ways c under py-spy, then runs this)
    python scripts/host_profile.py PROFILE.txt [--top 30]

A sample that sits in a device sync (a `.item()`, a boolean index) is the host waiting for the GPU, not host work:
the leaf function then shows the sync's Python line.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

STEP = "SFTTrainer.training_step"  # the training step's frames (the forward and TRL's loss; the backward's start)
BACKWARD = "BackwardCFunction.apply"  # the autograd thread inside a Python autograd Function's backward
WARMUP = ("_do_compile", "CheckpointOffload.reserve")  # Triton compiling, pinning slabs: first steps only
PARTS = ("forward", "backward", "engine", "step loop", "outside the step")  # engine: a thread with no Python frame
STEPS = PARTS[:4]  # the training loop's parts


def frame_name(frame: str) -> str:
    """`fn (path/file.py:123)` -> `fn (path/file.py)`: one name per function, whatever line was running."""
    return re.sub(r":\d+\)$", ")", frame.strip())


def parse(lines) -> list[tuple[list[str], int]]:
    """py-spy's raw format: `frame;frame;...;leaf count` per line (root first), process frames included."""
    samples = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            samples.append(([frame_name(f) for f in stack.split(";")], int(count)))
    return samples


def part(frames: list[str]) -> str | None:
    """Which part of training a stack is in; None for warm-up work (compiling, pinning)."""
    short = [f.split(" (")[0] for f in frames]
    if all(f.startswith("process ") for f in short):
        return "engine"  # the autograd engine's thread running C++ backward nodes (no Python on its stack)
    if any(any(w in f for w in WARMUP) for f in short):
        return None
    if STEP in short:
        return "backward" if any("backward" in f.lower() for f in short[short.index(STEP):]) else "forward"
    if BACKWARD in short:
        return "backward"
    if "Trainer._run_epoch" in short:
        return "step loop"  # the optimizer, gradient clipping, the next batch, logging
    return "outside the step"


def summarize(samples, top: int = 30) -> str:
    parts, inclusive, own = Counter(), {p: Counter() for p in PARTS}, {p: Counter() for p in PARTS}
    for frames, n in samples:
        where = part(frames)
        if where is None:
            continue
        parts[where] += n
        own[where][frames[-1]] += n
        for f in set(frames):
            inclusive[where][f] += n
    lines = ["| part | samples | share of the step's |", "|---|---:|---:|"]
    step = sum(parts[p] for p in STEPS) or 1
    for p in PARTS:
        lines.append(f"| {p} | {parts[p]:,} | {f'{100 * parts[p] / step:.1f} %' if p in STEPS else ''} |")
    for p in ("forward", "backward", "step loop"):
        total = parts[p] or 1
        lines += ["", f"**{p}**, top functions by time inside (inclusive) and as the running frame (own):", "",
                  "| inclusive | own | function |", "|---:|---:|---|"]
        # callers that every sample of the part passes through (the step's own frames) say nothing: left out
        names = [f for f, n in inclusive[p].most_common() if n < 0.995 * total and not f.startswith("process ")][:top]
        for f in names:
            lines.append(f"| {100 * inclusive[p][f] / total:.1f} % | {100 * own[p][f] / total:.1f} % | `{f[:110]}` |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="py-spy record --format raw output")
    ap.add_argument("--top", type=int, default=30, help="functions per part (default 30)")
    args = ap.parse_args(argv)
    with open(args.profile) as f:
        print(summarize(parse(f), args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
