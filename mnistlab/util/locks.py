"""A lock around the creation of a local SQLite store, for processes starting together.

Optuna and MLflow both create their tables and run Alembic migrations the first time a
process opens a new database; two processes doing so at once collide (Alembic errors, and
MLflow once left a store half-migrated). An exclusive ``flock`` on ``FILE.lock`` beside the
database makes the second process wait until the first has finished.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def creating(database: Path) -> Iterator[None]:
    """Hold the creation lock of ``database`` (a SQLite file) for the duration of the block.

    The kernel drops a ``flock`` when its process dies, so a killed creator never blocks the
    next one. Where the lock file cannot be made (a read-only folder) no store can be made
    either, and the block runs unlocked.
    """
    try:
        fd = os.open(database.with_name(database.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the lock
