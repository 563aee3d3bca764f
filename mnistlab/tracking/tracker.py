"""The MLflow adapter: a Tracker is an MlflowClient bound to one tracking URI.

The adapter is the ``mnistlab.tracking`` package: this module, client.py (the client itself,
behind a circuit breaker), registry.py (the model registry) and serving.py (the registered
model's pyfunc) are the only modules that import mlflow. Runs are addressed by explicit run ids through
``MlflowClient``, never through MLflow's global active run, so threads, processes and machines
can log at once. A study is an MLflow experiment with one parent run; each trained trial is a
child run of it (recorder.py says what each run holds).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from mnistlab.tracking.client import connect
from mnistlab.tracking.uri import mask, resolve_uri, sqlite_file
from mnistlab.util.errors import UserError
from mnistlab.util.jsonfile import read_json, read_note, write_json
from mnistlab.util.keys import PARENT_TAG, STORAGE_TAG, STUDY_ID_TAG, STUDY_TAG

if TYPE_CHECKING:
    from mnistlab.core.metrics import EpochMetrics

# MLflow 3's UI reads this experiment tag to tell model training from GenAI work (values in its UI bundle:
# genai_development, custom_model_development, ...); mnistlab's experiments are model training.
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s")


def epoch_values(metrics: EpochMetrics) -> dict[str, float]:
    """One epoch's figures under their MLflow names. A full-train run (no validation split) evaluates
    the test set each epoch: those figures are logged as ``test_loss``/``test_acc``, never as
    validation. A refit's epochs measure nothing held out: their NaN figures are not logged."""
    values = {key: float(getattr(metrics, key)) for key in EPOCH_METRICS}
    if getattr(metrics, "eval_split", "val") == "test":
        values["test_loss"], values["test_acc"] = values.pop("val_loss"), values.pop("val_acc")
    return {key: value for key, value in values.items() if math.isfinite(value)}


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


@dataclass(frozen=True)
class RunRecord:
    """What mnistlab reads of an MLflow run: the commands above the adapter see this, never
    MLflow's own run objects."""

    run_id: str
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    tags: dict[str, str]

    @classmethod
    def of(cls, run: Any) -> RunRecord:
        return cls(run.info.run_id, run.info.status, dict(run.data.tags))


class Tracker:
    """An MLflow client bound to one tracking URI, with a local queue for what fails to send."""

    def __init__(self, uri: str | None = None, recorded: str | None = None) -> None:
        self.uri = resolve_uri(uri, recorded)  # ``recorded``: the URI a study recorded, used when nothing else is given
        self._client: Any = None
        self.pending: list[tuple[str, list[Any]]] = []  # (run_id, metrics) not yet accepted
        self._warned = False
        self.offline_until = 0.0

    @property
    def client(self) -> Any:
        """The MlflowClient, made on first use (making it creates a local store's database)."""
        if self._client is None:
            self._client = connect(self)
        return self._client

    def known(self) -> bool:
        """False for a local store that does not exist yet (using it would create it)."""
        parts = urlsplit(self.uri)
        if parts.scheme == "sqlite":
            database = sqlite_file(self.uri)
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

    def tag_experiment(self, experiment_id: str, key: str, value: str) -> None:
        """Set one experiment tag unless it already holds ``value``."""
        if self.client.get_experiment(experiment_id).tags.get(key) != value:
            self.client.set_experiment_tag(experiment_id, key, value)

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

    def log_epoch(self, run_id: str, metrics: EpochMetrics) -> None:
        """One epoch's metrics with ``step=epoch``."""
        self.log_metrics(run_id, epoch_values(metrics), step=metrics.epoch)

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
        rows = read_note(path, list)  # an earlier attempt's, kept too
        rows += [{"run_id": r, "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}
                 for r, ms in self.pending for m in ms]
        write_json(path, rows)
        self.pending.clear()  # they live in the file now; sending them twice would duplicate steps
        return path

    def send_pending(self, path: Path) -> int:
        """Send a file written by ``save_pending``; returns how many metrics went out."""
        from mlflow.entities import Metric

        rows = read_json(path)
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

    def get_run(self, run_id: str) -> RunRecord:
        return RunRecord.of(self.client.get_run(run_id))

    def search_all_runs(self, experiment_id: str | None, query: str) -> list[RunRecord]:
        """Every run of the experiment matching ``query``, page by page."""
        runs: list[RunRecord] = []
        token = None
        while True:
            page = self.client.search_runs([experiment_id], query, max_results=1000, page_token=token)
            runs.extend(map(RunRecord.of, page))
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
        have: dict[str, set[int]] = {}
        for m in history:
            for key, value in epoch_values(m).items():
                if key not in have:
                    have[key] = {step for step, _ in self.metric_history(run_id, key)}
                if m.epoch not in have[key]:
                    batch.append(Metric(key, value, now, m.epoch))
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
