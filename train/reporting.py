"""Owns what the libraries print and where they report: wandb's environment (offline without an API key) and
one filter on library log lines (each once, none that is not about the run)."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

from train.config import Config

log = logging.getLogger("train")


def setup_reporting(cfg: Config) -> None:
    """wandb runs offline when no API key is configured, so a missing account never blocks training."""
    if "wandb" in cfg.log.report_to:
        os.environ.setdefault("WANDB_PROJECT", cfg.log.project)
        has_key = os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().is_file()
        if not has_key and "WANDB_MODE" not in os.environ:
            os.environ["WANDB_MODE"] = "offline"
            log.info("wandb: no API key found, logging offline (sync later with `wandb sync`)")
    import_integrations_quietly()
    quiet_library_logs()


def import_integrations_quietly() -> None:
    """transformers prints "[INFO] Running in WANDB offline mode" when its integrations module is first
    imported (by TRL's SFTTrainer) with WANDB_MODE=offline in the environment, even for a run that reports
    nowhere. Import it with WANDB_MODE hidden: a run that reports to wandb offline says so in our own line."""
    name = "transformers.integrations.integration_utils"
    if name in sys.modules or "WANDB_MODE" not in os.environ:
        return
    mode = os.environ.pop("WANDB_MODE")
    try:
        importlib.import_module(name)
    finally:
        os.environ["WANDB_MODE"] = mode


class LibraryLogFilter(logging.Filter):
    """Library log lines: each at most once per process, and none of those that are not about the user's run.
    Our own ("train") lines always pass."""

    NOT_ABOUT_THE_RUN = (
        # accelerate, at each epoch's end, 4 times: TRL gathers per-batch metric scalars on one process, where
        # there is no padded remainder to drop
        "The used dataset had no length",
        # transformers, rotating checkpoints saved within a second of each other: it orders them by step
        # instead, which is what a run wants
        "mtime may not be reliable on this filesystem",
    )

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "train" or record.name.startswith("train."):
            return True
        message = record.getMessage()
        if any(text in message for text in self.NOT_ABOUT_THE_RUN) or (record.name, message) in self.seen:
            return False
        self.seen.add((record.name, message))
        return True


def quiet_library_logs() -> None:
    """Put one LibraryLogFilter on the handlers that print library logs: the root logger's (ours, and where
    accelerate, peft and datasets propagate) and transformers' own (its loggers do not propagate)."""
    handlers = [*logging.getLogger().handlers, *logging.getLogger("transformers").handlers]
    shared = next((f for h in handlers for f in h.filters if isinstance(f, LibraryLogFilter)), None) or LibraryLogFilter()
    for handler in handlers:
        if shared not in handler.filters:
            handler.addFilter(shared)

