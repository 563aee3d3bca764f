"""What a trial's checkpoint folder holds, by name, and the reader of its ``best.json``: all that
`study check` and the `best` command need to know of checkpoints without importing torch.
Writing and loading them is checkpoint.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mnistlab.util.errors import UserError
from mnistlab.util.jsonfile import read_json

LAST, PREV, BEST, BEST_META = "last.pt", "prev.pt", "best.safetensors", "best.json"
SUM = ".sha256"  # a checkpoint's checksum sidecar: last.pt.sha256
# What a retry on another machine needs, in the order a trial sends it to its MLflow run each
# epoch: the best weights first (never older than the epoch checkpoint sent after them), then
# prev.pt, then last.pt, so a send cut short leaves last.pt failing its checksum and prev.pt whole.
SHARED = (BEST, BEST_META, PREV, PREV + SUM, LAST + SUM, LAST)
# The files a finished run keeps in MLflow (prev.pt is only a fallback while it trains).
KEPT = (BEST, BEST_META, LAST, LAST + SUM)


def read_meta(meta_path: Path) -> dict[str, Any]:
    """A best.json: a JSON object, or UserError naming the file (missing, not JSON, too deep, another type)."""
    try:
        meta = read_json(meta_path)
    except (OSError, ValueError):
        raise UserError(f"{meta_path}: missing or unreadable") from None
    if not isinstance(meta, dict):
        raise UserError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    return meta
