"""User-facing exceptions: UserError (bad input: exit code 2, one line, no traceback) and Interrupted (stopped by a
signal after saving a checkpoint)."""


class UserError(Exception):
    """Bad input the user can fix. The message names the key/file/row and says how to fix it."""


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; exit non-zero so schedulers retry."""

    def __init__(self, signal_name: str, checkpoint: str, resume: str = "auto"):
        # train.resume: auto resumes from the newest checkpoint by itself; never and a path need a change
        how = ("run the same command again to resume from it" if resume == "auto" else
               f"to resume from it, run the same command with --set train.resume=auto (train.resume is {resume})")
        super().__init__(f"interrupted by {signal_name}: checkpoint saved to {checkpoint}; {how}")
        self.exit_code = 130 if signal_name == "SIGINT" else 143
