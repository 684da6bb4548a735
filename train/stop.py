"""Owns a graceful stop on SIGINT/SIGTERM (Ctrl-C, preemption): the signal handlers, and the stop decision
shared by every rank so that all of them save the same step and exit together."""

from __future__ import annotations

import logging
import signal
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger("train")


class GracefulStop(TrainerCallback):
    """SIGINT/SIGTERM (Ctrl-C, cluster preemption): finish the step, save a checkpoint, stop.

    A second signal aborts at once (KeyboardInterrupt) for users who really want out.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self.handle_signal)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def handle_signal(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step (send it again to abort without saving)",
                    self.requested)

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

