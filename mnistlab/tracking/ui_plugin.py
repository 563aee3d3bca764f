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
  study's parent run.

What a user then chooses in the UI is kept by the browser and never overwritten. The keys are MLflow's
UI internals: ``docs/screenshots.py`` (run by a test) opens the plain experiment address in a fresh
headless Chromium and fails when a new MLflow UI no longer reads them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from mnistlab.tracking.tracker import KIND, KIND_TAG

WORKFLOW_KEY = "mlflow.workflowType_v1"
TRAINING = "machine_learning"
TRIALS_VIEW = {"orderByKey": "metrics.`val_acc`", "orderByAsc": False}  # also the sort of the links server.py prints
SEEDED = 1000  # experiments given the trials view per page load, newest first

_log = logging.getLogger(__name__)


def state_key(experiment_id: str) -> str:
    """Where MLflow's UI keeps the runs-table view of one experiment in a browser's localStorage."""
    ids = json.dumps([experiment_id], separators=(",", ":"))
    return f"MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"


def first_visit_script(experiment_ids: list[str]) -> str:
    """The script put in front of MLflow's page: defaults for what a browser has not chosen."""
    data = {"workflow": [WORKFLOW_KEY, json.dumps(TRAINING)], "view": json.dumps(TRIALS_VIEW),
            "states": [state_key(i) for i in experiment_ids]}
    text = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")  # nothing closes the script tag
    return ("<script>(function(d){try{var s=window.localStorage;"
            "if(s.getItem(d.workflow[0])===null)s.setItem(d.workflow[0],d.workflow[1]);"
            "d.states.forEach(function(k){if(s.getItem(k)===null)s.setItem(k,d.view)})}catch(e){}})"
            f"({text});</script>")


def study_experiments(store: Any) -> list[str]:
    """Ids of the store's model-training experiments (the kind mnistlab gives every experiment it makes, and
    `study check --repair` gives older ones), newest first."""
    from mlflow.entities import ViewType

    found = store.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=SEEDED,
                                     filter_string=f"tags.`{KIND_TAG}` = '{KIND}'",
                                     order_by=["last_update_time DESC"])
    return [e.experiment_id for e in found]


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
