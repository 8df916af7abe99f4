"""One base class for every error meant for a user, and the one exit code they end with.

A stage raises a subclass of `UsaeError` when the input is at fault (a missing store, a bad
option, a checkpoint that does not fit, a full disk...): the message says what is wrong and
what to do. The CLI prints it on one line and exits with `USER_ERROR_EXIT`, never with a
traceback. Anything else is a bug and keeps its traceback.

The stages' classes also derive from the builtin they used to be (RuntimeError, ValueError,
FileNotFoundError), so code that catches those keeps working.
"""

from __future__ import annotations

USER_ERROR_EXIT = 2
"""Exit code of every command for a user's error (the same as click's usage errors)."""


class UsaeError(Exception):
    """An error in what the user asked for or gave: a message meant for them, not a bug."""
