"""Part of the MLflow adapter (with tracker.py and registry.py): the MlflowClient behind a Tracker.

Made once a tracker, over a local store that is fully migrated (processes starting together
take turns), and behind a circuit breaker: while the server is known to be down, calls fail at
once instead of each waiting out MLflow's retries.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mnistlab.tracking.uri import mask, sqlite_file
from mnistlab.util import interrupts
from mnistlab.util.errors import UserError
from mnistlab.util.locks import creating

if TYPE_CHECKING:
    from mlflow import MlflowClient


# MLflow's HTTP retries, unless the user set them: about 15 s of retrying (4 retries, backoff
# 1, 2, 4, 8 s) rides out a server restart; a longer outage is queued locally instead of
# stalling training for minutes (MLflow's defaults retry for about 2 minutes per call).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
OFFLINE_SECONDS = 30.0  # after a failed call, calls fail at once for this long (then one tries again)


class Breaker(Protocol):
    """What the client reads and sets of the Tracker it serves (tracker.py), typed here so that the
    client does not import the tracker that imports it."""

    uri: str
    offline_until: float  # monotonic time before which calls fail at once


class Unreachable(OSError):
    """The tracking server failed a call moments ago; not tried again yet."""


class _Guarded:
    """MlflowClient with a circuit breaker: while the server is known to be down, calls fail at
    once instead of each waiting out MLflow's retries."""

    def __init__(self, client: MlflowClient, tracker: Breaker) -> None:  # the Tracker whose offline_until it keeps
        self._inner, self._tracker = client, tracker

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            t = self._tracker
            if time.monotonic() < t.offline_until:
                raise Unreachable(f"MLflow at {mask(t.uri)} is unreachable (retrying later)")
            try:
                with interrupts.shielded():  # a signal waits until the store is left consistent
                    return attr(*args, **kwargs)
            except Exception as exc:
                if _connection_failure(exc):
                    t.offline_until = time.monotonic() + OFFLINE_SECONDS
                raise
        return call


def _connection_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, OSError) or any(sign in text for sign in (
        "max retries exceeded", "connection refused", "connectionerror", "failed to establish",
        "read timed out", "remote end closed", "502", "503", "504"))


def _check_migrated(database: Path) -> None:
    """UserError naming the remedy when an interrupted creation or upgrade of an MLflow SQLite store
    left it half-migrated (Alembic's ``_alembic_tmp_*`` tables); MLflow would fail on it later."""
    if not database.is_file() or database.stat().st_size == 0:
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as con:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            left = [t for t in tables if t.startswith("_alembic_tmp_")]
            runs = con.execute("SELECT count(*) FROM runs").fetchone()[0] if left and "runs" in tables else 0
    except sqlite3.Error:  # not a state this check knows; MLflow's own error says what is wrong
        return
    if {"studies", "version_info"} <= set(tables) and "experiments" not in tables:
        raise UserError(f"MLflow store {database}: an Optuna storage, not an MLflow store; "
                        "give the tracking URI its own file (the default is mlflow.db)")
    if not left:
        return
    broken = f"MLflow store {database} is half-migrated (table {left[0]} left by an interrupted creation or upgrade)"
    if not runs:
        raise UserError(f"{broken} and holds no runs: delete {database} and run the command again")
    raise UserError(f"{broken} and holds {runs:,} runs: restore it from a backup, or copy it aside, drop the "
                    f"_alembic_tmp_ tables and run `mlflow db upgrade sqlite:///{database}`")


def connect(tracker: Breaker) -> _Guarded:
    """The MlflowClient of a Tracker (its ``uri``), behind the breaker that sets its ``offline_until``.

    Making it creates a local store's database, or migrates an older one."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from mlflow import MlflowClient

    database = sqlite_file(tracker.uri)
    if database is None:
        client = MlflowClient(tracker.uri)
    else:  # processes starting together in a fresh folder would migrate the new store at once
        with creating(database):
            _check_migrated(database)
            client = MlflowClient(tracker.uri)
            client.search_experiments(max_results=1)  # makes or migrates the store, under the lock
    return _Guarded(client, tracker)
