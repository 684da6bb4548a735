"""Owns a graceful stop on SIGINT/SIGTERM (Ctrl-C, preemption): the signal handlers, and the stop decision
shared by every rank so that all of them save the same step and exit together."""

from __future__ import annotations

import logging
import signal
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger("train")


class GracefulStop(TrainerCallback):
    """SIGINT/SIGTERM (Ctrl-C, cluster preemption): finish the step, save a checkpoint, stop.

    Under several processes a signal may reach one rank only, or the ranks at different steps: a rank that
    stopped alone would leave the others waiting in their next all-reduce forever. So at each step's end every
    rank learns whether any rank has been signalled (one all-reduce of the signal number), and all stop at that
    step. A second signal aborts that process at once (KeyboardInterrupt) for users who really want out.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested: str | None = None  # the signal this process received
        self.stopped: str | None = None  # the signal all ranks stopped for (None: the run was not stopped)
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
        self.stopped = self.any_rank_signalled(args.device)
        if self.stopped:
            control.should_save = True
            control.should_training_stop = True

    def any_rank_signalled(self, device) -> str | None:
        """The signal any rank received, the same answer on every rank: each calls this at the same step's end.
        One process: this process's own signal, no collective."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        # one int per step beside the gradients' all-reduce; its .item() waits for this step's GPU work to finish
        flag = torch.tensor([signal.Signals[self.requested].value if self.requested else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        signum = int(flag.item())
        if signum and not self.requested:
            log.warning("another rank received %s: all ranks save a checkpoint after this step",
                        signal.Signals(signum).name)
        return signal.Signals(signum).name if signum else None
