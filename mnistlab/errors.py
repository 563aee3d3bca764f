"""The one exception type a user sees as a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (a file, an argument, a URL): printed as one line, exit code 2."""
