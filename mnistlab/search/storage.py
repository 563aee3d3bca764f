"""Studies in a plain Optuna storage: open it, create a study (race-safe) or load one.

Storage is a local SQLite file by default (WAL journal, 60 s busy timeout: safe for several
local worker processes) or PostgreSQL for shared studies. Heartbeats mark trials of dead
workers failed; those are retried with the same parameters and resume from their checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import sqlite3
import time
import uuid
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from mnistlab.core import trials as tr
from mnistlab.core.config import safe_name
from mnistlab.search.study_file import StudyConfig, check_name, make_pruner, make_sampler
from mnistlab.tracking.uri import mask, quote_userinfo, split_url, sqlite_file
from mnistlab.util import interrupts
from mnistlab.util.errors import UserError, clip
from mnistlab.util.keys import (
    FAIL_REASON_TAG,
    ID_ATTR,
    MAX_PARAMS_ATTR,
    OBJECTIVES_ATTR,
    READY_ATTR,
    STARTED_ATTR,
    STUDY_FILE_ATTR,
)
from mnistlab.util.locks import creating
from mnistlab.util.waiting import Wait

if TYPE_CHECKING:
    from mnistlab.tracking.tracker import Tracker

# Heartbeats and the retry callback are marked experimental; they are what makes workers crash-safe.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def storage_url(url: str | None) -> str:
    """``--storage``, else ``$MNISTLAB_STORAGE``, else ``optuna.db`` in the working folder."""
    url = url or os.environ.get("MNISTLAB_STORAGE") or f"sqlite:///{Path('optuna.db').resolve()}"
    url = quote_userinfo(url)
    parts = split_url(url, "storage URL")
    if parts.scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql") or not (parts.path or parts.netloc):
        raise UserError(f"storage URL {mask(url)!r}: expected sqlite:///FILE or postgresql://USER@HOST/DB")
    return url


# Signs that a database server is not up yet (rather than refusing us): worth waiting for.
TRANSIENT = ("connection refused", "could not connect", "starting up", "shutting down", "timeout expired",
             "could not translate host name", "name or service not known", "temporary failure in name resolution",
             "no route to host", "connection timed out", "server closed the connection")


# Signs of workers creating the same new storage at the same instant: retry at once.
RACES = ("already exists", "duplicate key", "uniqueviolation", "deadlock detected", "database is locked")


def open_storage(url: str | None, heartbeat: int | None = 30, tracker: Tracker | None = None,
                 wait: float = 0.0, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; a dead worker's trial is failed and retried.

    With ``wait``, a database server that is not up yet is retried every 2 s for that many
    seconds (one line on stderr says so); a wrong password or database name fails at once.
    """
    url = storage_url(url)
    kwargs: dict[str, Any] = {}
    database = None
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            database = Path(path)
            kwargs = {"creator": lambda: _sqlite_connect(path)}
        else:
            kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    hb = {}
    if heartbeat:
        hb = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat,
              "heartbeat_stale_trial_callback": _StaleTrial(tracker)}
    if database is None:
        if not create:  # a command that only reads never adds Optuna's tables to an empty or foreign database
            _require_optuna_tables(url, kwargs)
        return _connect(url, kwargs, hb, wait)
    if not database.parent.exists():
        raise UserError(f"storage: folder {database.parent} does not exist")
    if not create:  # a command that only reads never makes a database (nor its lock) for a mistyped path
        if not database.is_file():
            raise UserError(f"storage {database}: no such database (run `mnistlab study run` to create a study)")
        if not optuna_tables(database):  # Optuna would add its tables to whatever file this is
            raise UserError(f"storage {database}: holds no Optuna studies (run `mnistlab study run` to create one)")
        return _connect(url, kwargs, hb, wait)
    with creating(database):  # processes starting together would create Optuna's tables at once
        optuna_tables(database)
        _sqlite_wal(database)
        return _connect(url, kwargs, hb, wait)


OPTUNA_TABLES = {"studies", "trials", "version_info"}  # what Optuna's schema always has


def _require_optuna_tables(url: str, kwargs: dict[str, Any]) -> None:
    """UserError unless the server database at ``url`` holds Optuna's tables; nothing is created."""
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, **kwargs)
        try:
            names = set(sqlalchemy.inspect(engine).get_table_names())
        finally:
            engine.dispose()
    except Exception as exc:  # an unreachable server or a bad URL: the same one line as opening it
        raise UserError(mask(f"storage {url}: cannot open ({_first_line(exc)})", url)) from None
    if not names >= OPTUNA_TABLES:
        raise UserError(mask(f"storage {url}: holds no Optuna studies (run `mnistlab study run` to create one)", url))


class ShieldedStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose calls hold SIGTERM/SIGINT until they return: raised inside
    SQLAlchemy, the signal could leave a SQLite write lock held (see mnistlab.util.interrupts)."""

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with interrupts.shielded():
                return attr(*args, **kwargs)
        return call


def _connect(url: str, kwargs: dict[str, Any], hb: dict[str, Any], wait: float) -> optuna.storages.RDBStorage:
    """Open the storage, retrying creation races and (with ``wait``) a server still starting."""
    waiting, races = Wait(wait), 0
    while True:
        try:
            return ShieldedStorage(url, engine_kwargs=kwargs, **hb)
        except Exception as exc:  # sqlalchemy raises many types for a bad URL or an unreachable server
            detail = _first_line(exc)
            if races < 10 and any(sign in detail.lower() for sign in RACES):
                races += 1  # another worker is creating the same tables this instant
                time.sleep(0.2 + 0.3 * random.random())
                continue
            if waiting.over() or not any(sign in detail.lower() for sign in TRANSIENT):
                raise UserError(mask(f"storage {url}: cannot open ({detail}){waiting.waited()}", url)) from None
            waiting.again(mask(f"waiting for the storage {url} ({detail})", url))


def _first_line(exc: BaseException) -> str:
    """The driver's own message, first line (psycopg's is the useful one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def check_file(url: str) -> bool:
    """UserError at once when an SQLite storage names a file that is not Optuna's (see optuna_tables);
    whether it is an SQLite storage yet to be made (False for any other)."""
    database = sqlite_file(url)
    return database is not None and not optuna_tables(database)


OPTUNA_TABLES = {"studies", "version_info"}
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}


def optuna_tables(database: Path) -> bool:
    """Whether an SQLite file holds Optuna's tables (False for a missing or empty file); UserError
    for a file Optuna must not write into: not SQLite, or another program's database (an MLflow
    store given as the storage) that Optuna would otherwise fill with its own tables."""
    if not database.is_file() or database.stat().st_size == 0:
        return False
    try:
        with contextlib.closing(sqlite3.connect(database, timeout=60)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as exc:  # locked past the timeout, unreadable
        raise UserError(f"storage {database}: cannot read ({exc})") from None
    except sqlite3.DatabaseError as exc:
        raise UserError(f"storage {database}: not an SQLite database ({exc})") from None
    if tables >= OPTUNA_TABLES:
        return True
    if tables:
        what = "an MLflow store" if tables >= MLFLOW_TABLES else "another program's database"
        raise UserError(f"storage {database}: {what}, not an Optuna storage (it holds {', '.join(sorted(tables)[:5])}"
                        f"{', …' if len(tables) > 5 else ''}); give the study its own file")
    return False


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """A connection with a 60 s busy timeout and synchronous=NORMAL: in WAL mode a commit is
    then durable against any crash of the process (SIGKILL included) and only a power cut can
    lose the last commits, never corrupt the file; each commit skips an fsync."""
    con = sqlite3.connect(path, timeout=60, check_same_thread=False)
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def _sqlite_wal(path: Path) -> None:
    """WAL lets readers and one writer work at once; the mode is stored in the file."""
    with sqlite3.connect(path, timeout=60) as con:
        con.execute("PRAGMA journal_mode=WAL")


class _StaleTrial:
    """Heartbeat callback: retry the dead worker's trial and fail its MLflow run."""

    def __init__(self, tracker: Tracker) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)
        self.tracker = tracker

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        reason = trial.user_attrs.get(tr.REASON)  # set where the death is known (search/workers.py)
        if reason is not None:  # the retry copies the user attributes: it starts without its original's reason
            trial = copy.deepcopy(trial)
            trial.user_attrs = {k: v for k, v in trial.user_attrs.items() if k != tr.REASON}
        self.retry(study, trial)  # the copy is linked to this one by Optuna's "failed_trial" attr
        run_id = trial.user_attrs.get(tr.MLFLOW_RUN_ID)
        if self.tracker is not None and run_id:
            try:
                self.tracker.finish(run_id, "FAILED", {FAIL_REASON_TAG: reason or
                                                       "worker stopped sending heartbeats"})
            except Exception as exc:  # the retry matters more than the dead run's status
                warnings.warn(f"could not mark MLflow run {run_id} FAILED ({type(exc).__name__})", stacklevel=2)


def create(cfg: StudyConfig, storage: optuna.storages.BaseStorage,
           warm: list[tuple[str, dict[str, Any]]] | None = None, space_change: bool = False) -> optuna.Study:
    """Create the study, or load it if it exists (the same command continues it). An existing study
    whose trials were sampled from another space (other names or distributions) is refused unless
    ``space_change`` (`--change-space`) says to continue it with this file's space.

    Race-safe: of workers starting together on a new study exactly one creates it, records its
    attributes and enqueues the base trial and the ``warm`` configurations (search/warm.py,
    (source label, values)); the others wait until it has.
    """
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if cfg.name in existing and [d.name.lower() for d in existing[cfg.name].directions] != cfg.directions:
        raise UserError(f"study {cfg.name!r} exists with other objectives; rename the study")
    kwargs = {"storage": storage, "study_name": cfg.name, "sampler": make_sampler(cfg), "pruner": make_pruner(cfg)}
    try:
        study = optuna.create_study(directions=cfg.directions, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        _wait_ready(study)
        if not space_change:
            check_space(cfg, study)
        return study
    study.set_user_attr(ID_ATTR, uuid.uuid4().hex)
    study.set_user_attr(STUDY_FILE_ATTR, str(cfg.path))
    study.set_user_attr(MAX_PARAMS_ATTR, cfg.max_params)
    study.set_user_attr(OBJECTIVES_ATTR, list(cfg.objectives))
    study.set_user_attr(STARTED_ATTR, time.time())  # a stop's wall-clock budget counts from here, on every machine
    study.set_metric_names(list(cfg.objectives))  # optuna-dashboard and Optuna's tables name the values
    if cfg.enqueue_base:
        from mnistlab.core.config import get_path

        study.enqueue_trial({p.name: get_path(cfg.base, p.name) for p in cfg.space}, user_attrs={tr.BASE: True})
    for label, values in warm or []:
        study.enqueue_trial(values, user_attrs={tr.WARM_FROM: label}, skip_if_exists=False)
    study.set_user_attr(READY_ATTR, True)
    return study


def check_space(cfg: StudyConfig, study: optuna.Study) -> None:
    """UserError when a finished trial of ``study`` was sampled from another space than ``cfg``'s:
    a parameter the file lacks or adds, or another range, step, scale or choice list."""
    from optuna.trial import TrialState

    ours = {p.name: p.distribution() for p in cfg.space}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        theirs = t.distributions
        if not theirs:
            continue
        extra, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
        changed = sorted(n for n in set(theirs) & set(ours) if theirs[n] != ours[n])
        if extra or missing or changed:
            what = (f"{clip(extra[0])} is not in this file's space" if extra else
                    f"{clip(missing[0])} was not in its space" if missing else
                    f"{clip(changed[0])} was {clip(theirs[changed[0]])}, this file says {clip(ours[changed[0]])}")
            raise UserError(f"study {cfg.name!r} exists in this storage with another search space (trial {t.number}: "
                            f"{what}); give the study another name, or pass --change-space to continue it "
                            "with this file's space")


def _wait_ready(study: optuna.Study, timeout: float = 30.0) -> None:
    """Wait for the worker that created the study to finish setting it up."""
    deadline = time.monotonic() + timeout
    while READY_ATTR not in study.user_attrs and not study.get_trials(deepcopy=False):
        if time.monotonic() > deadline:
            return  # a study made by plain Optuna, without mnistlab's attributes: use it as it is
        time.sleep(0.2)


def _id_in(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    """The id of the study ``name`` in ``storage`` ("" for one made before ids); None if there is none."""
    if name not in optuna.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    _wait_ready(study)  # its creator sets the id before it marks the study ready
    return study.user_attrs.get(ID_ATTR, "")


def check_name_free(cfg: StudyConfig, storage: optuna.storages.BaseStorage, tracker: Tracker) -> None:
    """UserError when the study's name is held in the tracker by a study of another storage.

    The tracker is read first: a study's id reaches its storage before its MLflow experiment,
    so workers starting one new study together never refuse each other.
    """
    holder = tracker.holder(cfg.name)
    if holder is not None and holder[0] != _id_in(storage, cfg.name):
        raise tracker.taken(cfg.name, holder[1])


def load(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """An existing study by name; UserError listing the ones there are.

    A name that breaks the study name rule is refused even where a storage holds it (made by
    plain Optuna or an older mnistlab): it would become a path under the artifacts folder."""
    check_name(name, "study")
    names = optuna.get_all_study_names(storage)
    if name not in names:
        known = ", ".join(shown_name(n) for n in names) or "none"
        raise UserError(f"no study named {name!r} in this storage (studies: {known})")
    return optuna.load_study(study_name=name, storage=storage)


def shown_name(name: str) -> str:
    """A name from a storage as a listing shows it: a name that breaks the rule is quoted, cut short
    and marked, since no command will act on it."""
    return name if safe_name(name) else f"{clip(name, 60)} (unsafe name, refused)"
