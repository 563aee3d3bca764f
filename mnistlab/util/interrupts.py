"""SIGTERM and SIGINT as one Interrupted exception, never raised inside a tracker or storage call.

A signal handler runs between two bytecodes of the main thread, wherever it is. Raised inside
SQLAlchemy (while MLflow or Optuna writes a record), the exception can leave a connection with
an open write transaction on a SQLite store: the records the interrupted process then writes to
say what it was doing wait on its own lock. Calls that talk to a store run ``shielded()``: a
signal arriving then is held and raised as soon as the call returns.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mnistlab.util.errors import Interrupted

_state = threading.local()


def _depth() -> int:
    return getattr(_state, "depth", 0)


def stop_on_signals() -> dict[int, Any]:
    """SIGTERM and SIGINT raise Interrupted once (in the main thread), at once or, inside a
    shielded call, when it returns; later signals are ignored while the process records what it
    was doing. Returns the previous handlers for ``restore``."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    fired: list[int] = []
    _state.held = None
    _received.clear()

    def handler(signum: int, frame: Any) -> None:
        if fired:
            return
        fired.append(signum)
        name = signal.Signals(signum).name
        _received[:] = [name]
        if _depth() > 0:
            _state.held = name
            return
        raise Interrupted(name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


_received: list[str] = []  # the signal this process was stopped by, once one arrived


def received() -> str | None:
    """The name of the SIGTERM/SIGINT that arrived (None before one did). Code that calls into a library
    which catches every exception and raises its own (torch.export wraps an Interrupted raised inside
    it in a TorchExportError) asks this to tell the user's stop from a failure."""
    return _received[0] if _received else None


def restore(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@contextmanager
def shielded() -> Iterator[None]:
    """Hold a signal until the block ends, then raise it (in place of anything the block raised:
    the user asked to stop)."""
    _state.depth = _depth() + 1
    try:
        yield
    finally:
        _state.depth -= 1
        held = getattr(_state, "held", None)
        if _state.depth == 0 and held is not None:
            _state.held = None
            raise Interrupted(held)


def stopped(exc: BaseException, what: str) -> int:
    """One line on stderr for the SIGTERM/SIGINT that stopped a command, saying ``what`` became of its
    work; returns the shell's exit code for the signal (143, 130)."""
    name = getattr(exc, "signame", "SIGINT")
    print(f"interrupted by {name}: {what}", file=sys.stderr, flush=True)
    return 128 + int(getattr(signal, name, signal.SIGINT))


# A test-only hook: MNISTLAB_TEST_SIGNAL_AT="POINT[#N]:SIGNAL" makes the process send itself SIGNAL
# (INT, TERM or KILL) the Nth time (1st by default) it passes the named instant ``point(POINT)``,
# so that the interruption tests stop a real command at every instant of a trial's, a refit's and
# an export's life, not at a few a timer happens to hit. Unset, ``point`` only reads a dict.
TEST_HOOK = "MNISTLAB_TEST_SIGNAL_AT"
_passes: dict[str, int] = {}


def point(name: str) -> None:
    """A named instant that an interruption can cut (see TEST_HOOK)."""
    spec = os.environ.get(TEST_HOOK)
    if not spec:
        return
    where, _, sig = spec.rpartition(":")
    wanted, _, nth = where.partition("#")
    if wanted != name:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, f"SIG{sig.upper().removeprefix('SIG')}"))
