"""The one exception type a user sees as a one-line message instead of a traceback."""

from __future__ import annotations

import reprlib
from typing import Any

ECHO_LIMIT = 200  # characters of a user's value an error line shows: a 50 MB value is not printed back


class UserError(Exception):
    """Bad input from the user (a file, an argument, a URL): printed as one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: stop at once, keep what is done (raised by the signal handler)."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame


def clip(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing input in an error.

    reprlib bounds the work as well as the text: a huge string or a deeply nested YAML value is
    never rendered whole first."""
    short = reprlib.Repr()
    short.maxstring, short.maxother, short.maxlevel = limit, limit, 3
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
