"""Shared fixtures: the real MNIST cache, fresh MLflow stores, a real `mlflow server`, PostgreSQL."""

from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from mnistlab.core import data

ROOT = Path(__file__).resolve().parent.parent

PG_ADMIN = os.environ.get("MNISTLAB_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")

# One torch thread for what trains in this process: on a busy 2-core machine OpenMP's second thread
# mostly waits for a core (the fast tier's trainer and study tests: 16 s with one thread, 26-30 s with two).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real MNIST cache, built once per test session from the IDX files mnistlab ships (seconds)."""
    root = tmp_path_factory.mktemp("mnist")
    data.prepare(root)
    return root


@pytest.fixture(autouse=True)
def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs in its own folder; nothing reads the user's stores or cache.

    A test that does not ask for ``data_dir`` sees a data folder that does not exist; should it
    build a cache there anyway (the library builds one on first use), it fails: it needs ``data_dir``.
    """
    monkeypatch.chdir(tmp_path)
    no_data = tmp_path / "no-mnist-cache"
    monkeypatch.setenv("MNISTLAB_DATA_DIR", str(no_data))
    for name in ("MLFLOW_TRACKING_URI", "MNISTLAB_STORAGE", "MNISTLAB_WAIT", "MNISTLAB_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    yield
    if "data_dir" not in request.fixturenames and (no_data / data.CACHE_FILE).exists():
        pytest.fail("this test built an MNIST cache of its own: it should use the data_dir fixture")


@pytest.fixture
def data_dir(_isolate: None, mnist_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shared MNIST cache, also as MNISTLAB_DATA_DIR for the commands a test runs."""
    monkeypatch.setenv("MNISTLAB_DATA_DIR", str(mnist_cache))
    return mnist_cache


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its schema migrated once (migrations take seconds)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(tmp_path: Path, _mlflow_template: Path) -> str:
    """A fresh embedded MLflow store (the default: mlflow.db in the working folder)."""
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


class HealthHandler(http.server.BaseHTTPRequestHandler):
    """A stand-in tracking server's health check: 200 on /health, 404 elsewhere, nothing logged."""

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend: str, artifacts: Path, port: int | None = None, extra: list[str] | None = None,
                        env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """A real `mlflow server` on a free loopback port with proxied artifacts; waits for /health."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
           "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           *(extra or [])]
    log = open(artifacts.parent / f"mlflow-server-{port}.log", "ab")  # noqa: SIM115 - closed with the process
    # as `mnistlab ui` and the compose stack run it: without MLflow's background job workers (8 more
    # processes and about 1.5 GB, which slowed every test beside a server on a 2-core machine)
    quiet = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **quiet, **(env or {})})

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(artifacts.parent / f'mlflow-server-{port}.log').read_text()}")
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200

    wait_until(f"the mlflow server on port {port} healthy", healthy, 90, proc, poll=0.5, ignore=(OSError,))
    return proc, url


def pruning_study(tmp_path: Path, storage: str | None = None, *, name: str = "track", warmup: int = 0,
                  overrides: str = "{train.epochs: 2, train.batch_size: 64, data.limit_train: 1500, "
                                   "data.limit_eval: 500}") -> Path:
    """A created two-trial study: trial 0 learns (train.lr 0.1), trial 1 is hopeless (1e-5), so the
    median pruner prunes it after epoch ``warmup + 1``, deterministically. Returns its study file."""
    from mnistlab.search import study_file
    from mnistlab.search.storage import create, open_storage

    path = tmp_path / f"{name}.yaml"
    path.write_text(f"""
name: {name}
base: {ROOT / 'experiments' / 'eva4-s4.yaml'}
overrides: {overrides}
max_params: 20000
pruner: {{name: median, n_startup_trials: 1, n_warmup_steps: {warmup}}}
sampler: {{name: random, seed: 3}}
n_trials: 2
enqueue_base: false
space:
  train.lr: {{type: float, low: 0.00001, high: 0.2, log: true}}
""")
    s = create(study_file.load_study(path), open_storage(storage, heartbeat=None))
    s.enqueue_trial({"train.lr": 0.1})
    s.enqueue_trial({"train.lr": 0.00001})
    return path


def wait_until(what: str, found: Callable[[], Any], timeout: float = 300, proc: subprocess.Popen | None = None,
               poll: float = 0.05, ignore: tuple[type[BaseException], ...] = ()) -> Any:
    """The first truthy value of ``found()``, polled every ``poll`` seconds; the test fails naming
    ``what`` after ``timeout`` seconds, or at once when ``proc`` exits first (with its output). An
    exception of a type in ``ignore`` counts as "not yet" (a server still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = found()
        except ignore:
            value = None
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out = proc.communicate() if proc.stdout or proc.stderr else ""
            pytest.fail(f"{what}: the process exited {proc.returncode} first {out}")
        if time.monotonic() > deadline:
            if proc is not None:
                proc.kill()
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path, _mlflow_template: Path) -> Iterator[str]:
    """A real MLflow tracking server with a SQLite backend; yields its URL."""
    shutil.copy(_mlflow_template, tmp_path / "server.db")
    proc, url = start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "server-artifacts")
    yield url
    stop(proc)


def _pg_available() -> bool:
    try:
        import psycopg

        psycopg.connect(PG_ADMIN, connect_timeout=3).close()
        return True
    except Exception:
        return False


@pytest.fixture
def pg_database() -> Iterator[Callable[[], str]]:
    """Makes new, empty PostgreSQL databases on the local server; all dropped afterwards."""
    import psycopg

    if not _pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN}")
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN}")
    names: list[str] = []

    def make() -> str:
        name = f"mnistlab_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        names.append(name)
        return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with psycopg.connect(PG_ADMIN, autocommit=True) as con:
        for name in names:
            con.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def pg_url(pg_database: Callable[[], str]) -> str:
    """A new, empty PostgreSQL database on the local server; dropped afterwards."""
    return pg_database()


def trial_dir(artifacts: Path, number: int, study: str = "smoke") -> Path:
    """Trial ``number``'s checkpoint folder under ``artifacts``: ``NAME-<study id>/trial-N``, or
    ``NAME/trial-N`` as studies made before study ids have it (and while nothing exists yet)."""
    found = sorted(artifacts.glob(f"{study}-*/trial-{number}")) or [artifacts / study / f"trial-{number}"]
    return found[0]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """`mnistlab ARGS` in this process, through the real entry point: exit code, stdout, stderr."""
    from mnistlab.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, message: str) -> None:
    """Bad input is exit code 2 and one line on stderr, `error: ...`, naming the problem; no traceback."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`mnistlab ARGS` in a real subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "mnistlab", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, cwd=cwd)
