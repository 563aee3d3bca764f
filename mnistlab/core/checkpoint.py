"""Checkpoints written atomically and read without unpickling code.

Every epoch writes ``last.pt`` (model, optimiser, scheduler, RNG states, epoch, config,
history) through a temporary file, fsync and rename; the one before it is kept as
``prev.pt``. Each file has a ``.sha256`` sidecar; a file whose checksum does not match is
never loaded. The best-validation-epoch weights go to ``best.safetensors`` + ``best.json``.
The files' names, and the reader of ``best.json``, are checkpoint_files.py's (no torch there).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from mnistlab.core.checkpoint_files import BEST, BEST_META, LAST, PREV, SUM, read_meta
from mnistlab.core.config import from_dict
from mnistlab.core.metrics import EpochMetrics
from mnistlab.core.model import build_model
from mnistlab.util import interrupts
from mnistlab.util.errors import UserError, clip
from mnistlab.util.files import sha256, write_atomic, write_temp


def _write_new(path: Path, data: bytes) -> tuple[Path, str]:
    """Write ``data`` to a synced temporary file beside ``path``; returns (temp, sha256).

    Files are serialised in memory first and written through Python's own file object, so a
    full disk or a file-size limit is an ``OSError`` naming the cause (torch's and
    safetensors' own writers report it less clearly), and the temporary file is removed.
    """
    return write_temp(path, data), hashlib.sha256(data).hexdigest()


def _install_best(directory: Path, data: bytes, meta: dict[str, Any]) -> None:
    """``data`` becomes ``best.safetensors`` (temporary file, fsync, rename), with its sidecar and the
    ``best.json`` that vouches for it (``meta`` with its sha256); a SIGTERM or SIGINT waits for all three."""
    path = directory / BEST
    tmp, digest = _write_new(path, data)
    with interrupts.shielded():
        os.replace(tmp, path)
        _write_text(path.with_name(path.name + SUM), digest + "\n")
        _write_text(directory / BEST_META, json.dumps({**meta, "sha256": digest}, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


def save_state(directory: Path, state: dict[str, Any]) -> Path:
    """Save an epoch checkpoint as ``last.pt``, keeping the previous one as ``prev.pt``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return _install(directory, buffer.getvalue())


def _install(directory: Path, data: bytes) -> Path:
    """``data`` becomes ``last.pt`` (with its sidecar); the one before it becomes ``prev.pt``.

    A SIGTERM or SIGINT waits until the files are in place. A SIGKILL at any step leaves the newest
    whole checkpoint usable: the sidecars move before their files and the new file's sidecar is
    written before the file, whose rename is the commit, so each file on disk matches one of the
    two sidecars (``verified``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    last = directory / LAST
    tmp, digest = _write_new(last, data)
    with interrupts.shielded():
        if last.exists():
            sidecar = directory / (LAST + SUM)
            if sidecar.exists():
                os.replace(sidecar, directory / (PREV + SUM))
            os.replace(last, directory / PREV)
        _write_text(directory / (LAST + SUM), digest + "\n")
        os.replace(tmp, last)
    return last


def verified(path: Path) -> bool:
    """True when ``path`` (``last.pt`` or ``prev.pt``) exists and its checksum is one of the two
    recorded beside it: its own sidecar, or, for a kill inside ``_install``, the other file's."""
    if not path.is_file():
        return False
    recorded = set()
    for name in (LAST, PREV) if path.name in (LAST, PREV) else (path.name,):
        sidecar = path.with_name(name + SUM)
        if sidecar.is_file():
            recorded.add(sidecar.read_text(errors="replace").strip())
    return bool(recorded) and sha256(path) in recorded


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


# What train() restores from an epoch checkpoint; one without them cannot be resumed.
STATE_KEYS = ("epoch", "config", "model", "optimizer", "scheduler", "torch_rng", "cuda_rng", "batch_rng", "history")


def load_latest(directory: Path, map_location: str | torch.device = "cpu",
                config: dict[str, Any] | None = None) -> tuple[Path | None, dict[str, Any], str]:
    """The newest usable epoch checkpoint: ``last.pt``, else ``prev.pt``.

    Usable means checksum-verified, readable weights-only and holding every STATE_KEYS entry (a
    sidecar can match a file that was zeroed before it was hashed), and, given ``config``, made
    with that config, with contents that fit (``misfit``). Returns (path, state, note): path None
    and state {} when neither is usable; note says what was passed over, "" if nothing.
    """
    skipped = []
    for name in (LAST, PREV):
        path = directory / name
        if not path.exists():
            continue
        try:
            state = load_state(path, map_location)
            missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else ["all"]
            if missing:
                raise UserError(f"{path}: not an epoch checkpoint (no {missing[0]!r})")
            if config is not None and state["config"] != config:
                raise UserError(f"{path}: checkpoint of a different config")
            problem = misfit(state)
            if problem:
                raise UserError(f"{path}: {problem}")
        except UserError as exc:
            skipped.append(str(exc))
            continue
        return path, state, "; ".join(skipped)
    return None, {}, "; ".join(skipped)


def misfit(state: dict[str, Any]) -> str:
    """What in an epoch checkpoint does not fit the config it carries ("" when all does): its weights'
    names and shapes, the optimiser's parameters, the types a resume restores. A checksum only says
    the file is the one written; a file that does not fit is passed over like a corrupt one, never
    half-restored into a model."""

    try:
        cfg = from_dict(state["config"], "its config")
    except UserError as exc:
        return str(exc)
    epoch, history = state["epoch"], state["history"]
    if type(epoch) is not int or not 0 <= epoch <= cfg.train.epochs:
        return f"epoch {clip(epoch)} is not an epoch of its config"
    if not isinstance(history, list) or len(history) != epoch:
        return f"its history is not a list of its {epoch} epochs"
    try:
        for m in history:
            EpochMetrics(**m)
    except TypeError:
        return "its history holds something other than epoch metrics"
    for key in ("torch_rng", "batch_rng"):
        if not isinstance(state[key], torch.Tensor) or state[key].dtype != torch.uint8:
            return f"{key} is not a random generator state"
    if not isinstance(state["cuda_rng"], list) or not isinstance(state["scheduler"], dict):
        return "cuda_rng or scheduler of the wrong type"
    with torch.device("meta"):  # names and shapes only: no memory, no initialisation
        net = build_model(cfg.model)
    return weights_misfit(state["model"], net) or _optimizer_misfit(state["optimizer"], net)


def weights_misfit(weights: Any, net: torch.nn.Module) -> str:
    """What in ``weights`` does not fit ``net``'s names, shapes and types ("" when all does)."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return "its model weights are not a state dict"
    expected = net.state_dict()
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        return f"its model weights do not fit its config ({'no ' + missing[0] if missing else 'extra ' + extra[0]})"
    for name, want in expected.items():
        got = weights[name]
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"model weight {name} is {got.dtype} {tuple(got.shape)}, its config needs {want.dtype} "
                    f"{tuple(want.shape)}")
    return ""


def _optimizer_misfit(opt: Any, net: torch.nn.Module) -> str:
    shapes = [p.shape for p in net.parameters()]
    groups = opt.get("param_groups") if isinstance(opt, dict) else None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               for g in groups) or not isinstance(opt.get("state"), dict):
        return "its optimizer state is not an optimizer's state dict"
    ids = [i for g in groups for i in g["params"]]
    if any(type(i) is not int for i in ids) or sorted(ids) != list(range(len(shapes))):
        return f"its optimizer holds {len(ids)} parameters, the model {len(shapes)}"
    for i, per_param in opt["state"].items():
        if i not in ids or not isinstance(per_param, dict):
            return f"its optimizer state names parameter {clip(i)}, which the model lacks"
        for key, value in per_param.items():  # momentum and Adam's moments have the parameter's shape
            if isinstance(value, torch.Tensor) and value.dim() and value.shape != shapes[i]:
                return f"its optimizer's {key} of parameter {i} is {tuple(value.shape)}, not {tuple(shapes[i])}"
    return ""


def save_best(directory: Path, model: torch.nn.Module, meta: dict[str, Any]) -> Path:
    """Best-epoch weights as safetensors plus a JSON with the config that rebuilds them."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _install_best(directory, save(weights), meta)
    return directory / BEST


def load_best(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Best-epoch weights and their metadata, checksum-verified."""
    path, meta_path = directory / BEST, directory / BEST_META
    meta = read_meta(meta_path)
    if not path.is_file() or sha256(path) != meta.get("sha256"):
        raise UserError(f"{path}: missing, or its checksum does not match {meta_path.name}")
    try:
        return load_file(str(path)), meta
    except Exception as exc:  # safetensors raises its own error type for a bad header or truncated data
        raise UserError(f"{path}: unreadable safetensors file ({str(exc)[:200]})") from None


TOOK = "took the checkpoint"  # how adopt's line starts when it took MLflow's checkpoint


def adopt(downloaded: Path, directory: Path, config: dict[str, Any]) -> str:
    """Take the checkpoint a trial's earlier attempt sent to MLflow (downloaded into
    ``downloaded``) into the local folder ``directory`` when it is newer than what that folder
    holds: the local folder is a cache, and the attempt may have run on another machine.

    The remote files pass the same checks as local ones (checksum, weights-only load, every
    STATE_KEYS entry, the trial's own config); a remote last.pt that fails falls back to its
    prev.pt. Returns one line saying what was taken or passed over ("" when nothing was there).
    """
    remote, state, passed_over = load_latest(downloaded, config=config)
    if remote is None:
        return f"no usable checkpoint in MLflow ({passed_over})" if passed_over else ""
    _, local, _ = load_latest(directory, config=config)
    note = f" (passed over: {passed_over})" if passed_over else ""
    if local and local["epoch"] >= state["epoch"]:  # the same machine, or one that ran it further
        return f"the local checkpoint is as new{note}" if passed_over else ""
    try:  # the best weights belong with the checkpoint: a resumed run reports from them at its end
        _, meta = load_best(downloaded)
    except UserError as exc:
        return f"MLflow's checkpoint (epoch {state['epoch']}) not taken: {exc}"
    directory.mkdir(parents=True, exist_ok=True)
    _install_best(directory, (downloaded / BEST).read_bytes(), meta)
    _install(directory, remote.read_bytes())
    return f"{TOOK} after epoch {state['epoch']} from MLflow{note}"
