"""JSON files read back from disk, bounded in size and nesting; the notes an outage leaves written whole.

Every JSON file mnistlab reads (an export's config.json, best.json, a refit's result, the data
manifest, the notes a tracking outage leaves) may have been damaged or replaced; Python's parser
takes any size and raises RecursionError, not ValueError, for deep nesting.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from mnistlab.util.files import write_atomic

# The largest JSON mnistlab writes is a queue of metrics unsent during an outage: about 100 bytes
# a value, so this holds over 100,000 of them. A bigger file is not one of ours.
MAX_JSON_BYTES = 16 << 20


def read_json(path: Path, limit: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in ``path``. A file over ``limit`` bytes, not UTF-8 or nested deeper than the
    parser takes raises ValueError, as malformed JSON does, so a caller's handling of a malformed
    file covers them all; a file that cannot be opened raises OSError."""
    with open(path, "rb") as fh:
        raw = fh.read(limit + 1)
    if len(raw) > limit:
        raise ValueError(f"larger than {limit:,} bytes; not a JSON file mnistlab wrote")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply; not a JSON file mnistlab wrote") from None


def write_json(path: Path, value: Any) -> None:
    """``value`` as ``path``, all at once (files.write_atomic): a kill or a full disk leaves the old
    file or the new one, never half of one."""
    write_atomic(path, (json.dumps(value) + "\n").encode())


def read_note(path: Path, kind: type) -> Any:
    """An outage note (``kind``: list or dict) to add to: empty when there is none. One that cannot be
    read is renamed aside (``NAME.unreadable-TIME``, with a warning) rather than lose what is added now."""
    if not path.is_file():
        return kind()
    try:
        value = read_json(path)
        if isinstance(value, kind):
            return value
        problem = f"a JSON {type(value).__name__}, not a {kind.__name__}"
    except (OSError, ValueError) as exc:
        problem = str(exc)[:200]
    aside = path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(path, aside)
    warnings.warn(f"{path}: unreadable ({problem}); set aside as {aside.name}, a new one started", stacklevel=2)
    return kind()
