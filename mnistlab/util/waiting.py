"""Waiting for a server that is not up yet: one rule for the storage and the tracking server.

A worker started with ``--wait S`` (the compose stack's workers, before PostgreSQL and MLflow are
ready) retries every 2 s for up to S seconds, saying so in one line on stderr the first time.
"""

from __future__ import annotations

import sys
import time

PAUSE = 2.0  # seconds between attempts


class Wait:
    """The deadline of one wait; ``again`` pauses before the next attempt."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.deadline, self.told = seconds, time.monotonic() + seconds, False

    def over(self) -> bool:
        return time.monotonic() >= self.deadline

    def again(self, line: str) -> None:
        """Pause before the next attempt; the first pause prints ``line`` (already masked)."""
        if not self.told:
            print(f"{line}; retrying for up to {self.seconds:.0f} s", file=sys.stderr, flush=True)
            self.told = True
        time.sleep(PAUSE)

    def waited(self) -> str:
        """`` after waiting S s`` for an error line, once a wait has begun."""
        return f" after waiting {self.seconds:.0f} s" if self.told else ""
