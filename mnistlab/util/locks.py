"""Locks between processes: around the creation of a local SQLite store, and around work that
two processes must never do at once (a refit seed, an export folder).

Optuna and MLflow both create their tables and run Alembic migrations the first time a
process opens a new database; two processes doing so at once collide (Alembic errors, and
MLflow once left a store half-migrated). An exclusive ``flock`` on ``FILE.lock`` beside the
database makes the second process wait until the first has finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mnistlab.util.errors import UserError


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


class Busy(UserError):
    """Another process holds the lock: one line, exit 2, nothing touched."""


@contextmanager
def claimed(path: Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock ``path`` for the block, or refuse at once (Busy) when another process
    holds it: two processes never train the same refit seed or write the same export folder. The
    kernel drops the lock when its holder dies, so a killed holder never blocks the next one. The
    lock file is removed when the block ends (while still locked; a process that opened the old
    file sees it is no longer the one at ``path``, and opens again), so nothing is left behind."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:  # a folder that cannot be written, a symlink planted at the lock's name
            raise UserError(f"{what}: cannot make its lock {path} ({exc.strerror or type(exc).__name__})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Busy(f"{what} is in use by another mnistlab process (lock {path}); wait for it to finish") from None
        mine = os.fstat(fd)
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(fd)  # the holder before removed it as this process opened it: open the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def held(path: Path) -> bool:
    """Another process holds the lock ``path`` now (False where there is no such file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
