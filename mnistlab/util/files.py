"""Files replaced all at once: written to a temporary file beside the target, synced, then renamed
over it, so a kill or a full disk leaves the old file or the new one, never half of one; and a
file's SHA-256, which every checksum sidecar and manifest records."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a synced temporary file beside ``path`` (removed again if the write fails); the
    caller renames it into place. Written through Python's own file object, so a full disk or a
    file-size limit is an ``OSError`` naming the cause."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` all at once."""
    tmp = write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
