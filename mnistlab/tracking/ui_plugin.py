"""MLflow's server as `mnistlab ui` runs it: a click on a study's experiment opens its trials.

MLflow 3.17's web UI decides an experiment's first page by a switch each browser keeps (``localStorage``
key ``mlflow.workflowType_v1``: "GenAI", the default, or "Model training"), not by the experiment's
``mlflow.experimentKind`` tag; and its runs table folds a parent run's children until they are
expanded. The app factories here (``mlflow.app`` entry points, run by ``mlflow server --app-name
mnistlab`` or ``mnistlab-basic-auth``) are MLflow's own server with one change: the page they serve
starts with a short script that, in a browser that has not chosen yet,

- sets the switch to "Model training", so a click on an experiment opens its runs table;
- gives each experiment mnistlab made (tagged model training) not yet opened in this browser the
  table's sort by ``val_acc``, best first, which lists the trials flat instead of folded under the
  study's parent run, and its first columns: ``val_score``, ``val_se``, ``param_count``, the
  ``mnistlab.rank`` tag, then the study's searched hyperparameters (the experiment tag
  ``mnistlab.columns`` that `study run` sets);
- marks MLflow's Assistant as already opened once, so that it does not open itself over a third of
  the page on the first visit (a click on its button still opens it);
- starts a run's "Model metrics" tab, the first time it opens in this browser, with the charts of the
  score and the losses (``val_acc``, ``val_loss``, ``train_loss``, ``train_acc``; ``test_*`` for a run
  without validation) instead of MLflow's order by name; the run's metrics are read through MLflow's own
  API, as the page reads them.

The script is ``first_visit.js`` beside this file. What a user then chooses in the UI is kept by the
browser and never overwritten. The keys and the chart cards' fields are MLflow's UI internals:
``docs/screenshots.py`` (run by a test) opens the plain experiment address and a trial's charts in a
fresh headless Chromium and fails when a new MLflow UI no longer reads them.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

from mnistlab.tracking.tracker import KIND, KIND_TAG
from mnistlab.util.keys import COLUMNS_TAG, RANK_TAG

WORKFLOW_KEY = "mlflow.workflowType_v1"
TRAINING = "machine_learning"
TRIALS_VIEW = {"orderByKey": "metrics.`val_acc`", "orderByAsc": False}  # also the sort of the links server.py prints
SEEDED = 1000  # experiments given the trials view per page load, newest first
# The runs table's first columns: the score, its standard error, the parameter count and the rank,
# then the study's searched hyperparameters (the experiment tag COLUMNS_TAG, set by `study run`).
SCORE_COLUMNS = ["metrics.`val_score`", "metrics.`val_se`", "params.`param_count`", f"tags.`{RANK_TAG}`"]
# MLflow's Assistant opens itself on a browser's first visit to a local server, over a third of the
# page: marked as done, it stays closed until the user opens it.
ASSISTANT_KEY = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"

_log = logging.getLogger(__name__)


def state_key(experiment_id: str) -> str:
    """Where MLflow's UI keeps the runs-table view of one experiment in a browser's localStorage."""
    ids = json.dumps([experiment_id], separators=(",", ":"))
    return f"MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"


def searched_columns(space_names: list[str]) -> list[str]:
    """The runs-table columns of a study's searched names: ``model.widths.1`` is a position in the
    ``model.widths`` param, which holds the whole list."""
    out: list[str] = []
    for name in space_names:
        head, _, tail = name.rpartition(".")
        column = f"params.`{head if tail.isdigit() and head else name}`"
        if column not in out:
            out.append(column)
    return out


def table_view(columns: list[str] | None) -> dict[str, Any]:
    """The runs-table state a browser that never opened the experiment starts with."""
    return {**TRIALS_VIEW, "selectedColumns": SCORE_COLUMNS + [c for c in columns or [] if c not in SCORE_COLUMNS]}


def first_visit_script(experiments: list[tuple[str, list[str] | None]]) -> str:
    """The script put in front of MLflow's page (first_visit.js with its data): defaults for what a browser
    has not chosen. ``experiments``: (id, searched columns) of each model-training experiment."""
    data = {"workflow": [WORKFLOW_KEY, json.dumps(TRAINING)], "assistant": ASSISTANT_KEY,
            "states": [[state_key(i), json.dumps(table_view(columns))] for i, columns in experiments],
            "experiments": [i for i, _ in experiments]}
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # nothing closes the script tag
    return f"<script>{_script()}({text});</script>"


@functools.cache
def _script() -> str:
    return Path(__file__).with_name("first_visit.js").read_text(encoding="utf-8").strip()


def study_experiments(store: Any) -> list[tuple[str, list[str] | None]]:
    """(id, searched columns) of the store's model-training experiments (the kind mnistlab gives every
    experiment it makes, and `study check --repair` gives older ones), newest first."""
    from mlflow.entities import ViewType

    found = store.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=SEEDED,
                                     filter_string=f"tags.`{KIND_TAG}` = '{KIND}'",
                                     order_by=["last_update_time DESC"])
    out = []
    for e in found:
        try:
            columns = json.loads(e.tags.get(COLUMNS_TAG, "null"))
        except ValueError:
            columns = None
        ok = isinstance(columns, list) and all(isinstance(c, str) and len(c) < 300 for c in columns)
        out.append((e.experiment_id, columns[:50] if ok else None))
    return out


def open_on_trials(flask_app: Any) -> None:
    """Serve MLflow's page with the first-visit script; the store is read on each page load."""
    from flask import Response
    from mlflow.server.handlers import _get_tracking_store

    index = Path(flask_app.static_folder) / "index.html"
    serve = flask_app.view_functions["serve"]

    def page() -> Any:
        if not index.is_file():
            return serve()  # MLflow's own answer for a build without its UI
        try:
            ids = study_experiments(_get_tracking_store())
        except Exception as exc:  # the store unreachable: the page still opens, without the trials view
            _log.warning("mnistlab ui: could not list the model-training experiments: %s", type(exc).__name__)
            ids = []
        html = index.read_text(encoding="utf-8")
        return Response(html.replace("<head>", "<head>" + first_visit_script(ids), 1), mimetype="text/html")

    flask_app.view_functions["serve"] = page


def _asgi(flask_app: Any) -> Any:
    """The app the chosen server runs: FastAPI around Flask under uvicorn (MLflow's default), else Flask."""
    from mlflow.environment_variables import _MLFLOW_SGI_NAME

    if _MLFLOW_SGI_NAME.get() == "uvicorn":
        from mlflow.server.fastapi_app import create_fastapi_app

        return create_fastapi_app(flask_app)
    return flask_app


def create_app() -> Any:
    """``mlflow server --app-name mnistlab``: MLflow's server whose UI opens studies on their trials."""
    from mlflow.server import app as flask_app

    open_on_trials(flask_app)
    return _asgi(flask_app)


def create_auth_app() -> Any:
    """``mlflow server --app-name mnistlab-basic-auth``: the same with MLflow's basic-auth app."""
    import fcntl

    from mlflow.server import app as flask_app
    from mlflow.server.auth import create_app as basic_auth

    open_on_trials(flask_app)
    # Unlike `--app-name basic-auth`, each server worker creates MLflow's auth tables and admin user itself:
    # one at a time, under a lock on this (read-only) module file, which creates nothing.
    with open(__file__, "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return basic_auth(flask_app)  # the FastAPI app with its permission middleware under uvicorn
