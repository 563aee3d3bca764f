"""The one exception type a user sees as a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, an argument, a URL): printed as one line, exit code 2."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT arrived: stop at once, keep what is done (raised by the signal handler)."""

    def __init__(self, signame: str) -> None:
        super().__init__(signame)
        self.signame = signame
