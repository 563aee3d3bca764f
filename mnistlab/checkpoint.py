"""Checkpoints written atomically and read without unpickling code.

Every epoch writes ``last.pt`` (model, optimiser, scheduler, RNG states, epoch, config,
history) through a temporary file, fsync and rename; the one before it is kept as
``prev.pt``. Each file has a ``.sha256`` sidecar; a file whose checksum does not match is
never loaded. The best-validation-epoch weights go to ``best.safetensors`` + ``best.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mnistlab.data import sha256
from mnistlab.errors import UserError

LAST, PREV, BEST, BEST_META = "last.pt", "prev.pt", "best.safetensors", "best.json"


def _atomic(path: Path, write: Any) -> str:
    """Write through ``write(tmp_path)``, fsync, then rename over ``path``; returns sha256."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = sha256(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _write_text(path.with_name(path.name + ".sha256"), digest + "\n")
    return digest


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_state(directory: Path, state: dict[str, Any]) -> Path:
    """Save an epoch checkpoint as ``last.pt``, keeping the previous one as ``prev.pt``."""
    directory.mkdir(parents=True, exist_ok=True)
    last = directory / LAST
    tmp = directory / f".{LAST}.{os.getpid()}.new"
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        digest = sha256(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if last.exists():
        os.replace(last, directory / PREV)
        sidecar = directory / (LAST + ".sha256")
        if sidecar.exists():
            os.replace(sidecar, directory / (PREV + ".sha256"))
    os.replace(tmp, last)
    _write_text(directory / (LAST + ".sha256"), digest + "\n")
    return last


def verified(path: Path) -> bool:
    """True when ``path`` exists and matches its recorded checksum."""
    sidecar = path.with_name(path.name + ".sha256")
    if not path.is_file() or not sidecar.is_file():
        return False
    return sidecar.read_text().strip() == sha256(path)


def load_state(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's contents, checksum-verified and loaded weights-only (no code runs)."""
    if not verified(path):
        raise UserError(f"{path}: missing, or its checksum does not match (corrupt checkpoint)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a bad archive
        raise UserError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None


def latest_good(directory: Path) -> Path | None:
    """``last.pt`` if intact, else ``prev.pt`` if intact, else None."""
    for name in (LAST, PREV):
        if verified(directory / name):
            return directory / name
    return None


def save_best(directory: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Best-epoch weights as safetensors plus a JSON with the config that rebuilds them."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = directory / BEST
    digest = _atomic(path, lambda tmp: save_file(weights, str(tmp)))
    _write_text(directory / BEST_META, json.dumps({**meta, "sha256": digest}, indent=2) + "\n")
    return path


def load_best(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Best-epoch weights and their metadata, checksum-verified."""
    path, meta_path = directory / BEST, directory / BEST_META
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        raise UserError(f"{meta_path}: missing or unreadable") from None
    if not path.is_file() or sha256(path) != meta.get("sha256"):
        raise UserError(f"{path}: missing, or its checksum does not match {meta_path.name}")
    return load_file(str(path)), meta
