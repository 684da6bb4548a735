"""Run directory safety, checkpoint completeness, and what resume restores.

The Trainer writes checkpoint files one by one with no completion marker, so a kill while saving
leaves a checkpoint that looks valid but is not. We write `COMPLETE` (atomically) only after the
Trainer's `on_save`, and resume only from checkpoints that have it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from train.config import Config
from train.errors import UserError

log = logging.getLogger("train")

MARKER = "COMPLETE"
OUR_ARTIFACTS = ("checkpoints", "adapter", "eval", "eval.stale", "metrics.jsonl", "config.yaml", "train.log",
                 "data_record.json")  # the last: data.DATA_RECORD
SCHEDULE = "schedule.json"  # in a checkpoint of a run extended past its schedule's end: where the new one began
# Keys whose change makes a checkpoint unusable (the saved tensors would not fit the new model).
STRUCTURAL = ("model.name_or_path", "quant.mode", "lora.r", "lora.target_modules", "lora.top_layers", "lora.use_dora",
              "lora.modules_to_save", "data.format")
# "a|b": either file; FSDP (sharded state dict) and DeepSpeed write their own layouts
# (torch's distributed checkpoint writes a sharded directory's .metadata last: it marks the shards complete)
ADAPTER_FILES = "adapter_model.safetensors|pytorch_model_fsdp_0/.metadata"
OPTIMIZER_FILES = "optimizer.pt|optimizer.bin|optimizer_0/.metadata|global_step*/*optim_states.pt"
RESTORABLE = {
    "adapter weights": (ADAPTER_FILES,),
    "optimizer state": (OPTIMIZER_FILES,),
    "LR scheduler": ("scheduler.pt",),
    "RNG state": ("rng_state*.pth",),  # rng_state.pth, or one rng_state_<rank>.pth per DDP rank
    "data position": ("trainer_state.json",),
}


# What a resumable checkpoint must hold besides the marker (a kill while the Trainer rotates old
# checkpoints away can leave a marked one half-deleted).
NEEDED = (ADAPTER_FILES, "trainer_state.json", OPTIMIZER_FILES, "scheduler.pt")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int:
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(m.group(1)) if m else -1


def mark_complete(ckpt: Path, cfg: Config, schedule_start: int | None = None) -> None:
    """`schedule_start`: the step where this checkpoint's lr schedule began, when the run was extended
    past the end of its first one (a resume from it rebuilds that schedule: schedule.extend_schedule)."""
    write_atomic(ckpt / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if schedule_start is not None:
        write_atomic(ckpt / SCHEDULE, json.dumps({"start": schedule_start}) + "\n")
    write_atomic(ckpt / MARKER, "ok\n")


def latest_complete(ckpt_dir: Path, quiet: bool = False) -> Path | None:
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if checkpoint_step(p) >= 0),
                   key=checkpoint_step, reverse=True)
    for ckpt in found:
        if (ckpt / MARKER).is_file() and has_files(ckpt, NEEDED):
            return ckpt
        if not quiet:
            log.warning("ignoring incomplete %s (the run was killed while saving or deleting it)", ckpt.name)
    return None


def prepare_run_dir(run: Path, cfg: Config, overwrite: bool) -> None:
    """Refuse to mix two runs' files; never delete anything that is not ours.

    Everything that can reject this run (directory, resume point; fit has already checked the model, its LoRA
    targets and every data row) is checked first, so a refused run leaves the disk exactly as it was: nothing created,
    nothing removed.
    """
    if run.exists() and not run.is_dir():
        raise UserError(f"run.output_dir: {run} is a file; choose a directory path")
    ours = [name for name in OUR_ARTIFACTS if (run / name).exists()]
    latest = latest_complete(run / "checkpoints") if run.is_dir() else None
    resumable = cfg.train.resume != "never" and latest is not None
    others = [p.name for p in run.iterdir() if p.name not in OUR_ARTIFACTS] if run.is_dir() else []
    restart = not overwrite and not resumable and killed_before_first_checkpoint(run, cfg)
    if restart:
        log.warning("%s: the previous attempt of this same run stopped before its first checkpoint; starting over",
                    run)
    elif not overwrite and not (resumable or cfg.train.resume not in ("auto", "never")) and (ours or others):
        what = "another run's files" if ours else f"files that are not ours ({', '.join(sorted(others)[:3])})"
        raise UserError(f"run.output_dir: {run} already holds {what}{_used_dir_advice(cfg, latest)}")
    check_writable(run)
    preflight(cfg, run, overwrite)
    if overwrite or restart:
        for name in ours:
            target = run / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    try:
        (run / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run.output_dir: cannot write to {run} ({e.strerror}); choose a writable directory")


def _used_dir_advice(cfg: Config, latest: Path | None) -> str:
    """What follows "already holds ...": resuming is offered only where it is possible and not already
    what the config asks for (under train.resume=auto we get here only when no checkpoint is complete)."""
    if latest is not None:  # train.resume is never, and a complete checkpoint is there
        return (f"; pass --overwrite (removes only our outputs), resume from {latest.name} with train.resume=auto, "
                "or choose another run.output_dir")
    why = " and no complete checkpoint to resume from" if cfg.train.resume == "auto" else ""
    return f"{why}; pass --overwrite (removes only our outputs) or choose another run.output_dir"


def killed_before_first_checkpoint(run: Path, cfg: Config) -> bool:
    """Only our files, no adapter, and the saved config equals this one: the same run, killed early."""
    saved = run / "config.yaml"
    if cfg.train.resume != "auto" or not saved.is_file() or (run / "adapter").exists():
        return False
    if any(p.name not in OUR_ARTIFACTS and not p.name.startswith(".") for p in run.iterdir()):
        return False
    try:
        before = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return False
    return isinstance(before, dict) and before == cfg.to_dict()


def check_writable(run: Path) -> None:
    """Without writing anything: the nearest existing ancestor of `run` must be a writable directory."""
    existing = run.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"run.output_dir: cannot create {run}: {existing} is a file; choose a directory path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run.output_dir: cannot write to {existing} (permission denied); choose a writable directory")


def preflight(cfg: Config, run: Path, overwrite: bool = False) -> None:
    """The resume point and its saved config, with nothing written. fit has already checked the model, its
    attention and lora.target_modules (model.preflight, lora.preflight) and every data row (data.load_splits)."""
    if not (overwrite and cfg.train.resume == "auto"):  # --overwrite removes the old checkpoints
        ckpt = resume_point(cfg, run)
        if ckpt is not None:
            check_resume(ckpt, cfg, quiet=True)


def resume_point(cfg: Config, run: Path, quiet: bool = False) -> Path | None:
    mode = cfg.train.resume
    if mode == "never":
        return None
    if mode == "auto":
        return latest_complete(run / "checkpoints", quiet)
    path = Path(mode).expanduser()
    if not path.is_dir():
        raise UserError(f"train.resume: {mode} is not a checkpoint directory; use auto, never, or a checkpoint-N dir")
    if not (path / MARKER).is_file():
        raise UserError(f"train.resume: {mode} is incomplete (no {MARKER} marker); pick an earlier checkpoint")
    return path


def recorded_compute_dtype(cfg: Config, run: Path, overwrite: bool = False) -> str | None:
    """quant.compute_dtype as recorded in the checkpoint this run would resume from (None: no resume, or none
    recorded): a resumed `auto` run keeps the precision it was trained in (precision.resolved)."""
    if cfg.quant.compute_dtype != "auto" or (overwrite and cfg.train.resume == "auto"):  # chosen; or a fresh run
        return None
    try:
        ckpt = resume_point(cfg, run, quiet=True)  # start_or_resume says which, and what it skipped
        saved = saved_config(ckpt) if ckpt else None
    except (UserError, OSError):
        return None  # start_or_resume reports a bad resume point itself
    quant = saved.get("quant") if isinstance(saved, dict) else None
    return quant.get("compute_dtype") if isinstance(quant, dict) else None


def saved_config(ckpt: Path) -> Any:
    """The checkpoint's config.yaml as parsed, None where it is not YAML or not text."""
    try:
        return yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        return None


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume(ckpt: Path, cfg: Config, quiet: bool = False) -> list[str]:
    """Compare the checkpoint's config with this run's: error on structural changes, warn on others."""
    saved_path = ckpt / "config.yaml"
    if not saved_path.is_file():
        if not quiet:
            log.warning("%s has no saved config; cannot check it matches this run", ckpt)
        return []
    saved = saved_config(ckpt)
    if not isinstance(saved, dict):
        raise UserError(f"train.resume: {saved_path} is not a readable config; pick another checkpoint "
                        "or start fresh with train.resume=never and --overwrite")
    saved, now = _flat(saved), _flat(cfg.to_dict())
    ignored = {"train.resume", "train.max_steps", "train.epochs", "run.output_dir", "log.report_to"}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and k not in ignored)
    for key in changed:
        if key in STRUCTURAL:
            raise UserError(f"train.resume: {ckpt.name} was trained with {key}={saved.get(key)!r}, this config has "
                            f"{now.get(key)!r}; restore it, or start fresh with train.resume=never and --overwrite")
    if not quiet:
        _warn_changes(ckpt, [k for k in changed if not (ended(ckpt) and k in SCHEDULE_KEYS)], saved, now)
    return changed


# Keys of the lr schedule. Past the end of a finished run, they shape the extra steps' new schedule
# (schedule.extend_schedule says how), so a change there is no surprise worth a warning.
SCHEDULE_KEYS = ("train.lr", "train.lr_scheduler", "train.warmup_ratio")


def _warn_changes(ckpt: Path, changed: list[str], saved: dict[str, Any], now: dict[str, Any]) -> None:
    """One line naming each changed key. A resume inside a schedule keeps the checkpoint's lr (the Trainer
    restores it with the scheduler state): say so, rather than let the line suggest the new lr applies."""
    if not changed:
        return
    kept = " (not applied: the resumed schedule keeps its lr; a new train.lr applies to steps past its end)"
    log.warning("resuming with a config that differs from %s: %s", ckpt.name,
                "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}{kept if k == 'train.lr' else ''}" for k in changed))


def trainer_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json ({} when unreadable: resume then fails in the Trainer, naming it)."""
    try:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return state if isinstance(state, dict) else {}


def ended(ckpt: Path) -> bool:
    """The checkpoint is the last step of its lr schedule: its run finished there (and was perhaps killed
    before saving the adapter). Resuming it as is would train past max_steps at the schedule's end lr."""
    state = trainer_state(ckpt)
    return state.get("global_step", 0) >= state.get("max_steps", float("inf")) > 0


def schedule_start(ckpt: Path) -> int | None:
    """Where the lr schedule of `ckpt` began: 0 for a run's own schedule (None), else the step at which
    an extended run started a new one (mark_complete)."""
    path = ckpt / SCHEDULE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["start"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise UserError(f"train.resume: {path} is unreadable; pick another checkpoint, or start fresh "
                        "with --overwrite") from None


def has_files(ckpt: Path, patterns) -> bool:
    """Every pattern matches a file; a pattern "a|b" matches if either glob does."""
    return all(any(p.is_file() for alt in pattern.split("|") for p in ckpt.glob(alt)) for pattern in patterns)


def describe_restore(ckpt: Path) -> str:
    present = [what for what, files in RESTORABLE.items() if has_files(ckpt, files)]
    missing = [what for what in RESTORABLE if what not in present]
    if missing:
        log.warning("%s lacks %s: those start fresh, so the run will not match an uninterrupted one",
                    ckpt.name, ", ".join(missing))
    return f"resuming from {ckpt} (step {checkpoint_step(ckpt)}): restored {', '.join(present)}"
