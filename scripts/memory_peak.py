"""Owns scripts/bench.py --memory-peak: the CUDA allocator's history over one training step, replayed to the moment
the most bytes were live, and those bytes grouped by where they were allocated.

The snapshot is torch.cuda.memory._snapshot()'s dict (its docstring and torch/cuda/_memory_viz.py describe it):
`segments` (each with `device`, `address` and `blocks`: `address`, `size`, `requested_size`, `state`, `frames`)
and `device_traces` (per device, in time order: `action`, `addr`, `size`, `frames`, ...). Frames are innermost
first. Replay, as torch's MemoryViz.js (process_alloc_data) does it, with one difference:
  - a block is live from its `alloc` to its `free_requested`: the moment the allocator's own counters
    (allocated_bytes, requested_bytes, so torch.cuda.max_memory_allocated) stop counting it. MemoryViz frees at
    `free_completed`, which comes later only for a block still in use on another stream (record_stream);
  - blocks that were live before recording began (or before the ring buffer's oldest event): a `free_requested`
    with no `alloc` before it, and the snapshot's `active_allocated` blocks that no recorded `alloc` made;
  - sizes are the requested bytes trace events carry (the allocator rounds blocks up to 512 bytes, so
    max_memory_allocated runs slightly higher; the counter to match exactly is requested_bytes).
Every key is read with a default, so an older or newer snapshot with keys missing still replays.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import statistics
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = str(ROOT / "train") + "/"  # our code: frames under the repo's train/
LIBRARIES = ("transformers", "peft", "bitsandbytes", "liger_kernel", "trl")  # the next tier, before torch
# Ring buffer of the allocator's history. One 350K-token step of the 8B (32 layers, 22 MLP tiles of 16K tokens each
# run forward, recomputed and backward, 7 LoRA linears a layer) makes an estimated 300K allocations, i.e. ~900K
# events (alloc, free_requested, free_completed): about twice that, so the step fits. Each entry holds a Python stack
# (torch's docs: "several KB" an entry with C++ frames, which stacks="python" leaves out), a few GB of host RAM at
# the cap; past it the oldest entries are overwritten (the report estimates how many from the allocator's counters).
MAX_ENTRIES = 2_000_000
PICKLE_LIMIT = 40_000_000  # save the gzipped snapshot only below this (the device call returns what fits)
TOP_GROUPS = 25  # rows of the printed table; the rest is summed in one row
TOP_BLOCKS = 10  # the largest live blocks, with their stacks, in the JSON
STACK_DEPTH = 12  # frames kept per stack in the JSON
NO_FRAME = "autograd (no python frame)"  # allocated in the step by C++ with no Python on the stack (backward nodes)
GB = 1e9


def _events(snapshot: dict, device: int) -> list[dict]:
    traces = snapshot.get("device_traces") or []
    return list(traces[device]) if device < len(traces) else []


def _block(addr, size, frames, origin: str, index: int = -1) -> dict:
    return {"addr": addr, "size": int(size or 0), "frames": frames or [], "origin": origin, "index": index}


def _live_blocks_at_end(snapshot: dict, device: int):
    """(address, requested bytes, frames) of the snapshot's active_allocated blocks on `device`."""
    for seg in snapshot.get("segments") or []:
        if seg.get("device", device) != device:
            continue
        addr = seg.get("address", 0)
        for b in seg.get("blocks") or []:
            a = b.get("address", addr)  # older snapshots have no block address: the blocks tile the segment
            addr = a + b.get("size", 0)
            if b.get("state") == "active_allocated":
                frames = b.get("frames")
                if frames is None and b.get("history"):  # legacy format: frames in the block's history
                    frames = b["history"][0].get("frames")
                yield a, b.get("requested_size") or b.get("size", 0), frames


def initial_blocks(snapshot: dict, device: int = 0) -> dict:
    """The blocks live when the recorded window opened: freed in it with no alloc before, or live at the snapshot
    and allocated by no recorded event."""
    events = _events(snapshot, device)
    live, before = set(), {}
    for e in events:
        act, addr = e.get("action"), e.get("addr")
        if act == "alloc":
            live.add(addr)
        elif act == "free_requested":
            if addr in live:
                live.discard(addr)
            else:
                before[addr] = _block(addr, e.get("size"), e.get("frames"), "before the step, freed in it")
    for addr, size, frames in _live_blocks_at_end(snapshot, device):
        if addr not in live:
            before.setdefault(addr, _block(addr, size, frames, "before the step, live after it"))
    return before


def _replay(events: list[dict], initial: dict, stop: int | None = None) -> tuple:
    """Walk the events from `initial`: (peak bytes, index of the event that reached it or -1, live blocks after
    event `stop` (or at the end), bytes at the end, odd events). Odd: an alloc over a live address, a free of an
    unknown one (neither happens in a complete trace)."""
    live = dict(initial)
    total = sum(b["size"] for b in live.values())
    peak, peak_at, odd = total, -1, 0
    for i, e in enumerate(events):
        if stop is not None and i > stop:
            break
        act, addr = e.get("action"), e.get("addr")
        if act == "alloc":
            old = live.pop(addr, None)
            odd += old is not None
            total += int(e.get("size") or 0) - (old["size"] if old else 0)
            live[addr] = _block(addr, e.get("size"), e.get("frames"), "step", i)
        elif act == "free_requested":
            old = live.pop(addr, None)
            odd += old is None
            total -= old["size"] if old else 0
        if total > peak:
            peak, peak_at = total, i
    return peak, peak_at, live, total, odd


def replay(snapshot: dict, device: int = 0) -> dict:
    """The moment of most live (requested) bytes on `device` and the blocks live then."""
    events = _events(snapshot, device)
    initial = initial_blocks(snapshot, device)
    peak, at, _, final, odd = _replay(events, initial)
    live = _replay(events, initial, stop=at)[2]
    return {"peak_bytes": peak, "peak_index": at, "events": len(events), "live": list(live.values()),
            "initial_bytes": sum(b["size"] for b in initial.values()), "final_bytes": final, "odd_events": odd,
            "peak_event": events[at] if at >= 0 else None}


def _package(filename: str) -> tuple[str | None, str]:
    """(the library or "torch" a frame's file belongs to, its path from that package's folder): the folder after
    site-packages (dist-packages), else the outermost folder of such a name (a source checkout)."""
    parts = filename.replace("\\", "/").split("/")
    cut = max((i + 1 for i, x in enumerate(parts[:-1]) if x in ("site-packages", "dist-packages")), default=None)
    for i in ([cut] if cut is not None else range(len(parts) - 1)):
        if parts[i] in LIBRARIES or parts[i] == "torch":
            return parts[i], "/".join(parts[i:])
    return None, filename


def _ours(filename: str) -> bool:
    return filename.startswith(OURS) or filename.startswith("train/")


def frame_text(f: dict) -> str:
    fn = f.get("filename", "?")
    short = fn[len(str(ROOT)) + 1:] if fn.startswith(OURS) else fn if _ours(fn) else _package(fn)[1]
    return f"{short}:{f.get('line', '?')} {f.get('name', '?')}"


def site(frames: list[dict]) -> str | None:
    """Where a block was allocated: the innermost frame in train/ (with the innermost library frame below it, if
    any: "train/x.py:12 f via transformers/...:34 g"), else in transformers/peft/bitsandbytes/liger_kernel/trl,
    else in torch, else the innermost frame; None without frames."""
    frames = frames or []
    pkgs = [_package(f.get("filename", ""))[0] for f in frames]
    ours = next((i for i, f in enumerate(frames) if _ours(f.get("filename", ""))), None)
    lib = next((i for i, p in enumerate(pkgs) if p in LIBRARIES), None)
    if ours is not None:
        via = f" via {frame_text(frames[lib])}" if lib is not None and lib < ours else ""
        return frame_text(frames[ours]) + via
    torch_i = next((i for i, p in enumerate(pkgs) if p == "torch"), None)
    for i in (lib, torch_i, 0 if frames else None):
        if i is not None:
            return frame_text(frames[i])
    return None


def label(block: dict, known: dict | None = None) -> str:
    """A live block's group: its allocation site; a block from before the step: what `known` (address -> name:
    parameters, optimizer state) calls it, else its site or its origin."""
    where = site(block["frames"])
    if block["origin"] == "step":
        return where or NO_FRAME
    name = (known or {}).get(block["addr"])
    return f"{block['origin']}: {name or where or 'allocated before recording'}"


def group(live: list[dict], unit: float | None, known: dict | None = None) -> list[dict]:
    """Live blocks by label, largest total first: count, GB, largest block, the median block in `unit`s."""
    by: dict[str, list[int]] = {}
    for b in live:
        by.setdefault(label(b, known), []).append(b["size"])
    rows = []
    for name, sizes in by.items():
        med = statistics.median(sizes)
        rows.append({"site": name, "blocks": len(sizes), "bytes": sum(sizes), "gb": sum(sizes) / GB,
                     "largest_gb": max(sizes) / GB, "median_bytes": med,
                     "x_hidden": med / unit if unit else None, "x_hidden_largest": max(sizes) / unit if unit else None})
    return sorted(rows, key=lambda r: -r["bytes"])


def _stack(frames: list[dict]) -> list[str]:
    return [frame_text(f) for f in (frames or [])[:STACK_DEPTH]]


def analyse(snapshot: dict, device: int = 0, tokens: int | None = None, hidden: int | None = None,
            known: dict | None = None) -> dict:
    """replay + group: the report memory_peak.json holds (without the torch counters the recorder adds)."""
    r = replay(snapshot, device)
    unit = float(tokens * hidden * 2) if tokens and hidden else None  # one [tokens, hidden] bf16 tensor
    groups = group(r["live"], unit, known)
    top = sorted(r["live"], key=lambda b: -b["size"])[:TOP_BLOCKS]
    ev = r["peak_event"]
    peak_event = {"action": ev.get("action"), "gb": (ev.get("size") or 0) / GB, "site": site(ev.get("frames")) or
                  NO_FRAME, "stack": _stack(ev.get("frames"))} if ev else None
    return {"device": device, "events": r["events"], "peak_bytes": r["peak_bytes"], "peak_gb": r["peak_bytes"] / GB,
            "peak_index": r["peak_index"], "initial_gb": r["initial_bytes"] / GB, "final_gb": r["final_bytes"] / GB,
            "odd_events": r["odd_events"], "live_blocks": len(r["live"]),
            "before_step_gb_at_peak": sum(b["size"] for b in r["live"] if b["origin"] != "step") / GB,
            "tokens": tokens, "hidden": hidden, "unit_gb": unit / GB if unit else None,
            "peak_event": peak_event,
            "groups_total": len(groups), "groups": groups[:TOP_GROUPS],
            "rest": {"groups": max(0, len(groups) - TOP_GROUPS), "gb": sum(g["gb"] for g in groups[TOP_GROUPS:])},
            "largest_blocks": [{"gb": b["size"] / GB, "x_hidden": b["size"] / unit if unit else None,
                                "group": label(b, known), "event": b["index"], "stack": _stack(b["frames"])}
                               for b in top]}


def _x(v) -> str:
    return f"{v:.2f}x" if v is not None else ""


def _header(rep: dict) -> list[str]:
    """memory_peak.md's lines above the table: the peak, torch's counters beside it, what was recorded."""
    t, rec, ev = rep.get("torch") or {}, rep.get("recording") or {}, rep.get("peak_event")
    at = f" ({ev['action']} of {ev['gb']:.3f} GB at {ev['site']})" if ev else " (before the first event)"
    lines = [f"Replayed peak {rep['peak_gb']:.3f} GB at event {rep['peak_index']:,} of {rep['events']:,}{at}"]
    if t.get("max_memory_allocated_gb") is not None:
        lines += [f"torch.cuda.max_memory_allocated {t['max_memory_allocated_gb']:.3f} GB (replay "
                  f"{t.get('replay_vs_max_allocated') or 0:+.1%}); requested_bytes peak "
                  f"{t.get('requested_peak_gb') or 0:.3f} GB (replay {t.get('replay_vs_requested_peak') or 0:+.1%});"
                  f" {t.get('note', '')}",
                  f"Live at the step's start: replay {rep['initial_gb']:.3f} GB, requested_bytes "
                  f"{t.get('requested_at_start_gb') or 0:.3f} GB; at its end {rep['final_gb']:.3f} GB and "
                  f"{t.get('requested_at_end_gb') or 0:.3f} GB"]
    if rec:
        lines.append(f"Events recorded {rec.get('events_recorded', 0):,} of ~{rec.get('events_expected', 0):,} "
                     f"(max_entries {rec.get('max_entries', 0):,}; dropped ~{rec.get('dropped_estimate', 0):,}); "
                     f"step {rec.get('step_s')} s while recording, snapshot {rec.get('snapshot_s')} s")
    unit = f"; 1x = [{rep['tokens']:,}, {rep['hidden']:,}] bf16 = {rep['unit_gb']:.3f} GB" if rep.get("unit_gb") else ""
    return lines + [f"Live at the peak: {rep['live_blocks']:,} blocks, {rep['before_step_gb_at_peak']:.3f} GB of them"
                    f" from before the step{unit}"]


def table(rep: dict) -> str:
    """memory_peak.md: the header lines and the top groups (block sizes also in [tokens, hidden] bf16 units)."""
    lines = _header(rep) + [
        "", "| # | allocation site: innermost in train/, else transformers, peft, bitsandbytes, liger_kernel, trl, "
        "else torch | blocks | GB | largest GB | median block | largest block |", "|---:|---|---:|---:|---:|---:|---:|"]
    for i, g in enumerate(rep["groups"], 1):
        lines.append(f"| {i} | {g['site']} | {g['blocks']:,} | {g['gb']:.3f} | {g['largest_gb']:.3f} |"
                     f" {_x(g['x_hidden'])} | {_x(g['x_hidden_largest'])} |")
    if rep["rest"]["groups"]:
        lines.append(f"| | {rep['rest']['groups']} more sites | | {rep['rest']['gb']:.3f} | | | |")
    return "\n".join(lines)


def save_snapshot(snapshot: dict, path: Path, limit: int = PICKLE_LIMIT) -> str:
    """The snapshot as a gzipped pickle (pytorch.org/memory_viz reads the pickle once gunzipped), written only when
    the compressed size stays under `limit`; what happened, in words."""
    data = pickle.dumps(snapshot, protocol=4)
    comp, out = zlib.compressobj(6, zlib.DEFLATED, 31), io.BytesIO()  # wbits 31: a gzip file
    for i in range(0, len(data), 1 << 24):
        out.write(comp.compress(data[i:i + (1 << 24)]))
        if out.tell() > limit:
            return f"not saved: over {limit / 1e6:.0f} MB gzipped ({len(data) / 1e6:.0f} MB pickled)"
    out.write(comp.flush())
    if out.tell() > limit:
        return f"not saved: {out.tell() / 1e6:.0f} MB gzipped, over {limit / 1e6:.0f} MB"
    path.write_bytes(out.getvalue())
    return f"saved {path.name} ({out.tell() / 1e6:.1f} MB gzipped)"


def write(rep: dict, out_dir: Path, snapshot: dict | None = None) -> str:
    """memory_peak.json, memory_peak.md (and snapshot.pickle.gz if small enough) in out_dir; the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if snapshot is not None:
        rep["snapshot_file"] = save_snapshot(snapshot, out_dir / "snapshot.pickle.gz")
    text = table(rep) + (f"\n\nSnapshot: {rep['snapshot_file']}" if "snapshot_file" in rep else "")
    (out_dir / "memory_peak.json").write_text(json.dumps(rep, indent=1, default=str))
    (out_dir / "memory_peak.md").write_text(text + "\n")
    return text


def load(path: Path) -> dict:
    """A saved snapshot (.pickle or .pickle.gz) back, to analyse again: analyse(load(p), tokens=..., hidden=...)."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        return pickle.load(f)


# --------------------------------------------------------------------------------------------
# The recorder: a Trainer callback in way c's process (scripts/bench.py run_ours). Needs CUDA.


def _stats(torch, device: int) -> dict:
    s = torch.cuda.memory_stats(device)
    keys = ("requested_bytes.all.current", "requested_bytes.all.peak", "allocated_bytes.all.current",
            "allocated_bytes.all.peak", "allocation.all.allocated", "allocation.all.freed",
            "segment.all.allocated", "segment.all.freed")
    return {k: s.get(k) for k in keys}


def known_tensors(model, optimizer=None) -> dict:
    """Storage address -> what it is, for the blocks that predate the step: parameters (4-bit base weights and
    their quant state, LoRA, the rest), buffers, optimizer state."""
    import torch

    out: dict[int, str] = {}

    def add(t, name):
        if isinstance(t, torch.Tensor) and t.is_cuda:
            out.setdefault(t.untyped_storage().data_ptr(), name)

    for name, p in (model.named_parameters() if model is not None else []):
        kind = ("LoRA parameters" if "lora_" in name else "4-bit base weights" if p.dtype == torch.uint8
                else "other parameters (embeddings, norms, head)")
        add(p, kind)
        qs = getattr(p, "quant_state", None)
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None),
                  getattr(getattr(qs, "state2", None), "absmax", None)):
            add(t, "4-bit quant state (absmax, code)")
    for _, b in (model.named_buffers() if model is not None else []):
        add(b, "buffers (rotary, ...)")
    for state in (getattr(optimizer, "state", None) or {}).values():
        for t in (state.values() if isinstance(state, dict) else []):
            add(t, "optimizer state")
    return out


def _step_info(model, optimizer, tokens_fn, why, **times) -> dict:
    """What the analysis needs from the trainer: the step's tokens, the model's width, the tensors from before."""
    cfg = getattr(model, "config", None)
    return {**times, "why": why, "tokens": tokens_fn() if tokens_fn else None,
            "hidden": getattr(cfg, "hidden_size", None), "known": known_tensors(model, optimizer)}


class Recorder:
    """Records optimizer step `step` (the 1-based global step) as the Trainer runs it and, when training ends (or
    finish() is called after a failed run), writes out_dir/memory_peak.{json,md}. `summary` is then set: the
    numbers for the way's result JSON, or {"error": ...}. make_recorder makes it a TrainerCallback."""

    def __init__(self, step: int, out_dir: Path, tokens_fn=None, max_entries: int = MAX_ENTRIES):
        self.step, self.out_dir, self.tokens_fn, self.max_entries = step, out_dir, tokens_fn, max_entries
        self.recording, self.snapshot, self.summary, self.info = False, None, None, {}

    def on_step_begin(self, args, state, control, **kw):
        import torch

        if state.global_step + 1 == self.step and self.snapshot is None and torch.cuda.is_available():
            self.start()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kw):
        if self.recording and state.global_step == self.step:
            self.stop(model, optimizer)

    def on_train_end(self, args, state, control, **kw):
        self.finish()

    def start(self):
        import torch

        torch.cuda.synchronize()
        self.device = torch.cuda.current_device()
        self.before = _stats(torch, self.device)
        # context "alloc": stacks at allocation (a free carries its block's); stacks "python": no C++ unwinding
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=self.max_entries)
        self.recording, self.t0 = True, time.perf_counter()

    def stop(self, model=None, optimizer=None, why=None):
        import torch

        torch.cuda.synchronize()
        t1 = time.perf_counter()
        self.after = _stats(torch, self.device)
        try:
            self.snapshot = torch.cuda.memory._snapshot()
            self.info = _step_info(model, optimizer, self.tokens_fn, why, step_s=round(t1 - self.t0, 2),
                                   snapshot_s=round(time.perf_counter() - t1, 2))
        except Exception as e:  # noqa: BLE001 - training goes on; the way's result says why there is no table
            self.snapshot, self.summary = None, {"error": f"snapshot: {type(e).__name__}: {str(e)[:300]}"}
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
            self.recording = False

    def finish(self):
        if self.recording:
            self.stop(why="stopped after training: the recorded step did not end (an error?)")
        if self.snapshot is None or self.summary is not None:
            return
        try:
            self.summary = report(self.snapshot, self.device, self.before, self.after, self.info, self.max_entries,
                                  self.out_dir)
        except Exception as e:  # noqa: BLE001 - the way's timing result stands without the analysis
            self.summary = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        self.snapshot = None


def make_recorder(step: int, out_dir: Path, tokens_fn=None, max_entries: int = MAX_ENTRIES):
    """A Recorder that is a transformers TrainerCallback (its other events do nothing)."""
    from transformers import TrainerCallback

    class MemoryPeak(Recorder, TrainerCallback):
        pass

    return MemoryPeak(step, out_dir, tokens_fn, max_entries)


def report(snapshot: dict, device: int, before: dict, after: dict, info: dict, max_entries: int,
           out_dir: Path) -> dict:
    """analyse + the allocator's counters around the step + the files; prints the table; the summary."""
    t0 = time.perf_counter()
    rep = analyse(snapshot, device, info.get("tokens"), info.get("hidden"), info.get("known"))

    def d(key):
        return (after.get(key) or 0) - (before.get(key) or 0)

    expected = d("allocation.all.allocated") + 2 * d("allocation.all.freed") + d("segment.all.allocated") \
        + d("segment.all.freed")  # alloc; free_requested + free_completed; segment_alloc / segment_free
    full = rep["events"] >= max_entries
    rep["recording"] = {"max_entries": max_entries, "events_recorded": rep["events"], "events_expected": expected,
                        "buffer_full": full, "dropped_estimate": max(0, expected - rep["events"]) if full else 0,
                        **{k: v for k, v in info.items() if k != "known"}}
    rose = (after.get("requested_bytes.all.peak") or 0) > (before.get("requested_bytes.all.peak") or 0)
    peak_alloc, peak_req = after.get("allocated_bytes.all.peak"), after.get("requested_bytes.all.peak")
    rep["torch"] = {
        "max_memory_allocated_gb": peak_alloc / GB if peak_alloc else None,
        "requested_peak_gb": peak_req / GB if peak_req else None,
        "replay_vs_max_allocated": rep["peak_bytes"] / peak_alloc - 1 if peak_alloc else None,
        "replay_vs_requested_peak": rep["peak_bytes"] / peak_req - 1 if peak_req else None,
        "requested_at_start_gb": (before.get("requested_bytes.all.current") or 0) / GB,
        "requested_at_end_gb": (after.get("requested_bytes.all.current") or 0) / GB,
        "note": ("the process's peak was reached in this step" if rose else
                 "the process's peak predates this step: compare the replay with requested_bytes at start/end")}
    rep["recording"]["analysis_s"] = round(time.perf_counter() - t0, 2)
    text = write(rep, out_dir, snapshot)
    print(f"[bench] memory at the peak ({out_dir}):\n{text}", flush=True)
    return {"dir": str(out_dir), "peak_gb": rep["peak_gb"], **rep["torch"], "recording": rep["recording"],
            "top": [{k: g[k] for k in ("site", "gb", "blocks")} for g in rep["groups"][:5]], "table": text}
