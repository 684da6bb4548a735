"""Kill -9 a real training run at random moments, resume it each time, compare with an uninterrupted run.

    python scripts/chaos_resume.py --trials 10            # prints "N of N resumed to the same final loss"

Each trial trains the tiny CPU model through the real CLI (`python -m train fit`), kills it with
SIGKILL after a random delay (so kills land anywhere: while loading, mid-step, while a checkpoint
or the adapter is being written), restarts it with the same command (train.resume: auto), and
repeats until the run finishes by itself. A trial passes when its per-step losses and its final
adapter equal those of the uninterrupted reference run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERRIDES = [  # the demo task, shrunk: a checkpoint every 2 steps, at most 2 kept
    "train.save_every=2", "train.save_total_limit=2", "train.eval_every=null",
    "data.max_rows=64", "data.eval=null", "eval.task=none", "train.batch_size=4", "train.grad_accum=1",
]
STEPS_OVERRIDE = [12]  # set from --steps


def fit_cmd(run: Path) -> list[str]:
    extra = [f"train.max_steps={STEPS_OVERRIDE[0]}", f"run.output_dir={run}"]
    sets = [x for o in OVERRIDES + extra for x in ("--set", o)]
    return [sys.executable, "-m", "train", "fit", str(REPO / "configs/tiny.yaml"), *sets]


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def result(run: Path) -> tuple[dict[int, float], dict[str, list]]:
    from safetensors.torch import load_file

    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    weights = load_file(run / "adapter" / "adapter_model.safetensors")
    return losses, {k: v.float().flatten().tolist() for k, v in weights.items()}


def reference(root: Path) -> tuple[tuple, float]:
    """The uninterrupted run; also how long its training phase lasts (first logged step to exit)."""
    run = root / "reference"
    proc = subprocess.Popen(fit_cmd(run), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    started = wait_for_training(run, proc)
    err = proc.communicate()[1].decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"reference run failed:\n{err[-2000:]}")
    return result(run), time.time() - started


def wait_for_training(run: Path, proc: subprocess.Popen) -> float:
    """Block until the run logs a new step (past imports and loading), or exits; returns the time."""
    metrics = run / "metrics.jsonl"
    before = metrics.read_text().count("\n") if metrics.is_file() else 0
    while proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") > before:
            break
        time.sleep(0.05)
    return time.time()


def trial(root: Path, i: int, duration: float, rng: random.Random, max_kills: int) -> tuple[bool, int]:
    """Kill the run up to max_kills times at random moments, then let it finish. Returns (ok, kills)."""
    run = root / f"trial-{i}"
    kills = 0
    while True:
        proc = subprocess.Popen(fit_cmd(run), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if kills < max_kills:
            wait_for_training(run, proc)  # kill while training or saving, not during Python's start-up
            try:
                proc.wait(timeout=rng.uniform(0.0, duration / 2))  # early enough to land before the end
            except subprocess.TimeoutExpired:
                proc.kill()  # SIGKILL: no handler runs, no checkpoint is saved on the way out
                proc.wait()
                kills += 1
                continue
        err = proc.communicate()[1].decode(errors="replace")
        if proc.returncode != 0:
            print(f"trial {i}: run failed after {kills} kills:\n{err[-2000:]}", file=sys.stderr)
            return False, kills
        return True, kills


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--kills", type=int, default=3, help="kills per trial before it may finish")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    args = ap.parse_args()
    STEPS_OVERRIDE[0] = args.steps
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        ref, duration = reference(root)
        print(f"reference run: {len(ref[0])} steps in {duration:.0f}s, final loss {ref[0][max(ref[0])]:.4f}")
        same = 0
        for i in range(args.trials):
            ok, kills = trial(root, i, duration, rng, args.kills)
            got = result(root / f"trial-{i}") if ok else None
            match = ok and got[0] == ref[0] and got[1] == ref[1]
            same += match
            print(f"trial {i}: {kills} kills, {'same losses and adapter' if match else 'DIFFERENT'}")
        print(f"{same} of {args.trials} resumed to the same final loss and adapter")
        return 0 if same == args.trials else 1
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
