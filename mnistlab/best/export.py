"""The winning model out of a study, delivered: all of it, checked, or nothing.

``export`` takes the picked configuration's weights (``weights.py``), writes every model
format (``formats.py``), ``config.json`` and ``MODEL_CARD.md`` (``card.py``) into a temporary
folder, re-measures the test set from each format, and moves the folder into place only when
all of them agree on every prediction. ``evaluate_folder`` re-measures an export from its files
alone, each checked against its SHA-256 first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import optuna

from mnistlab.best import formats
from mnistlab.best.card import model_card
from mnistlab.best.formats import CARD, CONFIG, CURVES, FORMATS, INPUT, MODEL_FILES, OUTPUT
from mnistlab.best.picks import Choice
from mnistlab.best.weights import refit_weights, trial_weights
from mnistlab.core import data
from mnistlab.core import trials as trials_mod
from mnistlab.core.config import SIZES, from_dict
from mnistlab.core.model import count_params
from mnistlab.search.plots import trial_curves
from mnistlab.util import interrupts, locks
from mnistlab.util.errors import Interrupted, UserError, clip
from mnistlab.util.jsonfile import read_json

if TYPE_CHECKING:
    from mnistlab.best.refit import Refit
    from mnistlab.tracking.tracker import Tracker

FORMAT = "mnistlab-export/1"
OWN_FILES = frozenset({*MODEL_FILES, CONFIG, CARD, CURVES})
HASHED = frozenset({*MODEL_FILES, CURVES})  # the only names config.json's "files" may list


@dataclass
class Exported:
    """What `mnistlab best --export` reports."""

    folder: Path
    test_acc: float
    accuracies: dict[str, float]
    info: dict[str, Any]
    example: np.ndarray  # two test images, the registry's input example


def prepare_target(given: Path, force: bool) -> Path:
    """The export folder, resolved; UserError (nothing touched) where writing there could lose data."""
    if given.is_symlink():  # replacing it would act on the link's target, wherever that is
        raise UserError(f"export folder {given}: is a symbolic link; give a real folder")
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"export folder {out}: exists and is not empty (use --force to replace it)")
        _check_replaceable(out)
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"export folder {out}: its parent {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"export folder {out}: {parent} is not writable")
    return out


def _check_replaceable(out: Path) -> None:
    """``--force`` replaces an earlier export and nothing else: a folder with a ``config.json`` of
    this format and only the export's own files. That rules out the working folder and every
    folder above it, the stores, the checkpoints and anything of the user's."""
    if Path.cwd().resolve().is_relative_to(out):
        raise UserError(f"export folder {out}: is the working folder or holds it; --force replaces only an "
                        "earlier export")
    strangers = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES or p.is_symlink() or not p.is_file())
    try:
        fmt = read_json(out / CONFIG).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if strangers or fmt != FORMAT:
        why = f"it holds {strangers[0]!r}" if strangers else f"no {CONFIG} of format {FORMAT!r}"
        raise UserError(f"export folder {out}: not an earlier mnistlab export ({why}); --force replaces only "
                        "those: choose another folder")


def export(choice: Choice, study: optuna.Study, out: Path, *, force: bool = False, tracker: Tracker | None = None,
           data_dir: Path | None = None, refit: Refit | None = None) -> Exported:
    """Write the picked trial's model (or, with ``refit``, its exported refit) into ``out``:
    all of it, checked, or nothing."""
    if not force:
        again = _already(choice, study, out, refit, data_dir)
        if again is not None:
            return again
    out = prepare_target(out, force)
    # the folder is claimed from the check to the rename: a second export into it is refused while
    # this one runs, and the check is made again under the claim
    with locks.claimed(out.parent / f".{out.name}.lock", f"export folder {out}"):
        return _export(choice, study, prepare_target(out, force), force=force, tracker=tracker,
                       data_dir=data_dir, refit=refit)


def holds_export(out: Path) -> bool:
    """``out`` is a folder holding an mnistlab export (its config.json of this format)."""
    try:
        return out.is_dir() and not out.is_symlink() and bool(_export_info(out))
    except UserError:
        return False


def _already(choice: Choice, study: optuna.Study, out: Path, refit: Refit | None,
             data_dir: Path | None) -> Exported | None:
    """The same export, found whole in ``out`` (the same command run again after it was stopped once
    the folder was in place): re-measured from its files, not written again. None otherwise."""
    try:
        info = _export_info(out) if out.is_dir() and not out.is_symlink() else None
    except UserError:
        return None
    trial = choice.trial
    run_id = refit.exported.run_id if refit is not None else trial.user_attrs.get(trials_mod.MLFLOW_RUN_ID)
    if info is None or (info.get("study"), info.get("trial"), info.get("mlflow_run_id"), info.get("refit")) != (
            study.study_name, trial.number, run_id, refit.summary() if refit is not None else None):
        return None
    result = evaluate_folder(out, data_dir)
    if abs(result["accuracies"][FORMATS[0].name] - info["test_acc"]) > 1e-9:
        return None  # altered since: the usual rules decide (refused without --force)
    print(f"export folder {out}: already holds this export (trial {trial.number}, run {run_id}); re-measured from "
          "its files, not written again", flush=True)
    x, _ = formats.test_pixels(data_dir)
    return Exported(out.resolve(), info["test_acc"], result["accuracies"], info, x[:2])


def _export(choice: Choice, study: optuna.Study, out: Path, *, force: bool, tracker: Tracker | None,
            data_dir: Path | None, refit: Refit | None) -> Exported:
    from mnistlab.tracking.provenance import EXPORT_PACKAGES, environment, versions

    _remove_stale_partials(out)
    trial = choice.trial
    previous = interrupts.stop_on_signals()  # SIGTERM then raises like SIGINT, so the temporary folder is removed
    moved = False
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), suffix=".partial", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the delivered folder is an ordinary one
    except OSError as exc:
        interrupts.restore(previous)
        raise UserError(f"export folder {out}: cannot write in {out.parent} ({exc.strerror})") from None
    try:
        if refit is not None:
            cfg, weights, meta = refit_weights(refit)
        else:
            cfg, weights, meta = trial_weights(trial, tracker, tmp / ".download")
        shutil.rmtree(tmp / ".download", ignore_errors=True)
        formats.write(tmp, cfg, weights)
        x, y = formats.test_pixels(data_dir)
        accuracies = formats.agreement(formats.outputs(tmp, cfg, x), y)
        test_acc = accuracies[FORMATS[0].name]
        a = trial.user_attrs
        curves = refit is None and trial_curves(trial, tracker, tmp / CURVES)
        files = [*MODEL_FILES] + ([CURVES] if curves else [])
        info = {
            "format": FORMAT,
            "study": study.study_name,
            "trial": trial.number,
            "mlflow_run_id": refit.exported.run_id if refit is not None else a.get(trials_mod.MLFLOW_RUN_ID),
            "params": count_params(cfg.model),
            "val_acc": meta.get("val_acc") or a.get(trials_mod.BEST_VAL_ACC),
            "val_score": round(choice.group.mean, 4),
            "val_score_se": round(choice.group.se, 4),
            "val_seeds": choice.group.n_seeds,
            "best_epoch": meta.get("epoch", a.get(trials_mod.BEST_EPOCH)),
            "epochs_run": a.get(trials_mod.EPOCHS_RUN),
            "test_acc": test_acc,
            "test_images": int(len(y)),
            "trial_test_acc": a.get(trials_mod.TEST_ACC),
            "trial_test_images": cfg.data.limit_eval or SIZES["test"],
            # the images the search trial and the refit trained, validated and tested on (card.py says them)
            "images": {"search": data.image_counts(dataclasses.replace(cfg.data, full_train=False)),
                       "refit": data.image_counts(cfg.data) if refit is not None else None},
            "picked_by": choice.rule,
            "refit": refit.summary() if refit is not None else None,
            "input": INPUT,
            "output": OUTPUT,
            "files": {name: data.sha256(tmp / name) for name in files},
            "config": cfg.to_dict(),
            "git_commit": environment()["git_commit"],
            "versions": versions(EXPORT_PACKAGES),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(info, cfg, accuracies, curves))
        for path in tmp.iterdir():  # safetensors writes its file 0600: every file gets the umask's mode
            path.chmod(0o666 & ~_umask())
        interrupts.point("export.written")
        prepare_target(out, force)  # again at the last moment: what the folder holds now is what is replaced
        with interrupts.shielded():  # moved, and known to be
            _move_into_place(tmp, out)
            moved = True
        interrupts.point("export.moved")
    except BaseException as exc:
        stop = exc if isinstance(exc, KeyboardInterrupt) else None
        if stop is None and interrupts.received():  # a library wrapped the stop in its own error
            stop = Interrupted(interrupts.received() or "SIGTERM")
        if moved and stop is not None:
            stop.exported = out  # type: ignore[attr-defined]  # stopped after the export was in place
        elif not moved:
            shutil.rmtree(tmp, ignore_errors=True)
        if stop is not None and stop is not exc:
            raise stop from None
        raise
    finally:
        interrupts.restore(previous)
    return Exported(out, test_acc, accuracies, info, x[:2])


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _partial_prefix(out: Path) -> str:
    """The start of the temporary folder's name: ``.DIR.<host>-<pid>.``, so a later export can tell
    whether the process that made it still runs."""
    return f".{out.name}.{_host_tag()}-{os.getpid()}."


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary folders of earlier exports into ``out`` that were killed (SIGKILL, a power
    cut): only ``.DIR.<host>-<pid>.XXXXXXXX.partial`` folders of this DIR, made on this machine by a
    process that no longer runs. Another machine's (a shared folder) and older-style names are kept:
    whether their process runs cannot be known from here."""
    shape = re.compile(rf"\.{re.escape(out.name)}\.([0-9a-f]{{8}})-(\d+)\.[a-z0-9_]{{8}}\.partial")
    host = _host_tag()
    for path in out.parent.iterdir():
        found = shape.fullmatch(path.name)
        if found and found.group(1) == host and not path.is_symlink() and path.is_dir() \
                and not _running(int(found.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    """This process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder over ``out``; an old ``out`` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:  # the earlier export's own files go; anything else (written meanwhile) stays, said
        for path in old.iterdir():
            if path.name in OWN_FILES and path.is_file() and not path.is_symlink():
                path.unlink()
        try:
            old.rmdir()
        except OSError:
            print(f"export folder {out}: replaced; files that were not the earlier export's are kept in {old}",
                  file=sys.stderr, flush=True)


# -- evaluate an export -----------------------------------------------------------------------

def evaluate_folder(folder: Path, data_dir: Path | None = None, trusted: bool = False) -> dict[str, Any]:
    """Re-measure an exported model from its files alone; UserError on a bad or altered export. The
    TorchScript file (code) is loaded only from a ``trusted`` folder; the safetensors weights with the
    config's architecture, and the ONNX graph, always."""
    folder = folder.resolve()
    info = _export_info(folder)
    _check_files(folder, info["files"])
    cfg = from_dict(info.get("config"), f"{folder / CONFIG}")
    x, y = formats.test_pixels(data_dir)
    try:
        out = formats.outputs(folder, cfg, x, trusted=trusted)
    except UserError:
        raise
    except Exception as exc:  # a file that passed its checksum but does not load
        raise UserError(f"{folder}: cannot load the model ({type(exc).__name__}: {str(exc)[:200]})") from None
    accuracies = formats.agreement(out, y)
    return {"info": info, "accuracies": accuracies, "test_images": int(len(y))}


def _export_info(folder: Path) -> dict[str, Any]:
    """config.json of an export, its shape checked: what evaluate reads from it is all there."""
    where = folder / CONFIG
    try:
        info = read_json(where)
    except FileNotFoundError:
        raise UserError(f"{folder}: no {CONFIG}; not an mnistlab export") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: unreadable ({clip(str(exc))})") from None
    if not isinstance(info, dict):
        raise UserError(f"{where}: expected a JSON object; not an mnistlab export")
    if info.get("format") != FORMAT:
        raise UserError(f"{where}: format {clip(info.get('format'))}, expected {FORMAT!r}")
    acc = info.get("test_acc")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        raise UserError(f"{where}: test_acc must be a number; got {clip(acc)}")
    if not isinstance(info.get("files"), dict):
        raise UserError(f"{where}: files must map each model file to its SHA-256")
    return info


def _check_files(folder: Path, files: dict[str, Any]) -> None:
    """Every model file of the export, and nothing else, against its SHA-256.

    Only the export's own file names are accepted, so a config.json cannot point evaluate at a
    path outside the folder, and each model file must be listed, so none escapes the check."""
    where = folder / CONFIG
    strangers = sorted(set(files) - HASHED, key=str)
    if strangers:
        raise UserError(f"{where}: files lists {clip(strangers[0])}, not a file of an export")
    missing = [name for name in MODEL_FILES if name not in files]
    if missing:
        raise UserError(f"{where}: files lacks {missing[0]}; every model file must have its SHA-256")
    for name, digest in files.items():
        path = folder / name
        if path.is_symlink():  # its checksum would vouch for a file outside the export
            raise UserError(f"{path}: is a symbolic link; an export holds plain files")
        if not path.is_file():
            raise UserError(f"{path}: missing")
        if not isinstance(digest, str) or data.sha256(path) != digest:
            raise UserError(f"{path}: checksum does not match {CONFIG} (altered or corrupt)")
