"""JSON files read back from disk, bounded in size and nesting.

Every JSON file mnistlab reads (an export's config.json, best.json, a refit's result, the data
manifest, the notes a tracking outage leaves) may have been damaged or replaced; Python's parser
takes any size and raises RecursionError, not ValueError, for deep nesting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
