"""The one exception type that means "the user's input is wrong" (exit code 2, one line, no traceback)."""


class UserError(Exception):
    """Bad input the user can fix. The message names the key/file/row and says how to fix it."""
