"""Every trial in MLflow: a parent run per study, a child per trained trial, curves, artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image
from safetensors.torch import load_file

from conftest import ROOT, pruning_study, run_cli, start_mlflow_server, stop, wait_until
from mnistlab.core import config, data
from mnistlab.core.model import build_model
from mnistlab.core.train import evaluate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("data_dir")]

EXP = ROOT / "experiments" / "eva4-s4.yaml"


def check_study_runs(client: MlflowClient, data_dir: Path, tmp_path: Path) -> None:
    """One parent, a child per trained trial with full curves, right statuses, usable artifacts."""
    exp = client.get_experiment_by_name("track")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow's UI: model training
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("mnistlab.parent") == "true"]
    assert len(parents) == 1
    parent = parents[0]
    children = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                      key=lambda r: int(r.data.tags["mnistlab.trial"]))
    assert len(children) == len(runs) - 1 == 2
    done, pruned = children
    assert done.info.status == "FINISHED" and done.info.run_name == "trial-0"
    assert pruned.info.status == "KILLED" and pruned.data.tags["mnistlab.pruned_at_epoch"] == "1"
    for child, epochs in ((done, [1, 2]), (pruned, [1])):
        for key in ("train_loss", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s"):
            assert [m.step for m in client.get_metric_history(child.info.run_id, key)] == epochs, key
        assert child.data.params["train.lr"] in ("0.1", "1e-05")
        assert child.data.params["param_count"] == "12400" and child.data.params["device"] == "cpu"
        assert child.data.tags["mnistlab.study"] == "track"
    assert "test_acc" in done.data.metrics and "test_acc" not in pruned.data.metrics
    # The best-epoch weights come back from the artifact store and reproduce the logged accuracy.
    local = Path(client.download_artifacts(done.info.run_id, "checkpoints", str(tmp_path / "dl")))
    meta = json.loads((local / "best.json").read_text())
    cfg = config.from_dict(meta["config"])
    model = build_model(cfg.model)
    model.load_state_dict(load_file(str(local / "best.safetensors")))
    split = data.load(cfg.data, "cpu", data_dir).val
    _, correct = evaluate(model, split)
    assert 100.0 * correct / len(split) == pytest.approx(done.data.metrics["best_val_acc"])
    names = {a.path for a in client.list_artifacts(done.info.run_id)}
    assert {"config.yaml", "model_summary.txt", "environment.json", "study", "checkpoints"} <= names
    # The parent's live summary and plots.
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_complete"] == 1 and parent.data.metrics["n_pruned"] == 1
    assert parent.data.tags["mnistlab.best_trial"] == "0"
    plots = Path(client.download_artifacts(parent.info.run_id, "plots", str(tmp_path / "plots")))
    for name in ("optimization_history.png", "val_acc_vs_params.png", "learning_curves.png"):
        with Image.open(plots / name) as img:
            assert img.size[0] > 300 and len(img.convert("L").getcolors(1 << 16)) > 10  # a drawing


def test_a_study_against_a_real_mlflow_server(mlflow_server: str, data_dir: Path, tmp_path: Path) -> None:
    path = pruning_study(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")
    proc = run_cli("study", "run", str(path), "--tracking-uri", mlflow_server)
    assert proc.returncode == 0, proc.stderr
    check_study_runs(MlflowClient(mlflow_server), data_dir, tmp_path)


def test_a_study_against_a_server_on_postgresql(pg_url: str, data_dir: Path, tmp_path: Path) -> None:
    server, url = start_mlflow_server(pg_url, tmp_path / "pg-artifacts")
    try:
        path = pruning_study(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")
        proc = run_cli("study", "run", str(path), "--tracking-uri", url)
        assert proc.returncode == 0, proc.stderr
        check_study_runs(MlflowClient(url), data_dir, tmp_path)
    finally:
        stop(server)


def test_the_embedded_default_store(mlflow_db: str, data_dir: Path, tmp_path: Path) -> None:
    path = pruning_study(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")
    proc = run_cli("study", "run", str(path))  # no --tracking-uri: mlflow.db here
    assert proc.returncode == 0, proc.stderr
    check_study_runs(MlflowClient(mlflow_db), data_dir, tmp_path)


def test_train_logs_one_run(mlflow_db: str, tmp_path: Path) -> None:
    proc = run_cli("train", str(EXP), "--epochs", "2", "--limit-train", "600", "--limit-eval", "300",
                   "--output", "run1")
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(mlflow_db)
    exp = client.get_experiment_by_name("eva4-s4")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run1"
    assert "mlflow.parentRunId" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    summary = json.loads((tmp_path / "run1" / "summary.json").read_text())
    assert run.data.metrics["test_acc"] == pytest.approx(summary["test_acc"])


def test_an_older_experiment_is_tagged_model_training_by_repair_and_the_next_run(mlflow_db: str,
                                                                                   tmp_path: Path) -> None:
    """Experiments made before the tag existed get it from `study check --repair` and from the study's
    next start; a kind a user chose in the UI is kept."""
    path = pruning_study(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")
    assert run_cli("study", "run", str(path), "--n-trials", "1").returncode == 0
    client = MlflowClient(mlflow_db)
    exp_id = client.get_experiment_by_name("track").experiment_id

    def kind() -> str | None:
        return client.get_experiment(exp_id).tags.get("mlflow.experimentKind")

    client.delete_experiment_tag(exp_id, "mlflow.experimentKind")
    proc = run_cli("study", "check", str(path))
    assert proc.returncode == 0 and kind() is None, proc.stdout  # a whole record: nothing to report
    proc = run_cli("study", "check", str(path), "--repair")
    assert proc.returncode == 0 and "mlflow.experimentKind tag: set to custom_model_development" in proc.stdout
    assert kind() == "custom_model_development"
    client.delete_experiment_tag(exp_id, "mlflow.experimentKind")
    assert run_cli("study", "create", str(path)).returncode == 0  # what every `study run` starts with
    assert kind() == "custom_model_development"
    client.set_experiment_tag(exp_id, "mlflow.experimentKind", "genai_development")
    assert run_cli("study", "create", str(path)).returncode == 0
    assert kind() == "genai_development"


def test_a_short_server_outage_loses_no_metric(tmp_path: Path, _mlflow_template: Path) -> None:
    """The server is down while an epoch trains and is logged; MLflow's retries carry every metric over."""
    import shutil

    from conftest import free_port

    shutil.copy(_mlflow_template, tmp_path / "server.db")
    backend, port = f"sqlite:///{tmp_path / 'server.db'}", free_port()
    server, url = start_mlflow_server(backend, tmp_path / "artifacts", port)
    cmd = [sys.executable, "-m", "mnistlab", "train", str(EXP), "--epochs", "4", "--limit-train", "3000",
           "--limit-eval", "300", "--output", "out", "--tracking-uri", url]
    trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line as it is printed
    epochs = (line for line in trainer.stdout if line.startswith("Validation:"))
    try:
        assert next(epochs, None), "the trainer ended before its first epoch"
        stop(server)  # epoch 1 is logged; the server goes away
        assert next(epochs, None), "the trainer ended before its second epoch"
        # Epoch 2 is done and its metrics are being sent to no server: bring it back.
        server, _ = start_mlflow_server(backend, tmp_path / "artifacts", port)
        out = trainer.communicate(timeout=600)[0]
        assert trainer.returncode == 0, out
        client = MlflowClient(url)
        (run,) = client.search_runs([client.get_experiment_by_name("eva4-s4").experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2, 3, 4]
    finally:
        trainer.kill()
        stop(server)



def test_an_unwritable_artifact_store_warns_and_keeps_the_results(mlflow_db: str, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the artifact folder should be")
    client = MlflowClient(mlflow_db)
    client.create_experiment("eva4-s4", artifact_location=str(blocker / "artifacts"))
    proc = run_cli("train", str(EXP), "--epochs", "1", "--limit-train", "300", "--limit-eval", "100",
                   "--output", "run1")
    assert proc.returncode == 0, proc.stderr
    assert "could not upload" in proc.stderr and "it stays at" in proc.stderr
    exp = client.get_experiment_by_name("eva4-s4")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and "best.safetensors" in run.data.tags["mnistlab.missing_artifacts"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1]
    assert (tmp_path / "run1" / "checkpoints" / "best.safetensors").is_file()


def test_ui_serves_the_store_on_loopback(mlflow_db: str) -> None:
    """The store over HTTP; the page starts with the defaults that open each study on its trials (ui_app)."""
    import urllib.request

    from conftest import free_port
    from mnistlab.tracking.tracker import Tracker
    from mnistlab.tracking.ui_plugin import ASSISTANT_KEY, WORKFLOW_KEY, searched_columns, state_key
    from mnistlab.util.keys import COLUMNS_TAG

    tracker = Tracker(mlflow_db)
    study = tracker.experiment("a-study", "0123abcd", "sqlite:///optuna.db")
    tracker.tag_experiment(study, COLUMNS_TAG, json.dumps(searched_columns(["model.dropout", "model.widths.1",
                                                                             "model.widths.3"])))
    plain = tracker.client.create_experiment("not-a-study")
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mnistlab", "ui", "--port", str(port)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    try:
        first = ui.stdout.readline()
        assert first.startswith(f"MLflow UI: http://127.0.0.1:{port}")
        names = wait_until("the UI's server answering", lambda: [
            e.name for e in MlflowClient(f"http://127.0.0.1:{port}").search_experiments()], 90, ui, poll=1,
            ignore=(Exception,))
        assert "Default" in names  # the same store, served over HTTP
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as resp:
            page = resp.read().decode()
        head = page.split("<script defer", 1)[0]  # before MLflow's own script
        keys = [json.dumps(state_key(i)) for i in (study, plain)]  # as the script's JSON spells them
        assert WORKFLOW_KEY in head and keys[0] in head and keys[1] not in head
        assert ASSISTANT_KEY in head  # MLflow's Assistant does not open itself over the table
        # the runs whose charts start with the score and the losses: those of the study's experiment only
        assert f'"experiments":["{study}"]' in head and "RunPage-" in head
        view = head.split(keys[0], 1)[1].split("]", 1)[0]  # the study's table state, as the script spells it
        for column in ("val_score", "val_se", "param_count", "mnistlab.rank", "model.dropout", "model.widths"):
            assert f"`{column}`" in view, (column, view)
        assert view.count("model.widths") == 1  # two searched positions of one list: one column
        assert page.count("</script>") == page.count("<script")  # the page is MLflow's, whole
    finally:
        stop(ui)


def _command_lines(pid: int) -> list[str]:
    """The command lines of a process and all its descendants, as `ps` shows them to any user."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            out.append(Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # it ended meanwhile
            continue
    return out


def test_ui_keeps_the_store_password_off_every_command_line(pg_url: str) -> None:
    from conftest import free_port

    secret = "uiS3cretPw"
    uri = pg_url.replace("postgres@", f"postgres:{secret}@")  # trust auth: any password is accepted
    port = free_port()
    # given through the environment, as a user keeps a password out of `ps`: mnistlab must not put it on
    # the command line of the server it starts (nor of anything else)
    ui = subprocess.Popen([sys.executable, "-m", "mnistlab", "ui", "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    try:
        first = ui.stdout.readline()
        assert first.startswith(f"MLflow UI: http://127.0.0.1:{port}") and secret not in first, first
        seen: list[str] = []

        def experiments() -> list[str]:
            seen.extend(_command_lines(ui.pid))
            return [e.name for e in MlflowClient(f"http://127.0.0.1:{port}").search_experiments()]

        names = wait_until("the UI's server answering", experiments, 120, ui, poll=1, ignore=(Exception,))
        assert "Default" in names  # the server found its PostgreSQL store through the environment
        seen += _command_lines(ui.pid)
        assert any("mlflow" in line and "server" in line for line in seen), seen
        assert not [line for line in seen if secret in line], seen
    finally:
        stop(ui)


def test_ui_warns_when_it_listens_beyond_this_machine(mlflow_db: str) -> None:
    from conftest import free_port

    ui = subprocess.Popen([sys.executable, "-m", "mnistlab", "ui", "--host", "0.0.0.0", "--port", str(free_port())],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        warning = ui.stderr.readline()  # printed before the server starts: stopped before it listens
    finally:
        ui.kill()
        ui.wait()
    assert warning.startswith("warning: the MLflow UI on 0.0.0.0 has no login") and "--auth" in warning


def test_the_ui_opens_a_study_on_its_runs_table_in_a_real_browser(mlflow_db: str, tmp_path: Path) -> None:
    """docs/screenshots.py: `mnistlab ui` and headless Chromium, as a user sees it. It fails when the study's
    link shows anything but the runs table with every trial (e.g. MLflow's GenAI overview)."""
    import shutil

    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium is not installed (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed")
    path = pruning_study(tmp_path, f"sqlite:///{tmp_path / 'optuna.db'}")
    assert run_cli("study", "run", str(path)).returncode == 0
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "screenshots.py"), "--tracking-uri", mlflow_db,
                           "--study", "track", "--out", str(tmp_path / "img")],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    for name in ("ui-experiment.png", "ui-runs.png", "ui-parent-run.png", "ui-trial-metrics.png"):
        assert 5_000 < (tmp_path / "img" / name).stat().st_size < 200_000, name
