"""Everything mnistlab logs to MLflow; the only module that imports mlflow.

Runs are addressed by explicit run ids through ``MlflowClient``, never through MLflow's
global active run, so threads, processes and machines can log at once. A study is an MLflow
experiment with one parent run; each trained trial is a child run of it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from mnistlab import checkpoint, interrupts
from mnistlab.errors import UserError
from mnistlab.locks import creating

PARENT_TAG = "mnistlab.parent"  # "true" on a study's parent run
STUDY_TAG = "mnistlab.study"
TRIAL_TAG = "mnistlab.trial"
STUDY_ID_TAG = "mnistlab.study_id"  # on a study's experiment, parent and child runs: which study of that name
STORAGE_TAG = "mnistlab.storage"  # on a study's experiment: its storage, password masked
# MLflow 3's UI reads this experiment tag to tell model training from GenAI work (values in its UI bundle:
# genai_development, custom_model_development, ...); mnistlab's experiments are model training.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s")
SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "http", "https", "file")


def resolve_uri(uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else ``mlflow.db`` in the working folder."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"
    uri = quote_userinfo(uri)
    scheme = split_url(uri, "tracking URI").scheme
    if scheme == "" and not uri.startswith("databricks"):
        uri = Path(uri).resolve().as_uri()  # a bare folder is MLflow's legacy file store
    elif scheme not in SCHEMES:
        raise UserError(f"tracking URI {mask(uri)!r}: unsupported scheme {scheme!r}")
    return uri


# Query parameters that carry credentials in SQLAlchemy, libpq, MySQL and cloud storage URLs
# (password, passwd, pwd, token, api_key, secret, sslpassword, sas signatures, ...).
# Names are bounded (64 characters each side) to keep matching linear on hostile text.
_SECRET_QUERY = re.compile(r"(?i)([?&;][\w.-]{0,64}(?:pass(?:word|wd)?|pwd|token|secret|key|credential|auth|sig)"
                           r"[\w.-]{0,64})=([^&;#\s'\"]*)")
# user:password@ after a scheme; the password may itself hold '@' or ':' (up to the last '@').
# The look-behind starts a match only where a scheme can start: linear time on a long word.
_USERINFO = re.compile(r"((?<![\w+.-])[a-z][\w+.-]*://[^:/@\s'\"]*):([^\s/?#'\"]*)@", re.IGNORECASE)
# Variables whose values are secrets mnistlab, MLflow or a database driver reads.
SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD",
              "MYSQL_PWD", "POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "MLFLOW_AUTH_ADMIN_PASSWORD")
_MIN_SECRET = 4  # shorter fragments of a secret are left: masking every "ab" would garble the text


def mask(text: str, *sources: str) -> str:
    """``text`` with every credential replaced by ***, safe to print, log and record.

    Masks what URLs in ``text`` carry (``user:password@`` and secret query parameters such as
    ``?password=``), the values of the secret environment variables (SECRET_ENV), and the
    secrets of each URL in ``sources`` wherever they appear, also in pieces: a driver that
    splits ``user:p@ss@host`` at the first '@' reports the host "ss@host".
    """
    secrets = {v for name in SECRET_ENV if len(v := os.environ.get(name, "")) >= _MIN_SECRET}
    for url in (text, *sources):
        secrets.update(_secrets_of(url))
    out = _USERINFO.sub(r"\1:***@", text)
    out = _SECRET_QUERY.sub(r"\1=***", out)
    for secret in sorted(secrets, key=len, reverse=True):
        out = out.replace(secret, "***")
    return out


def split_url(url: str, what: str) -> Any:
    """``urlsplit``, with a malformed URL (e.g. an unclosed IPv6 bracket) as one masked UserError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - a port that is not a number raises here, not later in a driver
    except ValueError as exc:
        raise UserError(f"{what} {mask(url)!r}: not a valid URL ({exc})") from None
    return parts


def quote_userinfo(url: str) -> str:
    """``url`` with any '@' or ':' inside its password percent-encoded.

    Python reads ``user:p@ss@host`` up to the last '@', SQLAlchemy up to the first (password
    "p", host "ss@host"), so the driver would connect elsewhere and print a piece of the password.
    """
    scheme, sep, rest = url.partition("://")
    netloc, slash, tail = rest.partition("/")
    userinfo, at, host = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    if not sep or not at or not colon or ("@" not in password and ":" not in password):
        return url
    return f"{scheme}://{user}:{quote(password, safe='%')}@{host}{slash}{tail}"


def _secrets_of(url: str) -> set[str]:
    """The credentials in a URL (raw and percent-decoded), and their '@'/':' separated pieces."""
    from urllib.parse import unquote

    found = [m.group(2) for m in _USERINFO.finditer(url)] + [m.group(2) for m in _SECRET_QUERY.finditer(url)]
    out: set[str] = set()
    for secret in found:
        for form in {secret, unquote(secret)}:
            out.add(form)
            out.update(re.split(r"[@:]", form))
    return {s for s in out if len(s) >= _MIN_SECRET}


def check_reachable(uri: str, timeout: float = 5.0, wait: float = 0.0) -> None:
    """UserError in one line when a tracking server does not answer its health check.

    With ``wait``, a server that is not up yet (connection refused, unknown host) is retried
    every 2 s for that many seconds, with one line on stderr saying so.
    """
    if urlsplit(uri).scheme not in ("http", "https"):
        return
    deadline, told = time.monotonic() + wait, False
    while True:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:  # noqa: S310
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            raise UserError(f"MLflow server {mask(uri)} answered its health check with HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if time.monotonic() >= deadline:
                waited = f" after waiting {wait:.0f} s" if wait else ""
                raise UserError(f"MLflow server {mask(uri)} is unreachable ({reason}){waited}; "
                                "nothing was trained") from None
            if not told:
                print(f"waiting for the MLflow server {mask(uri)} ({reason}); retrying for up to {wait:.0f} s",
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(2)
            continue
        raise UserError(f"MLflow server {mask(uri)} answered its health check with an error")


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
    if not left:
        return
    broken = f"MLflow store {database} is half-migrated (table {left[0]} left by an interrupted creation or upgrade)"
    if not runs:
        raise UserError(f"{broken} and holds no runs: delete {database} and run the command again")
    raise UserError(f"{broken} and holds {runs:,} runs: restore it from a backup, or copy it aside, drop the "
                    f"_alembic_tmp_ tables and run `mlflow db upgrade sqlite:///{database}`")


def sharing_warning(storage_url: str, tracker: Tracker, experiment_id: str) -> str | None:
    """One line when workers on other machines could not share this study's runs and checkpoints:
    a server storage with a local MLflow store, or a tracking server whose artifacts go to a local
    path (a server started without proxied artifacts). None when nothing is wrong or can be told."""
    local = ("", "file", "sqlite")
    if urlsplit(storage_url).scheme.split("+")[0] not in ("sqlite", "") and urlsplit(tracker.uri).scheme in local:
        return (f"warning: the study's storage is a database server but MLflow's store {mask(tracker.uri)} is "
                "local: workers on other machines cannot see these runs or resume from their checkpoints "
                "(give every worker one `mlflow server` as --tracking-uri)")
    if urlsplit(tracker.uri).scheme in ("http", "https"):
        location = tracker.client.get_experiment(experiment_id).artifact_location
        if urlsplit(location).scheme in ("", "file"):
            return (f"warning: the MLflow server keeps artifacts at {location}, a path each worker writes on its "
                    "own disk: start it with proxied artifacts (`mlflow server --artifacts-destination ...`) so "
                    "that checkpoints reach every machine")
    return None


def describe_error(exc: BaseException) -> str:
    """An MLflow error in one short line (the server's answer, without the request dump)."""
    text = str(exc).strip()
    if "Response body:" in text:
        text = text.split("Response body:", 1)[1].strip(" '\"")
    code = getattr(exc, "get_http_status_code", lambda: None)()
    first = (text.splitlines() or [type(exc).__name__])[0][:200]
    return f"HTTP {code}: {first}" if code and code != 500 else first


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def exposure_warning(host: str, auth: bool) -> str | None:
    """The warning for a UI bound beyond this machine without a login (None when there is no risk)."""
    if auth or host in LOOPBACK or host.startswith("127."):
        return None
    return (f"warning: the MLflow UI on {host} has no login: anyone who can reach this machine can read and "
            "change every run; add --auth (MLflow's basic-auth app) or bind 127.0.0.1")


def serve_ui(uri: str | None, host: str, port: int, auth: bool = False) -> int:
    """Run MLflow's server (the web UI) over a local store until interrupted; returns its exit code.

    The store's URI reaches the server through MLFLOW_BACKEND_STORE_URI, not its command line,
    which any user of the machine can read (``ps``) and which would show a database password.
    """
    uri = resolve_uri(uri)
    if urlsplit(uri).scheme in ("http", "https"):
        print(f"the tracking server {mask(uri)} serves the MLflow UI itself: open it in a browser")
        return 0
    warning = exposure_warning(host, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           *(["--app-name", "basic-auth"] if auth else [])]
    base = f"http://{host}:{port}"
    print(f"MLflow UI: {base}  (store {mask(uri)}; Ctrl-C stops it)", flush=True)
    tracker = Tracker(uri)
    for name, link in runs_links(tracker, base) if tracker.known() else []:
        print(f"  {name}: {link}", flush=True)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}  # a password in the URI stays off the command line
    os.execve(sys.executable, cmd, env)  # the server takes this process over: signals reach it directly
    return 1  # not reached


# MLflow 3.17's UI ignores mlflow.experimentKind when it picks an experiment's first page: a switch kept per
# browser (GenAI, the default, or "Model training") decides. These parameters open the runs table in model-training
# mode; sorting by a metric lists the trials flat, best first, instead of folded under the parent run.
RUNS_VIEW = "workflowType=machine_learning&orderByKey=metrics.%60val_acc%60&orderByAsc=false"


def runs_links(tracker: Tracker, base: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment name, link to its runs table) for the newest model-training experiments of a store."""
    found = tracker.client.search_experiments(filter_string=f"tags.`{KIND_TAG}` = '{KIND}'", max_results=limit,
                                              order_by=["last_update_time DESC"])
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?{RUNS_VIEW}") for e in found]


def environment() -> dict[str, Any]:
    """Git commit and library versions, logged with every run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    versions = {}
    for pkg in ("mnistlab", "torch", "torchvision", "optuna", "mlflow", "numpy", "safetensors"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"git_commit": commit, "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions}


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dropout": 0.05}}`` -> ``{"model.dropout": 0.05}``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# MLflow's HTTP retries, unless the user set them: about 15 s of retrying (4 retries, backoff
# 1, 2, 4, 8 s) rides out a server restart; a longer outage is queued locally instead of
# stalling training for minutes (MLflow's defaults retry for about 2 minutes per call).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "4", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
OFFLINE_SECONDS = 30.0  # after a failed call, calls fail at once for this long (then one tries again)


class Unreachable(OSError):
    """The tracking server failed a call moments ago; not tried again yet."""


class _Guarded:
    """MlflowClient with a circuit breaker: while the server is known to be down, calls fail at
    once instead of each waiting out MLflow's retries."""

    def __init__(self, client: Any, tracker: Tracker) -> None:
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


class Tracker:
    """An MLflow client bound to one tracking URI, with a local queue for what fails to send."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = resolve_uri(uri)
        self._client: Any = None
        self.pending: list[tuple[str, list[Any]]] = []  # (run_id, metrics) not yet accepted
        self._warned = False
        self.offline_until = 0.0

    @property
    def client(self) -> Any:
        """The MlflowClient, made on first use (making it creates a local store's database)."""
        if self._client is None:
            for key, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(key, value)
            from mlflow import MlflowClient

            database = self._sqlite_file()
            if database is None:
                client = MlflowClient(self.uri)
            else:  # processes starting together in a fresh folder would migrate the new store at once
                with creating(database):
                    _check_migrated(database)
                    client = MlflowClient(self.uri)
                    client.search_experiments(max_results=1)  # makes or migrates the store, under the lock
            self._client = _Guarded(client, self)
        return self._client

    def _sqlite_file(self) -> Path | None:
        if urlsplit(self.uri).scheme != "sqlite":
            return None
        path = self.uri.split("sqlite:///", 1)[-1]
        return None if path in ("", ":memory:") else Path(path)

    def known(self) -> bool:
        """False for a local store that does not exist yet (using it would create it)."""
        parts = urlsplit(self.uri)
        if parts.scheme == "sqlite":
            database = self._sqlite_file()
            return database is None or database.is_file()
        if parts.scheme == "file":
            return Path(parts.path).is_dir()
        return True

    def check_access(self) -> None:
        """UserError in one line when a tracking server refuses us (no or wrong credentials)."""
        from mlflow.exceptions import MlflowException

        if urlsplit(self.uri).scheme not in ("http", "https"):
            return
        try:
            self.client.search_experiments(max_results=1)
        except MlflowException as exc:
            code = getattr(exc, "get_http_status_code", lambda: None)()
            hint = (": set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" if code in (401, 403)
                    else "")
            raise UserError(f"MLflow server {mask(self.uri)} refused the request "
                            f"({describe_error(exc)}){hint}") from None

    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        if not self.known():
            return False
        try:
            self.client.get_run(run_id)
        except MlflowException:
            return False
        return True

    # -- experiments and runs ------------------------------------------------------------
    def experiment(self, name: str, study_id: str | None = None, storage: str = "") -> str:
        """The id of the experiment called ``name``, created if missing (race-safe).

        With ``study_id`` the experiment is that study's: made with its id, or claimed when no
        study holds it yet; UserError when another study of that name holds it.
        """
        from mlflow.exceptions import MlflowException

        tags = {STUDY_ID_TAG: study_id, STORAGE_TAG: storage} if study_id else None
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                return self.client.create_experiment(name, tags={KIND_TAG: KIND, **(tags or {})})
            except MlflowException:  # another worker created it first
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            self.client.restore_experiment(found.experiment_id)
        self.mark_training(found.experiment_id, found.tags)
        if study_id:
            holder = self.holder(name)
            if holder is None:  # made by `mnistlab train`, or by hand: this study takes it
                for key, value in (tags or {}).items():
                    self.client.set_experiment_tag(found.experiment_id, key, value)
                holder = self.holder(name)
            if holder is not None and holder[0] != study_id:
                raise self.taken(name, holder[1])
        return found.experiment_id

    def mark_training(self, experiment_id: str, tags: dict[str, str] | None = None) -> bool:
        """Tag an experiment as model training for MLflow's UI unless it already says what it is (a
        user's own choice of kind is kept); True when the tag was set now."""
        if tags is None:
            tags = self.client.get_experiment(experiment_id).tags
        if tags.get(KIND_TAG):
            return False
        self.client.set_experiment_tag(experiment_id, KIND_TAG, KIND)
        return True

    def holder(self, name: str) -> tuple[str, str] | None:
        """The study that holds the experiment ``name``: (its id, its storage); the id is "" for a
        study made before study ids (a parent run without one). None when no study holds it."""
        found = self.client.get_experiment_by_name(name)
        if found is None:
            return None
        if found.tags.get(STUDY_ID_TAG):
            return found.tags[STUDY_ID_TAG], found.tags.get(STORAGE_TAG, "unknown")
        older = self.client.search_runs(
            [found.experiment_id], f"tags.`{PARENT_TAG}` = 'true' AND tags.`{STUDY_TAG}` = '{name}'", max_results=1)
        return ("", older[0].data.params.get("study.storage", "unknown")) if older else None

    def taken(self, name: str, storage: str) -> UserError:
        return UserError(f"study {name!r}: MLflow at {mask(self.uri)} already holds another study named {name!r} "
                         f"(in storage {storage}); rename this study, or give it its own --tracking-uri")

    def find_parent(self, experiment_id: str, study: str, study_id: str | None = None) -> str | None:
        """The oldest parent run of a study: every worker agrees on it."""
        query = f"tags.`{PARENT_TAG}` = 'true' AND tags.`{STUDY_TAG}` = '{study}'"
        if study_id:
            query += f" AND tags.`{STUDY_ID_TAG}` = '{study_id}'"
        runs = self.client.search_runs([experiment_id], query, order_by=["attributes.start_time ASC"], max_results=5)
        return min(runs, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id if runs else None

    def parent_run(self, experiment_id: str, study: str, params: dict[str, Any], study_id: str | None = None) -> str:
        """Get or create the study's one parent run."""
        existing = self.find_parent(experiment_id, study, study_id)
        if existing is not None:
            return existing
        tags = {PARENT_TAG: "true", STUDY_TAG: study, **({STUDY_ID_TAG: study_id} if study_id else {})}
        run = self.client.create_run(experiment_id, run_name=study, tags=tags)
        self.log_params(run.info.run_id, params)
        winner = self.find_parent(experiment_id, study, study_id)
        if winner != run.info.run_id:  # lost a race with another worker: keep one parent
            self.client.delete_run(run.info.run_id)
        return winner or run.info.run_id

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        """A new RUNNING run, nested under ``parent`` when given."""
        if parent is not None:
            tags = {**tags, "mlflow.parentRunId": parent}
        return self.client.create_run(experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start : start + 100])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    # -- metrics that must not be lost -----------------------------------------------------
    def log_metrics(self, run_id: str, values: dict[str, float], step: int = 0) -> None:
        """Log metrics at ``step``; on failure keep them and retry with the next call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.append((run_id, [Metric(k, float(v), now, step) for k, v in values.items()]))
        self.flush()

    def log_epoch(self, run_id: str, metrics: Any) -> None:
        """One epoch's metrics with ``step=epoch``."""
        values = asdict(metrics)
        # a refit's epochs measure nothing held out: their NaN validation figures are not logged
        self.log_metrics(run_id, {k: values[k] for k in EPOCH_METRICS if math.isfinite(values[k])},
                         step=metrics.epoch)

    def flush(self) -> bool:
        """Send what is queued; True when nothing is left."""
        from mlflow.exceptions import MlflowException

        while self.pending:
            run_id, metrics = self.pending[0]
            try:
                self.client.log_batch(run_id, metrics=metrics)
            except (MlflowException, OSError) as exc:
                if not self._warned:
                    warnings.warn(f"MLflow did not accept metrics ({type(exc).__name__}); keeping them "
                                  "locally and retrying", stacklevel=2)
                    self._warned = True
                return False
            self.pending.pop(0)
        return True

    def save_pending(self, path: Path) -> Path | None:
        """Write unsent metrics to a JSON file (sent later by ``send_pending``)."""
        if self.flush():
            return None
        rows = json.loads(path.read_text()) if path.is_file() else []  # an earlier attempt's, kept too
        rows += [{"run_id": r, "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                 for r, ms in self.pending for m in ms]
        path.write_text(json.dumps(rows) + "\n")
        self.pending.clear()  # they live in the file now; sending them twice would duplicate steps
        return path

    def send_pending(self, path: Path) -> int:
        """Send a file written by ``save_pending``; returns how many metrics went out."""
        from mlflow.entities import Metric

        rows = json.loads(path.read_text())
        for row in rows:
            self.pending.append((row["run_id"], [Metric(row["key"], row["value"], row["timestamp"], row["step"])]))
        if not self.flush():
            raise UserError(f"MLflow at {mask(self.uri)} still refuses the metrics in {path}")
        path.unlink()
        return len(rows)

    # -- artifacts and the end of a run ----------------------------------------------------
    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) pairs of one metric of a run."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    def get_run(self, run_id: str) -> Any:
        return self.client.get_run(run_id)

    def search_all_runs(self, experiment_id: str | None, query: str) -> list[Any]:
        """Every run of the experiment matching ``query``, page by page."""
        runs, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], query, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def set_status(self, run_id: str, status: str) -> None:
        """Mark a run RUNNING again (a study continued) without ending it."""
        self.client.update_run(run_id, status=status)

    def delete_tag(self, run_id: str, key: str) -> None:
        self.client.delete_tag(run_id, key)

    def checkpoint_names(self, run_id: str) -> set[str]:
        """The file names under the run's ``checkpoints/`` artifacts."""
        return {Path(a.path).name for a in self.client.list_artifacts(run_id, "checkpoints")}

    def download_artifact(self, run_id: str, path: str, into: Path) -> Path:
        return Path(self.client.download_artifacts(run_id, path, str(into)))

    def log_missing_epochs(self, run_id: str, history: list[Any]) -> list[int]:
        """Log the epochs of ``history`` a run lacks, metric by metric (a present value is never
        logged twice); returns the epochs that were missing from any metric."""
        from mlflow.entities import Metric

        now, missing, batch = int(time.time() * 1000), set(), []
        for key in EPOCH_METRICS:
            have = {step for step, _ in self.metric_history(run_id, key)}
            for m in history:
                if m.epoch not in have:
                    batch.append(Metric(key, float(getattr(m, key)), now, m.epoch))
                    missing.add(m.epoch)
        for start in range(0, len(batch), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(run_id, metrics=batch[start : start + 1000])
        return sorted(missing)

    def download_checkpoints(self, run_id: str, into: Path) -> Path | None:
        """The ``checkpoints/`` artifacts of a run, downloaded into ``into``; None if it has none."""
        try:
            into.mkdir(parents=True, exist_ok=True)
            return Path(self.client.download_artifacts(run_id, "checkpoints", str(into)))
        except Exception:  # no such artifacts, or the store is unreachable: the caller says what is missing
            return None

    def finish(self, run_id: str, status: str, tags: dict[str, Any] | None = None) -> None:
        """End a run as FINISHED, KILLED or FAILED."""
        if tags:
            self.set_tags(run_id, tags)
        self.client.set_terminated(run_id, status=status)


class RunLog:
    """One MLflow run of a training: per-epoch metrics, final figures, artifacts, status."""

    def __init__(self, tracker: Tracker, run_id: str, checkpoint_dir: Path, files: dict[str, Path]) -> None:
        self.tracker, self.run_id, self.checkpoint_dir, self.files = tracker, run_id, checkpoint_dir, files
        self.logged: set[int] = set()
        self.shared: dict[str, tuple[int, int]] = {}  # checkpoint file -> (mtime, size) as last sent
        self.share_failed = False

    @classmethod
    def start(cls, tracker: Tracker, experiment_id: str, name: str, cfg: Any, n_params: int, device: str,
              checkpoint_dir: Path, tags: dict[str, str], params: dict[str, Any] | None = None,
              parent: str | None = None, files: dict[str, Path] | None = None) -> RunLog:
        """Create the run and log its params: every config field by its dotted name."""
        from mnistlab.model import summary

        run_id = tracker.start_run(experiment_id, name, tags, parent)
        tracker.log_params(run_id, {**flatten(cfg.to_dict()), **(params or {}),
                                    "param_count": n_params, "device": device})
        texts = {"config.yaml": yaml_text(cfg.to_dict()), "model_summary.txt": summary(cfg.model) + "\n",
                 "environment.json": json.dumps(environment(), indent=2) + "\n"}
        try:
            for name, text in texts.items():
                tracker.log_text(run_id, text, name)
        except Exception as exc:  # an unwritable artifact store must not stop the training
            warnings.warn(f"MLflow cannot store artifacts of run {run_id} ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); checkpoints stay in {checkpoint_dir}", stacklevel=2)
        return cls(tracker, run_id, checkpoint_dir, files or {})

    def epoch(self, m: Any) -> None:
        self.tracker.log_epoch(self.run_id, m)
        self.logged.add(m.epoch)

    def share_checkpoint(self) -> None:
        """Send the epoch's checkpoint files to the run (``checkpoints/``), those changed since the
        last send, so that a retry on any machine can resume from them. A failed send is said once;
        training goes on, and the next epoch's send or the end of the run sends what is current."""
        for name in checkpoint.SHARED:
            path = self.checkpoint_dir / name
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            if self.shared.get(name) == stamp:
                continue
            try:
                self.tracker.log_artifact(self.run_id, path, "checkpoints")
            except Exception as exc:
                if not self.share_failed:
                    warnings.warn(f"could not send the checkpoint to MLflow run {self.run_id} "
                                  f"({type(exc).__name__}); training goes on and it is sent later", stacklevel=2)
                    self.share_failed = True
                return
            self.shared[name] = stamp

    def log_missing(self, history: list[Any]) -> None:
        """Log the epochs of ``history`` this run has not logged: those restored from a checkpoint
        ran before the run existed."""
        for m in history:
            if m.epoch not in self.logged:
                self.epoch(m)

    def _artifacts(self) -> dict[str, str]:
        """Upload the run's files; a failure is reported (and tagged), the files stay on local disk."""
        uploads = [(path, name) for name, path in self.files.items()]
        uploads += [(self.checkpoint_dir / n, "checkpoints") for n in checkpoint.KEPT]
        missing = []
        for path, where in uploads:
            if not path.is_file():
                continue
            if where == "checkpoints" and self.shared.get(path.name) == (path.stat().st_mtime_ns,
                                                                         path.stat().st_size):
                continue  # sent with its epoch already
            try:
                self.tracker.log_artifact(self.run_id, path, where)
            except Exception as exc:  # an unwritable or unreachable artifact store
                warnings.warn(f"could not upload {path} to MLflow run {self.run_id} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); it stays at {path}", stacklevel=2)
                missing.append(str(path))
        return {"mnistlab.missing_artifacts": ",".join(missing)[:5000]} if missing else {}

    def complete(self, result: Any) -> None:
        """FINISHED, with the test figures and the checkpoints."""
        self.log_missing(result.history)
        final = {"test_acc": result.test_acc, "test_loss": result.test_loss, **_score_metrics(result.history)}
        if result.best_epoch:  # a refit has no validation split and so no best epoch
            final.update(best_val_acc=result.best_val_acc, best_epoch=result.best_epoch)
        self.tracker.log_metrics(self.run_id, {k: v for k, v in final.items() if v is not None},
                                 step=result.epochs_run)
        self._close("FINISHED", {"mnistlab.epochs_run": result.epochs_run, **self._artifacts()})

    def end(self, exc: BaseException, history: list[Any]) -> None:
        """KILLED for a pruned or interrupted trial, FAILED with the reason otherwise."""
        self.log_missing(history)
        if type(exc).__name__ == "TrialPruned":
            self._close("KILLED", {"mnistlab.pruned_at_epoch": history[-1].epoch if history else 0,
                                   **self._artifacts()})
        elif isinstance(exc, KeyboardInterrupt):  # stopped by the user: quick, the checkpoints stay local
            self._close("KILLED", {"mnistlab.interrupted": getattr(exc, "signame", "SIGINT"),
                                   "mnistlab.epochs_run": history[-1].epoch if history else 0})
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._close("FAILED", {"mnistlab.fail_reason": reason[:5000]})

    def _close(self, status: str, tags: dict[str, Any]) -> None:
        """End the run; if MLflow is gone, keep what it missed beside the checkpoints and say so."""
        self.tracker.offline_until = 0.0  # the end of a run is worth one more real attempt
        pending = self.tracker.save_pending(self.checkpoint_dir / "mlflow-pending.json")
        if pending is not None:
            warnings.warn(f"MLflow is unreachable; unsent metrics kept in {pending}", stacklevel=2)
        try:
            self.tracker.finish(self.run_id, status, tags)
        except Exception as exc:  # the training result must survive a tracking outage
            note = self.checkpoint_dir / "mlflow-unfinished.json"
            runs = json.loads(note.read_text()) if note.is_file() else {}
            runs[self.run_id] = {"status": status, "tags": tags}
            note.write_text(json.dumps(runs) + "\n")
            warnings.warn(f"could not end MLflow run {self.run_id} ({type(exc).__name__}); noted in {note}",
                          stacklevel=2)


def _score_metrics(history: list[Any]) -> dict[str, float]:
    """The trial's ranking score and its standard error (see mnistlab.trials), for the run's page."""
    from mnistlab.trials import binomial_se, trial_score

    if not history or getattr(history[-1], "eval_split", "val") != "val":
        return {}
    value = trial_score([m.val_acc for m in history])
    return {"val_score": value, "val_se": binomial_se(value, history[-1].val_total)}


def yaml_text(raw: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(raw, sort_keys=False)


class StudyRecorder:
    """Nests each trained trial's run under the study's parent run and keeps its summary live."""

    def __init__(self, tracker: Tracker, study: str, experiment_id: str, parent_id: str, study_file: Path,
                 study_id: str | None = None) -> None:
        self.tracker, self.study, self.experiment_id = tracker, study, experiment_id
        self.parent_id, self.study_file = parent_id, study_file
        self.marked: dict[str, str] = {}  # run id -> its mnistlab.rank tag as last set by this process
        self.tags = {STUDY_TAG: study, **({STUDY_ID_TAG: study_id} if study_id else {})}

    def start(self, trial: Any, cfg: Any, n_params: int, checkpoint_dir: Path, device: str) -> RunLog:
        from mnistlab import trials as tr

        tags = {**self.tags, TRIAL_TAG: str(trial.number)}
        if trial.user_attrs.get(tr.MLFLOW_RUN_ID):  # a retry: link the run of the attempt that died
            tags["mnistlab.retry_of_run"] = trial.user_attrs[tr.MLFLOW_RUN_ID]
        if tr.REPEAT_OF in trial.user_attrs:  # a seed repeat: link the configuration it confirms
            tags.update({"mnistlab.repeat_of": str(trial.user_attrs[tr.REPEAT_OF]),
                         "mnistlab.seed": str(trial.user_attrs.get(tr.SEED))})
        run = RunLog.start(self.tracker, self.experiment_id, f"trial-{trial.number}", cfg, n_params, device,
                           checkpoint_dir, tags, params=dict(trial.params), parent=self.parent_id,
                           files={"study": self.study_file})
        trial.set_user_attr(tr.MLFLOW_RUN_ID, run.run_id)
        return run

    def start_refit(self, trial: int, cfg: Any, n_params: int, folder: Path, device: str) -> RunLog:
        """The run of one refit seed, under the parent, tagged with the trial it refits."""
        tags = {**self.tags, "mnistlab.refit": "true", "mnistlab.refit_of_trial": str(trial),
                "mnistlab.seed": str(cfg.train.seed)}
        return RunLog.start(self.tracker, self.experiment_id, f"refit-{trial}-seed-{cfg.train.seed}", cfg, n_params,
                            device, folder, tags, parent=self.parent_id,
                            files={"study": self.study_file} if self.study_file.is_file() else {})

    def backfill(self, trial: Any, cfg: Any, history: list[Any], checkpoint_dir: Path) -> str:
        """The run of a trial that trained while MLflow was unreachable, made afterwards from its
        checkpoint (``mnistlab study check --repair``); returns the new run id."""
        import types

        from mnistlab import trials as tr

        a = trial.user_attrs
        tags = {**self.tags, TRIAL_TAG: str(trial.number), "mnistlab.backfilled": "true"}
        run = RunLog.start(self.tracker, self.experiment_id, f"trial-{trial.number}", cfg, a[tr.PARAM_COUNT],
                           a.get(tr.DEVICE, "cpu"), checkpoint_dir, tags, params=dict(trial.params),
                           parent=self.parent_id, files={"study": self.study_file} if self.study_file.is_file() else {})
        for m in history:
            run.epoch(m)
        if trial.state.name == "COMPLETE":
            run.complete(types.SimpleNamespace(
                history=history, test_acc=a.get(tr.TEST_ACC), test_loss=None, best_val_acc=a.get(tr.BEST_VAL_ACC),
                best_epoch=a.get(tr.BEST_EPOCH), epochs_run=a.get(tr.EPOCHS_RUN, len(history))))
        else:
            from optuna import TrialPruned

            run.end(TrialPruned(), history)
        return run.run_id

    def summary(self, study: Any, trials: list[Any]) -> None:
        """Counts by state and the best trial so far, on the parent run (step = trials finished)."""
        from mnistlab import trials as tr
        from mnistlab.objective import state_label
        from mnistlab.trials import best_of, groups, tied_numbers

        counts = {"n_complete": 0, "n_pruned": 0, "n_over_budget": 0, "n_failed": 0, "n_running": 0}
        for t in trials:
            key = f"n_{state_label(t).lower()}"
            counts[key if key in counts else "n_failed"] += 1  # skipped, failed, waiting
        finished = sum(1 for t in trials if t.state.is_finished())
        values = dict(counts)
        tags = {}
        gs = groups(trials)
        best = best_of(gs)
        if best is not None:
            values.update(best_val_score=best.mean, best_val_se=best.se, best_val_acc=best.first.user_attrs.get(
                tr.BEST_VAL_ACC, best.mean), best_seeds=best.n_seeds)
            tied = sorted(tied_numbers(gs, best) - {best.number})
            tags = {"mnistlab.best_trial": best.number,
                    "mnistlab.best_run": best.first.user_attrs.get(tr.MLFLOW_RUN_ID),
                    "mnistlab.tied_with_best": ",".join(map(str, tied)) or "none"}
        try:
            self.tracker.log_metrics(self.parent_id, values, step=finished)
            if tags:
                self.tracker.set_tags(self.parent_id, tags)
            self._mark_ranks(gs, best)
        except Exception as exc:  # the summary is a convenience; a trial's own data is never at stake
            warnings.warn(f"could not update the study summary in MLflow ({type(exc).__name__})", stacklevel=2)

    def _mark_ranks(self, gs: list[Any], best: Any) -> None:
        """Tag each scored trial's run ``mnistlab.rank``: best, tied (within noise of it) or behind,
        so the runs table can be filtered on it; only changed tags are written."""
        from mnistlab import trials as tr
        from mnistlab.trials import tied

        for g in gs if best is not None else []:
            rank = "best" if g.number == best.number else ("tied" if tied(g, best) else "behind")
            for t in g.members:
                run_id = t.user_attrs.get(tr.MLFLOW_RUN_ID)
                if run_id and self.marked.get(run_id) != rank:
                    self.tracker.set_tags(run_id, {"mnistlab.rank": rank})
                    self.marked[run_id] = rank

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.tracker.metric_history(run_id, key)


REGISTRY_ALIAS = "best"


def register_model(tracker: Tracker, name: str, run_id: str | None, experiment_id: str | None, onnx_file: Path,
                   example: Any, tags: dict[str, Any]) -> int:
    """Register an exported model as ``models:/NAME@best``: a pyfunc that maps pixels to digits.

    The pyfunc is MLflow's "model from code" (``mnistlab/serving.py``) over the ONNX file, so
    loading it needs MLflow, numpy and onnxruntime only. Returns the new version number.
    """
    import mlflow
    import numpy as np
    from mlflow.models import Model, ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 1, 28, 28))]),
                               outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]))
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # mnistlab prints the outcome itself
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(tracker.uri)
    mlflow.set_registry_uri(tracker.uri)
    try:
        if experiment_id:
            mlflow.set_experiment(experiment_id=experiment_id)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MLflow's advice on pinning requirements: they are pinned here
            info = Model.log(artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run_id,
                             python_model=str(Path(__file__).with_name("serving.py")),
                             artifacts={"onnx": str(onnx_file)}, signature=signature, input_example=example,
                             pip_requirements=[f"mlflow=={metadata.version('mlflow')}",
                                               f"onnxruntime=={metadata.version('onnxruntime')}",
                                               f"numpy=={metadata.version('numpy')}"],
                             registered_model_name=name, await_registration_for=60)
        version = int(info.registered_model_version)
        tracker.client.set_registered_model_alias(name, REGISTRY_ALIAS, str(version))
        for key, value in tags.items():
            tracker.client.set_model_version_tag(name, str(version), key, str(value))
        return version
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
