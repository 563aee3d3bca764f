"""Scale-out: the compose stack validated, and its topology reproduced natively.

No Docker engine runs on the machines that run these tests, so the stack is not started:
its file is checked with Debian's `docker-compose config`, and the same topology (PostgreSQL,
an `mlflow server` with a PostgreSQL backend and proxied artifacts, a create step, three
workers) runs here with the same commands and environment variable names.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

from conftest import ROOT, free_port, run_cli, start_mlflow_server, stop, wait_until
from mnistlab.core.trials import trained
from mnistlab.search.storage import load, open_storage

# All in the full tier: servers, workers, and docker-compose run as a program several times.
pytestmark = pytest.mark.slow

SMOKE = ROOT / "studies" / "smoke.yaml"
FAST = ["--epochs", "1", "--limit-train", "1000", "--limit-eval", "500", "--threads", "1"]
MLFLOW_CLIENT_ENV = {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}


def compose(*files: str, env_file: str | None = ".env.example") -> subprocess.CompletedProcess:
    """`docker-compose config` on the project's files: parses, merges, interpolates, validates."""
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is not installed (.ci/run installs Debian's package)")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    args = [exe, "--project-directory", str(ROOT)]
    if env_file:
        args += ["--env-file", str(ROOT / env_file)]
    for f in files:
        args += ["-f", str(ROOT / f)]
    return subprocess.run([*args, "config"], capture_output=True, text=True, env={
        k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "MLFLOW_", "MNISTLAB_"))})


def resolved(*files: str) -> dict[str, Any]:
    proc = compose(*(files or ("docker-compose.yml",)))
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def env_names_mnistlab_reads() -> set[str]:
    """Environment variables the package reads, found in its source."""
    names = set()
    for path in (ROOT / "mnistlab").rglob("*.py"):  # every package of it
        text = path.read_text()
        names |= set(re.findall(r"environ(?:\.get)?\(\s*\"([A-Z_]+)\"", text))
        names |= set(re.findall(r"environ\[\"([A-Z_]+)\"\]", text))
        names |= set(re.findall(r"envvar=\"([A-Z_]+)\"", text))
    return names


def cli_parses(args: list[str]) -> None:
    """The arguments are a valid `mnistlab` command line: parsed (unknown options fail), not run."""
    import typer

    from mnistlab.cli import app

    command, rest = typer.main.get_command(app), list(args)
    while rest and rest[0] in getattr(command, "commands", {}):
        command = command.commands[rest.pop(0)]
    command.make_context(command.name, rest)


def test_the_compose_stack_is_valid_and_wired(tmp_path: Path) -> None:
    cfg = resolved()
    services = cfg["services"]
    assert set(services) == {"secrets", "postgres", "mlflow", "create", "worker", "dashboard"}
    assert set(cfg["volumes"]) == {"pgdata", "mlflow-artifacts"}
    # Workers share nothing but the servers: no volume of their own, checkpoints go through MLflow.
    assert all(str(v).endswith(":ro") for v in services["worker"]["volumes"]), services["worker"]
    dashboard = services["dashboard"]
    assert dashboard["depends_on"] == {"create": {"condition": "service_completed_successfully"}}
    assert dashboard["environment"]["MNISTLAB_STORAGE"].endswith("@postgres:5432/optuna")
    assert "change-me" not in " ".join(dashboard["entrypoint"] + dashboard["command"])  # the password stays in env
    assert services["postgres"]["depends_on"] == {"secrets": {"condition": "service_completed_successfully"}}
    assert services["secrets"]["environment"] == {"POSTGRES_PASSWORD": "change-me-postgres"}
    assert services["mlflow"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["create"]["depends_on"] == {"postgres": {"condition": "service_healthy"},
                                                "mlflow": {"condition": "service_healthy"}}
    assert services["worker"]["depends_on"] == {"create": {"condition": "service_completed_successfully"}}
    for name in ("postgres", "mlflow"):
        test = services[name]["healthcheck"]["test"]
        # podman's Docker API splits a CMD test's arguments at spaces: a shell string survives both engines.
        assert test[0] == "CMD-SHELL" and len(test) == 2, (name, test)
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    # Published ports listen on loopback unless MNISTLAB_BIND says otherwise.
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(str(p).startswith("127.0.0.1:") for p in published), published
    # Both databases live in the one PostgreSQL; MLflow proxies artifacts on its volume.
    server = services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert "--backend-store-uri" not in server  # its password stays off the command line
    assert server[server.index("--app-name") + 1] == "mnistlab"
    assert "--serve-artifacts" in server and server[server.index("--host") + 1] == "0.0.0.0"
    assert "mlflow:5000" in services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"]
    assert services["postgres"]["environment"]["MLFLOW_DB"] == "mlflow"
    # Workers and the create step speak mnistlab: known variables, valid command lines.
    known = env_names_mnistlab_reads() | MLFLOW_CLIENT_ENV
    for name in ("create", "worker"):
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert env["MNISTLAB_STORAGE"].endswith("@postgres:5432/optuna")
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        cli_parses(services[name]["command"])
    assert services["create"]["command"][:2] == ["study", "create"]
    assert services["worker"]["command"][:2] == ["study", "run"]
    for study_file in {services[n]["command"][2] for n in ("create", "worker")}:
        assert (ROOT / study_file).is_file(), study_file
    assert all(p.is_file() for p in [ROOT / "Dockerfile", ROOT / "docker" / "postgres-init.sh"])


def test_the_gpu_and_auth_variants(tmp_path: Path) -> None:
    gpu = resolved("docker-compose.yml", "docker-compose.gpu.yml")["services"]
    devices = gpu["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["worker"]["command"][-2:] == ["--device", "cuda"]
    assert {s["build"]["args"]["TORCH_INDEX"] for s in gpu.values() if "build" in s} == {
        "https://download.pytorch.org/whl/cu128"}
    cli_parses(gpu["worker"]["command"])
    auth = resolved("docker-compose.yml", "docker-compose.auth.yml")["services"]
    server = auth["mlflow"]
    assert server["command"][server["command"].index("--app-name") + 1] == "mnistlab-basic-auth"
    assert "--backend-store-uri" not in server["command"] and server["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert server["environment"]["MLFLOW_AUTH_ADMIN_PASSWORD"] == "change-me-mlflow"  # from .env.example
    for name in ("create", "worker", "secrets"):
        assert auth[name]["environment"]["MLFLOW_TRACKING_PASSWORD"] == "change-me-mlflow"
    assert set(auth["secrets"]["environment"]) == {"POSTGRES_PASSWORD", "MLFLOW_TRACKING_PASSWORD",
                                                   "MLFLOW_FLASK_SERVER_SECRET_KEY"}
    # Without a .env the stack refuses to start rather than run with a default password.
    bare = compose("docker-compose.yml", env_file=None)
    assert bare.returncode != 0 and "POSTGRES_PASSWORD" in bare.stderr
    bare = compose("docker-compose.yml", "docker-compose.auth.yml", env_file=None)
    assert bare.returncode != 0


def example_env() -> dict[str, str]:
    """The settings of .env.example, as docker compose reads them."""
    lines = (ROOT / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def check_secrets(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The stack's first step, docker/check-secrets.sh, as its container runs it (sh, these variables)."""
    return subprocess.run(["sh", str(ROOT / "docker" / "check-secrets.sh")], capture_output=True, text=True,
                          env={"PATH": os.environ["PATH"], **env})


def test_the_stack_refuses_the_example_passwords() -> None:
    """Every service waits for the secrets step, which fails on a change-me-... value of .env.example."""
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert raw["postgres"]["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
    assert raw["secrets"]["volumes"] == ["./docker/check-secrets.sh:/check-secrets.sh:ro"]
    for name in ("mlflow", "create", "worker"):  # each waits on postgres, directly or through another service
        assert raw[name]["depends_on"], name
    example = example_env()
    base = {"POSTGRES_PASSWORD": example["POSTGRES_PASSWORD"]}
    auth = {k: example[k] for k in ("POSTGRES_PASSWORD", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")}
    refused = check_secrets(base)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines() == [
        "error: POSTGRES_PASSWORD: empty or still the example value from .env.example; set your own secrets in .env"]
    refused = check_secrets({**auth, "POSTGRES_PASSWORD": "a-real-one"})
    assert refused.returncode == 1
    assert "MLFLOW_TRACKING_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY:" in refused.stderr
    assert check_secrets({"POSTGRES_PASSWORD": ""}).returncode == 1
    assert check_secrets({"POSTGRES_PASSWORD": "CHANGE-ME-postgres"}).returncode == 1  # the example, in capitals
    assert check_secrets({"POSTGRES_PASSWORD": "a-real-one"}).returncode == 0
    assert check_secrets({k: f"real-{k}" for k in auth}).returncode == 0


def compose_app(compose_file: str) -> list[str]:
    """The `--app-name NAME` a compose file gives the mlflow service, to run the same server natively."""
    command = yaml.safe_load((ROOT / compose_file).read_text())["services"]["mlflow"]["command"]
    return command[command.index("--app-name"):][:2]


def compose_env(service: str) -> dict[str, str]:
    """A service's environment from the raw compose file, ${VAR:-default} resolved to defaults."""
    raw = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = raw["services"][service].get("environment", {})
    return {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in env.items()}


def test_the_stack_topology_runs_natively(tmp_path: Path, pg_database: Any, data_dir: Path) -> None:
    """PostgreSQL + mlflow server (PostgreSQL backend, proxied artifacts) + create + 3 workers."""
    optuna_db, mlflow_db = pg_database(), pg_database()
    server_env = compose_env("mlflow")
    server, url = start_mlflow_server(mlflow_db, tmp_path / "mlflow-artifacts",
                                      extra=["--serve-artifacts", *compose_app("docker-compose.yml")], env=server_env)
    try:
        worker_env = compose_env("worker")
        env = {name: {"MNISTLAB_STORAGE": optuna_db, "MLFLOW_TRACKING_URI": url,
                      "MNISTLAB_DATA_DIR": str(data_dir)}.get(name, value) for name, value in worker_env.items()}
        created = run_cli("study", "create", str(SMOKE), env=env)
        assert created.returncode == 0, created.stderr
        assert "study 'smoke' ready" in created.stdout
        cmd = [sys.executable, "-m", "mnistlab", "study", "run", str(SMOKE), "--n-trials", "5", *FAST]
        # stateless workers: each its own artifacts folder, as on separate machines
        workers = [subprocess.Popen([*cmd, "--artifacts", str(tmp_path / f"worker-{i}")], env={**os.environ, **env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(3)]
        outputs = [w.communicate(timeout=600)[0] for w in workers]
        assert [w.returncode for w in workers] == [0, 0, 0], outputs
        assert not [out for out in outputs if "warning: " in out], outputs  # nothing local to any one machine
        assert_consistent(optuna_db, url, n_trained=5)
        assert dashboard_lists(optuna_db, "smoke")
    finally:
        stop(server)


def dashboard_lists(storage_url: str, name: str) -> bool:
    """The compose file's dashboard command, run natively on loopback: it serves the study."""
    import json
    import urllib.request

    service = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["dashboard"]
    code = service["command"][0]
    assert "host='0.0.0.0'" in code
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", code.replace("host='0.0.0.0'", "host='127.0.0.1'")],
                            env={**os.environ, "MNISTLAB_STORAGE": storage_url, "DASHBOARD_PORT": str(port)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:

        def studies() -> list[str]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5) as resp:
                return [s["study_name"] for s in json.load(resp)["study_summaries"]] or ["(none)"]

        return name in wait_until("the dashboard's study list", studies, 60, proc, poll=0.5, ignore=(OSError,))
    finally:
        stop(proc)


@pytest.mark.usefixtures("data_dir")
def test_a_server_keeping_artifacts_on_each_workers_disk_is_said_at_start(tmp_path: Path, pg_url: str) -> None:
    """`mlflow server` without proxied artifacts hands clients a local path: each worker would keep
    its checkpoints on its own disk. The first line of stderr says so; the study still runs."""
    server, url = start_mlflow_server(f"sqlite:///{tmp_path / 'server.db'}", tmp_path / "proxied",
                                      extra=["--no-serve-artifacts", "--default-artifact-root",
                                             str(tmp_path / "server-local")])
    try:
        proc = run_cli("study", "run", str(SMOKE), "--n-trials", "1", "--epochs", "1", "--limit-train", "300",
                       "--limit-eval", "100", "--storage", pg_url, "--tracking-uri", url)
        assert proc.returncode == 0, proc.stderr
        assert "warning: the MLflow server keeps artifacts at" in proc.stderr, proc.stderr
        assert "proxied artifacts" in proc.stderr
    finally:
        stop(server)


def assert_consistent(storage_url: str, tracking_uri: str, n_trained: int) -> None:
    """Exact trial count, no gaps, nothing RUNNING; one FINISHED parent; one complete child per trial."""
    from mlflow import MlflowClient

    s = load("smoke", open_storage(storage_url, heartbeat=None))
    numbers = [t.number for t in s.trials]
    assert numbers == list(range(len(numbers)))
    done = [t for t in s.trials if trained(t)]
    assert len(done) == n_trained
    assert not [t for t in s.trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("mnistlab.parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mnistlab.parent") != "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_id == s.user_attrs["mlflow_parent_run_id"]
    assert sorted(int(r.data.tags["mnistlab.trial"]) for r in children) == [t.number for t in done]
    for run in children:
        trial = s.trials[int(run.data.tags["mnistlab.trial"])]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.info.status == {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}[trial.state]
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")]
        assert steps == list(range(1, trial.user_attrs["epochs_run"] + 1))
        stored = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/best.safetensors" in stored and "checkpoints/last.pt" in stored


@pytest.mark.usefixtures("data_dir")
def test_authenticated_mlflow_and_no_secret_leaks(tmp_path: Path, mlflow_db: str) -> None:
    """The auth variant: MLflow basic auth, admin password from the environment, Host guard."""
    import urllib.error
    import urllib.request

    password = "Zq-7-not-a-default-9x"
    ini = tmp_path / "auth.ini"
    ini.write_text((ROOT / "docker" / "mlflow-auth.ini").read_text().replace(
        "sqlite:////mlflow/basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}"))
    server_env = {**compose_env("mlflow"), "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
                  "MLFLOW_AUTH_ADMIN_PASSWORD": password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32}
    server, url = start_mlflow_server(mlflow_db, tmp_path / "artifacts", extra=compose_app("docker-compose.auth.yml"),
                                      env=server_env)
    try:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert refused.value.code == 401
        import base64

        login = base64.b64encode(f"admin:{password}".encode()).decode()
        page = urllib.request.Request(f"{url}/", headers={"Authorization": f"Basic {login}"})
        with urllib.request.urlopen(page, timeout=30) as resp:
            assert "mlflow.workflowType_v1" in resp.read().decode()  # the UI opens studies on their trials
        request = urllib.request.Request(f"{url}/api/2.0/mlflow/experiments/search?max_results=1",
                                         headers={"Host": "evil.example", "Authorization": f"Basic {login}"})
        with pytest.raises(urllib.error.HTTPError) as rebinding:
            urllib.request.urlopen(request, timeout=10)
        assert rebinding.value.code == 403  # MLflow's DNS-rebinding guard
        storage = f"sqlite:///{tmp_path / 'optuna.db'}"
        anonymous = run_cli("study", "run", str(SMOKE), "--n-trials", "1", *FAST, "--storage", storage,
                            "--tracking-uri", url)
        assert anonymous.returncode == 2 and "MLFLOW_TRACKING_USERNAME" in anonymous.stderr, anonymous.stderr
        assert len(anonymous.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "optuna.db").exists()  # refused before anything was created
        creds = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        proc = run_cli("study", "run", str(SMOKE), "--n-trials", "1", *FAST, "--storage", storage,
                       "--tracking-uri", url, env=creds)
        assert proc.returncode == 0, proc.stderr
        assert password not in proc.stdout + proc.stderr
        from mlflow import MlflowClient

        os.environ.update(creds)
        try:
            client = MlflowClient(url)
            exp = client.get_experiment_by_name("smoke")
            for run in client.search_runs([exp.experiment_id]):
                assert password not in repr(run.data.params) + repr(run.data.tags)
                for artifact in ("environment.json", "config.yaml"):
                    if run.data.tags.get("mnistlab.parent") != "true":
                        assert password not in Path(client.download_artifacts(
                            run.info.run_id, artifact, str(tmp_path))).read_text()
        finally:
            for key in creds:
                os.environ.pop(key, None)
    finally:
        stop(server)


class DelayedProxy:
    """A TCP port that refuses connections until ``start`` and then forwards to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.port = target, free_port()
        self.server: socket.socket | None = None

    def start(self) -> None:
        self.server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.server is not None
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while chunk := a.recv(65536):
                b.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.mark.usefixtures("data_dir")
def test_a_worker_waits_for_a_database_that_is_not_up_yet(tmp_path: Path, pg_url: str, mlflow_db: str) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(pg_url)
    proxy = DelayedProxy((parts.hostname, parts.port or 5432))
    late_url = pg_url.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}")
    errors = tmp_path / "worker.err"
    with open(errors, "w") as err_file:
        worker = subprocess.Popen([sys.executable, "-m", "mnistlab", "study", "run", str(SMOKE), "--n-trials", "1",
                                   *FAST, "--storage", late_url], env={**os.environ, "MNISTLAB_WAIT": "120"},
                                  stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        # The database is "down" until the worker says it waits for it, however long its start takes.
        waits = lambda: "waiting for the storage" in errors.read_text()  # noqa: E731
        wait_until("the worker saying it waits for the storage", waits, 180, worker, poll=0.1)
        assert worker.poll() is None
        proxy.start()
        out, _ = worker.communicate(timeout=300)
    finally:
        worker.kill()
        proxy.close()
    err = errors.read_text()
    assert worker.returncode == 0, err
    assert "retrying for up to 120 s" in err and "trained 1/1" in out


def test_a_wrong_database_name_or_user_fails_at_once(tmp_path: Path, pg_url: str) -> None:
    for url, message in ((pg_url.rsplit("/", 1)[0] + "/no_such_db", 'database "no_such_db" does not exist'),
                         (pg_url.replace("postgres@", "nobody:pw@"), 'role "nobody" does not exist')):
        proc = run_cli("study", "run", str(SMOKE), "--n-trials", "1", "--storage", url, env={"MNISTLAB_WAIT": "60"})
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "pw@" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert "waiting for the storage" not in proc.stderr  # no waiting for a mistake
