"""`mnistlab ui`: MLflow's web UI over a local store, with a link to each study's runs table."""

from __future__ import annotations

import os
import sys
from urllib.parse import quote, urlencode, urlsplit

from mnistlab.tracking.tracker import KIND, KIND_TAG, Tracker
from mnistlab.tracking.ui_plugin import TRAINING, TRIALS_VIEW
from mnistlab.tracking.uri import mask, resolve_uri
from mnistlab.util.errors import UserError, clip

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def exposure_warning(host: str, auth: bool) -> str | None:
    """The warning for a UI bound beyond this machine without a login (None when there is no risk)."""
    if auth or host in LOOPBACK or host.startswith("127."):
        return None
    return (f"warning: the MLflow UI on {host} has no login: anyone who can reach this machine can read and "
            "change every run; add --auth (MLflow's basic-auth app) or bind 127.0.0.1")


AUTH_ENV = ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD")


def printable(name: str) -> str:
    """A name from the store as a terminal line shows it: anyone can name an experiment, and escape
    sequences or a newline in it would retitle the window, clear the screen or print a fake link."""
    return name if name.isprintable() else clip(name, 80)


def serve_ui(uri: str | None, host: str, port: int, auth: bool = False) -> int:
    """Run MLflow's server (the web UI) over a local store until interrupted; returns its exit code.

    The store's URI reaches the server through MLFLOW_BACKEND_STORE_URI, not its command line,
    which any user of the machine can read (``ps``) and which would show a database password.
    """
    uri = resolve_uri(uri)
    if urlsplit(uri).scheme in ("http", "https"):
        print(f"the tracking server {mask(uri)} serves the MLflow UI itself: open it in a browser")
        return 0
    if auth:  # MLflow's auth app signs its sessions with this key; without it, it fails after starting
        missing = [k for k in AUTH_ENV if not os.environ.get(k)]
        if missing:
            raise UserError(f"ui --auth: set {' and '.join(missing)} in the environment first (the secret that signs "
                            "login sessions, and the admin password MLflow's auth app creates its admin with)")
    warning = exposure_warning(host, auth)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
           "--app-name", "mnistlab-basic-auth" if auth else "mnistlab"]  # mnistlab/tracking/ui_plugin.py
    base = f"http://{host}:{port}"
    print(f"MLflow UI: {base}  (store {mask(uri)}; Ctrl-C stops it)", flush=True)
    tracker = Tracker(uri)
    for name, link in runs_links(tracker, base) if tracker.known() else []:
        print(f"  {printable(name)}: {link}", flush=True)
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}  # a password in the URI stays off the command line
    # MLflow's background job workers (GenAI evaluation jobs, trace roll-ups) serve nothing a
    # training tracker uses, and were most of the UI's processes and memory (docs/mlflow.md)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execve(sys.executable, cmd, env)  # the server takes this process over: signals reach it directly
    return 1  # not reached


# The printed link opens a study's runs table in model-training mode, sorted by val_acc (the trials flat, best
# first) whatever the browser chose before; the page's own first-visit defaults (ui_plugin.py) do the same for a
# plain click in a browser that has not chosen.
RUNS_VIEW = urlencode({"workflowType": TRAINING, "orderByKey": TRIALS_VIEW["orderByKey"],
                      "orderByAsc": str(TRIALS_VIEW["orderByAsc"]).lower()}, quote_via=quote)


def runs_links(tracker: Tracker, base: str, limit: int = 10) -> list[tuple[str, str]]:
    """(experiment name, link to its runs table) for the newest model-training experiments of a store."""
    found = tracker.client.search_experiments(filter_string=f"tags.`{KIND_TAG}` = '{KIND}'", max_results=limit,
                                              order_by=["last_update_time DESC"])
    return [(e.name, f"{base}/#/experiments/{e.experiment_id}/runs?{RUNS_VIEW}") for e in found]

