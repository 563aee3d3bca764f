"""A study's trials and a storage's studies as tables (`mnistlab study status`, `study list`)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Any

import optuna

from mnistlab.core import trials as tr
from mnistlab.core.trials import best_trial, state_label
from mnistlab.search.storage import shown_name
from mnistlab.util.errors import UserError
from mnistlab.util.files import write_temp
from mnistlab.util.keys import OBJECTIVES_ATTR


def trials_frame(study: optuna.Study, objectives: list[str] | tuple[str, ...]) -> Any:
    """One row a trial: number, state, params, scores with their uncertainty, sampled values.

    ``val_acc`` is the trial's score (the validation accuracy of its last epoch) and
    ``val_se`` its binomial standard error; ``val_mean``/``seeds`` the seed-mean score of a
    configuration that was repeated; ``best`` marks the pick ``*`` and the trials within
    noise of it ``~`` (the Pareto front ``*`` for two objectives). A screened study adds ``rung``
    (``screen-K`` for the K-th screening schedule, ``full`` for the study's own) and
    ``promoted_from``; screens are never marked.
    """
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    gs = tr.groups(trials)
    best_g = tr.best_of(gs)
    best = best_g.first if best_g is not None else None
    tied = tr.tied_numbers(gs, best_g)
    by_group = {g.number: g for g in gs}
    front = {g.number for g in tr.pareto(gs)} if len(objectives) > 1 else set()  # screens are in no group
    rows = []
    for t in trials:
        a = t.user_attrs
        state = state_label(t)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        has_score = tr.VAL_SCORE in a or tr.BEST_VAL_ACC in a
        group = by_group.get(t.number)
        mark = "*" if (best is not None and t.number == best.number) or t.number in front else (
            "~" if t.number in tied else "")
        row = {"number": t.number, "state": state, "param_count": a.get(tr.PARAM_COUNT),
               "val_acc": round(tr.score(t), 2) if has_score else None,
               "val_se": round(tr.se(t), 2) if has_score else None,
               "val_mean": round(group.mean, 2) if group is not None and group.n_seeds > 1 else None,
               "seeds": group.n_seeds if group is not None and group.n_seeds > 1 else None,
               "repeat_of": a.get(tr.REPEAT_OF),
               "rung": f"screen-{a[tr.SCREEN]}" if tr.is_screen(t) else "full" if tr.is_promoted(t) else None,
               "promoted_from": a.get(tr.PROMOTED_FROM), "best_epoch_acc": a.get(tr.BEST_VAL_ACC),
               "test_acc": a.get(tr.TEST_ACC), "epochs": a.get(tr.EPOCHS_RUN),
               "duration_s": round(duration, 1) if duration else None, "best": mark}
        row.update({k: v for k, v in t.params.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("val_mean", "seeds", "repeat_of", "rung", "promoted_from"):  # only where a study has them
        if all(r[column] is None for r in rows):
            frame = frame.drop(columns=column)
    for column in frame.columns:  # whole numbers stay whole beside a trial that has none yet
        values = [r[column] for r in rows if r.get(column) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[column] = frame[column].astype("Int64")
    return frame


def status_table(study: optuna.Study, objectives: list[str] | tuple[str, ...]) -> Any:
    """The trials table as `mnistlab study status` prints it."""
    df = trials_frame(study, objectives)
    if df.empty:
        return df
    return df.set_index("number")


def print_status(study: optuna.Study, objectives: list[str] | tuple[str, ...], csv: Path | None = None) -> None:
    """`mnistlab study status`: the trials table printed (and written to ``csv``)."""
    import pandas as pd

    if csv is not None:
        check_csv_target(csv)
    table = status_table(study, objectives)
    with pd.option_context("display.max_rows", 500, "display.width", 200, "display.max_columns", 30):
        print(table.to_string() if not table.empty else "no trials yet")
    if csv is not None:
        if table.empty:  # the header alone, so that the file is recognised as ours next time
            table = pd.DataFrame(columns=["state"]).rename_axis("number")
        write_csv(csv, table.to_csv())
        print(f"wrote {csv}")


# Every status CSV starts so (the index, then the first column): an existing file that does not is
# someone else's (an Optuna or MLflow store passed by mistake) and is never written over.
CSV_HEADER = "number,state"
# ... and carries this extended attribute, so that a header alone (a user's "number,state,capital")
# does not pass. It is invisible to CSV readers; a copy (cp without -a) loses it. On a file system
# without extended attributes the header alone decides.
CSV_MARK, CSV_MARK_VALUE = "user.mnistlab", b"study-status-csv"
_SNIFF_BYTES = 4096  # enough for the header; a huge file is not read to decide


def check_csv_target(path: Path) -> None:
    """UserError unless ``path`` is a new file or a status CSV mnistlab wrote: never a symlink, a
    folder or another kind of file (``--csv optuna.db`` must not destroy the study)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not path.parent.is_dir():
            raise UserError(f"--csv {path}: no folder {path.parent}") from None
        return
    except OSError as exc:
        raise UserError(f"--csv {path}: cannot be checked ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISLNK(info.st_mode):
        raise UserError(f"--csv {path}: is a symbolic link; give the file itself or a new name")
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"--csv {path}: is a folder; give a file name, e.g. {path / 'trials.csv'}")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"--csv {path}: not a regular file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError as exc:
        raise UserError(f"--csv {path}: cannot read ({exc.strerror or type(exc).__name__})") from None
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    if first != CSV_HEADER.encode() and not first.startswith(CSV_HEADER.encode() + b","):
        raise UserError(f"--csv {path}: exists and is not a trials CSV written by mnistlab (its first line is not "
                        f"{CSV_HEADER},...); not overwritten: choose another name or delete it")
    if _marked(path) is False:
        raise UserError(f"--csv {path}: exists and is not a trials CSV written by mnistlab (it lacks the "
                        f"{CSV_MARK} mark that mnistlab sets); not overwritten: choose another name or delete it")


def _marked(path: Path) -> bool | None:
    """``path`` carries the status CSV's mark; None where the file system keeps no extended attributes."""
    try:
        return os.getxattr(path, CSV_MARK, follow_symlinks=False) == CSV_MARK_VALUE
    except OSError as exc:
        return False if exc.errno == errno.ENODATA else None


def write_csv(path: Path, text: str) -> None:
    """``text`` becomes ``path`` all at once, marked (CSV_MARK): an interrupted write leaves the old
    file or none, never half a table."""
    try:
        tmp = write_temp(path, text.encode())
        try:
            with contextlib.suppress(OSError):  # no extended attributes here: the header alone marks it
                os.setxattr(tmp, CSV_MARK, CSV_MARK_VALUE, follow_symlinks=False)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise UserError(f"--csv {path}: cannot write ({exc.strerror or type(exc).__name__})") from None


def list_studies(storage: optuna.storages.BaseStorage) -> Any:
    """One row a study: trials by state and the best validation accuracy."""
    import pandas as pd

    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        best = best_trial(trials)
        states = [t.state.name for t in trials]
        objectives = ",".join(study.user_attrs.get(OBJECTIVES_ATTR, []))
        rows.append({"study": shown_name(summary.study_name), "objectives": objectives,
                     "trials": len(trials), "complete": states.count("COMPLETE"),
                     "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
                     "running": states.count("RUNNING"),
                     "best_val_acc": best.user_attrs[tr.BEST_VAL_ACC] if best else None,
                     "best_trial": best.number if best else None})
    return pd.DataFrame(rows)

