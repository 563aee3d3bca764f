"""Faults, each ending with `mnistlab study check` passing: kills, interrupts, a full disk, races."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState
from safetensors.torch import load_file

from conftest import ROOT, free_port, pruning_study, run_cli, start_mlflow_server, stop, trial_dir, wait_until
from mnistlab.core import checkpoint
from mnistlab.core.checkpoint_files import KEPT
from mnistlab.core.trials import trained
from mnistlab.search.storage import load, open_storage

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("data_dir")]

SMOKE = ROOT / "studies" / "smoke.yaml"
SLOW = ["--epochs", "3", "--limit-train", "3000", "--limit-eval", "300", "--threads", "1", "--heartbeat", "1"]


def start_worker(*extra: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnistlab", "study", "run", str(SMOKE), *SLOW, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, cwd=cwd)


def wait_for(path: Callable[[], Path], proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until the file ``path()`` names exists (its folder is known only once the study is)."""
    wait_until(f"{path().name} written", lambda: path().exists(), timeout, proc)


def last_checkpoint(number: int = 0, artifacts: Path = Path("mnistlab-artifacts")) -> Callable[[], Path]:
    return lambda: trial_dir(artifacts.resolve(), number) / "last.pt"


def check(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cli("study", "check", "--name", "smoke", "--heartbeat", "1", *args, env=env, cwd=cwd)


def uninterrupted_weights(tmp_path: Path) -> dict[str, torch.Tensor]:
    """Trial 0 (the base config) of the same study run without a fault, in its own folder."""
    clean = tmp_path / "clean"
    clean.mkdir()
    proc = run_cli("study", "run", str(SMOKE), *SLOW, "--n-trials", "1", "--storage",
                   f"sqlite:///{clean / 'optuna.db'}", "--tracking-uri", f"sqlite:///{clean / 'mlflow.db'}",
                   "--artifacts", str(clean / "artifacts"))
    assert proc.returncode == 0, proc.stderr
    return load_file(str(trial_dir(clean / "artifacts", 0) / "best.safetensors"))


def wait_until_into_epoch_2(storage_url: str, proc: subprocess.Popen, timeout: float = 300,
                            artifacts: Path = Path("mnistlab-artifacts")) -> None:
    """Until trial 0 is RUNNING and has reported epoch 1: its checkpoint is on disk (and sent to
    its MLflow run, which happens before the report), epoch 2 has begun."""
    wait_for(last_checkpoint(artifacts=artifacts), proc, timeout)  # the study and trial 0 exist from here on
    s = load("smoke", open_storage(storage_url, heartbeat=None))

    def in_epoch_2() -> bool:
        trial = s.get_trials(deepcopy=False)[0]
        return trial.state == TrialState.RUNNING and 1 in trial.intermediate_values

    wait_until("trial 0 in epoch 2", in_epoch_2, timeout, proc)


def wait_until_stale(storage_url: str, timeout: float = 60) -> None:
    """Until the storage counts trial 0 as stale: no heartbeat for the grace period (3 heartbeats of 1 s)."""
    storage = open_storage(storage_url, heartbeat=1)
    study_id = storage.get_study_id_from_name("smoke")
    # what fail_stale_trials reads, without failing anything
    wait_until("trial 0's heartbeat stale", lambda: storage._get_stale_trial_ids(study_id), timeout, poll=0.2)


@pytest.mark.parametrize(("backend", "recovery"), [("sqlite", "repair"), ("postgresql", "repair"),
                                                   ("sqlite", "next worker")])
def test_sigkill_mid_epoch_is_recovered_and_resumed_to_the_same_weights(
        tmp_path: Path, mlflow_db: str, backend: str, recovery: str, request: pytest.FixtureRequest) -> None:
    """SIGKILL in epoch 2; `study check --repair` or the next worker's heartbeat check fails the trial and
    queues a retry with its params, which resumes from its checkpoint to the weights of an uninterrupted run."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    env = {"MNISTLAB_STORAGE": storage}
    worker = start_worker("--n-trials", "1", env=env)
    wait_until_into_epoch_2(storage, worker)
    folder = trial_dir(tmp_path / "mnistlab-artifacts", 0)
    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    worker.wait()
    saved = checkpoint.load_state(checkpoint.latest_good(folder))["epoch"]
    assert saved in (1, 2)  # killed mid-trial
    if recovery == "repair":
        found = check(env=env)
        assert found.returncode == 1 and "trial 0: RUNNING but its worker on this machine is gone" in found.stdout, \
            found.stdout + found.stderr
        repaired = check("--repair", env=env)  # at once: no heartbeat needs to go stale first
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        # the killed worker was a process of this machine: failed at once, not after its heartbeat went stale
        assert "repaired  trial 0: RUNNING, its worker on this machine gone" in repaired.stdout
        assert "parent run" in repaired.stdout and "ended FINISHED" in repaired.stdout
    else:  # as if the worker had run on another machine: only its heartbeat can tell it died
        s = load("smoke", open_storage(storage, heartbeat=None))
        dead = s.get_trials(deepcopy=False)[0]
        s._storage.set_trial_user_attr(dead._trial_id, "worker", "another-machine|boot|1|1|1")
        wait_until_stale(storage)  # the next worker fails the stale trial itself and runs its retry
    resumed = run_cli("study", "run", str(SMOKE), *SLOW, "--n-trials", "1", "--verbose", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming from" in resumed.stdout and f"after epoch {saved}" in resumed.stdout, resumed.stdout
    # where the checkpoint came from, said plainly (the run's copy in MLflow is no newer than the local one)
    assert f"trial resumes from its local checkpoint after epoch {saved} (" in resumed.stdout, resumed.stdout
    assert "could be fetched" not in resumed.stdout + resumed.stderr
    resume_seconds = time.monotonic() - killed_at
    assert check(env=env).returncode == 0
    s = load("smoke", open_storage(storage, heartbeat=None))
    dead, retry = s.trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE and retry.params == dead.params
    assert retry.user_attrs["root_trial"] == 0 and retry.user_attrs["epochs_run"] == 3

    client = MlflowClient(mlflow_db)
    dead_run = client.get_run(dead.user_attrs["mlflow_run_id"])
    retry_run = client.get_run(retry.user_attrs["mlflow_run_id"])
    reason = dead_run.data.tags["mnistlab.fail_reason"]
    assert dead_run.info.status == "FAILED"
    if recovery == "repair":  # a process of this machine: its death is known, and said
        assert reason.startswith("its worker (process ") and reason.endswith(" on this machine) is gone"), reason
    else:
        assert reason == "worker stopped sending heartbeats", reason
    assert retry_run.data.tags["mnistlab.retry_of_run"] == dead_run.info.run_id
    steps = [m.step for m in client.get_metric_history(retry_run.info.run_id, "val_acc")]
    assert sorted(steps) == [1, 2, 3]  # the epochs from the checkpoint are logged once
    resumed_weights = load_file(str(trial_dir(tmp_path / "mnistlab-artifacts", 0) / "best.safetensors"))
    clean = uninterrupted_weights(tmp_path)
    assert resumed_weights.keys() == clean.keys()
    assert all(torch.equal(resumed_weights[k], clean[k]) for k in clean)  # bit for bit on the CPU
    print(f"SIGKILL to a finished, resumed trial ({recovery}): {resume_seconds:.1f} s")


def test_a_worker_that_finds_the_study_full_stays_to_retry_a_dead_worker_s_trial(
        tmp_path: Path, mlflow_db: str) -> None:
    """A worker of another machine (or container) dies in the study's last trial; the worker left
    finds the study full and stays until that trial's heartbeat is stale, then trains its retry,
    rather than exiting and leaving it RUNNING with nobody to take it (found by docker/try-stack.sh)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {"MNISTLAB_STORAGE": storage}
    worker = start_worker("--n-trials", "1", env=env)
    wait_until_into_epoch_2(storage, worker)
    s = load("smoke", open_storage(storage, heartbeat=None))
    s._storage.set_trial_user_attr(s.get_trials(deepcopy=False)[0]._trial_id, "worker", "another-machine|boot|1|1|1")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    # at once, with a grace of 3 x 10 s: trial 0 is not stale yet when this worker starts
    left = run_cli("study", "run", str(SMOKE), *SLOW, "--heartbeat", "10", "--n-trials", "1", env=env)
    assert left.returncode == 0, left.stderr
    assert "already has 1 trained trials" in left.stdout, left.stdout
    assert "waiting for trial 0 of other workers to end" in left.stdout, left.stdout
    assert "1 retries of dead workers' trials run by this worker" in left.stdout, left.stdout
    assert check(env=env).returncode == 0
    dead, retry = load("smoke", open_storage(storage, heartbeat=None)).trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE
    assert retry.user_attrs["root_trial"] == 0 and retry.params == dead.params


def test_a_trial_killed_on_one_machine_resumes_on_another_from_its_mlflow_checkpoint(
        tmp_path: Path, pg_url: str, mlflow_server: str) -> None:
    """Two machines simulated on this one: two working folders, each with its own artifacts
    folder, sharing only the PostgreSQL storage and a real `mlflow server` with proxied artifacts.
    Worker A is killed in epoch 2; worker B takes the retry, fetches the checkpoint A sent to
    MLflow, resumes from it and ends with the weights of an uninterrupted run."""
    env = {"MNISTLAB_STORAGE": pg_url, "MLFLOW_TRACKING_URI": mlflow_server}
    machine_a, machine_b = tmp_path / "machine-a", tmp_path / "machine-b"
    machine_a.mkdir()
    machine_b.mkdir()
    worker = start_worker("--n-trials", "1", env=env, cwd=machine_a)
    wait_until_into_epoch_2(pg_url, worker, artifacts=machine_a / "mnistlab-artifacts")
    worker.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    worker.wait()
    saved = checkpoint.load_state(checkpoint.latest_good(trial_dir(machine_a / "mnistlab-artifacts", 0)))["epoch"]
    wait_until_stale(pg_url)
    started = time.monotonic()
    worker_b = start_worker("--n-trials", "1", "--verbose", env=env, cwd=machine_b)
    lines = []
    for line in worker_b.stdout:  # as printed: when did B resume?
        lines.append(line)
        if line.startswith("Resuming from"):
            resumed_at = time.monotonic()
            break
    rest, err = worker_b.communicate(timeout=600)
    out = "".join(lines) + rest
    assert worker_b.returncode == 0, out + err
    assert "took the checkpoint after epoch" in out and "Resuming from" in out, out + err
    taken = int(out.split("took the checkpoint after epoch ")[1].split()[0])
    assert taken in (saved, saved - 1) and f"after epoch {taken}" in out  # A's last send, or the one before
    assert not list((machine_b / "mnistlab-artifacts").glob("*/trial-0/.fetch-*"))  # the download is cleaned up
    s = load("smoke", open_storage(pg_url, heartbeat=None))
    dead, retry = s.trials
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE and retry.params == dead.params
    steps = [m.step for m in MlflowClient(mlflow_server).get_metric_history(retry.user_attrs["mlflow_run_id"],
                                                                            "val_acc")]
    assert sorted(steps) == [1, 2, 3]
    final = check(env=env, cwd=machine_b)
    assert final.returncode == 0, final.stdout + final.stderr
    resumed_weights = load_file(str(trial_dir(machine_b / "mnistlab-artifacts", 0) / "best.safetensors"))
    clean = uninterrupted_weights(tmp_path)
    assert all(torch.equal(resumed_weights[k], clean[k]) for k in clean) and resumed_weights.keys() == clean.keys()
    print(f"killed on A, resumed on B {resumed_at - killed_at:.1f} s after the kill (heartbeat 1 s: stale after "
          f"{started - killed_at:.1f} s, B's start to its resume {resumed_at - started:.1f} s)")


def test_the_artifact_server_down_while_a_checkpoint_is_due_loses_nothing(tmp_path: Path, pg_url: str,
                                                                        _mlflow_template: Path) -> None:
    """The MLflow server goes away after epoch 1 (its checkpoint sent) and comes back only after the
    trial has ended: training goes on, and after `study check --repair` MLflow holds the final
    checkpoint and every epoch. (Back while the trial still ran, MLflow's own retries could carry a
    send over the outage, and nothing would be left to test.)"""
    shutil.copy(_mlflow_template, tmp_path / "server.db")
    backend, port = f"sqlite:///{tmp_path / 'server.db'}", free_port()
    server, url = start_mlflow_server(backend, tmp_path / "server-artifacts", port)
    env = {"MNISTLAB_STORAGE": pg_url, "MLFLOW_TRACKING_URI": url}
    worker = start_worker("--n-trials", "1", "--verbose", env=env)
    try:
        epochs = (line for line in worker.stdout if line.startswith("Validation:"))
        assert next(epochs, None), "the worker ended before its first epoch"
        stop(server)  # epoch 1 and its checkpoint are sent; the next ones are due with no server
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, out + err
        assert "could not send the checkpoint" in err, err
        server, _ = start_mlflow_server(backend, tmp_path / "server-artifacts", port)
        repaired = check("--repair", env=env)  # sends what the end of the trial could not
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert check(env=env).returncode == 0
        (trial,) = load("smoke", open_storage(pg_url, heartbeat=None)).trials
        run_id = trial.user_attrs["mlflow_run_id"]
        client = MlflowClient(url)
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_acc")) == [1, 2, 3]
        sent = Path(client.download_artifacts(run_id, "checkpoints", str(tmp_path / "sent")))
        local = trial_dir(tmp_path / "mnistlab-artifacts", 0)
        for name in KEPT:
            assert (sent / name).read_bytes() == (local / name).read_bytes(), name
    finally:
        worker.kill()
        stop(server)


def test_sigterm_saves_records_and_exits_within_seconds(tmp_path: Path, mlflow_db: str) -> None:
    worker = start_worker("--n-trials", "1")
    wait_for(last_checkpoint(), worker)
    worker.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = worker.communicate(timeout=60)
    took = time.monotonic() - sent
    assert worker.returncode == 128 + signal.SIGTERM
    assert took < 15, took
    assert "interrupted by SIGTERM" in err and "Traceback" not in err, err
    s = load("smoke", open_storage(None, heartbeat=None))
    (first, retry) = s.trials
    assert first.state == TrialState.FAIL and first.user_attrs["reason"].startswith("interrupted by SIGTERM after")
    assert retry.state == TrialState.WAITING and retry.user_attrs["root_trial"] == 0

    run = MlflowClient(mlflow_db).get_run(first.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["mnistlab.interrupted"] == "SIGTERM"
    assert check().returncode == 0
    resumed = run_cli("study", "run", str(SMOKE), *SLOW, "--n-trials", "1", "--verbose")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr
    final = check()
    assert final.returncode == 0, final.stdout


def test_a_full_disk_fails_the_trial_cleanly_and_the_study_continues(tmp_path: Path, pg_url: str,
                                                                     mlflow_server: str) -> None:
    """The file-size limit of the worker drops below a checkpoint's size mid-trial (as a full disk
    would refuse the write); the storage and MLflow are servers, so only checkpoints are written."""
    env = {"MNISTLAB_STORAGE": pg_url, "MLFLOW_TRACKING_URI": mlflow_server}
    worker = start_worker("--n-trials", "2", env=env)
    wait_for(last_checkpoint(), worker)
    folder = trial_dir(tmp_path / "mnistlab-artifacts", 0)
    before = (folder / "last.pt").read_bytes()
    resource.prlimit(worker.pid, resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    out, err = worker.communicate(timeout=300)
    assert worker.returncode == 2, out + err
    assert "I/O error" in err and "File too large" in err and len(err.strip().splitlines()) == 1, err
    assert (folder / "last.pt").read_bytes() == before  # the previous checkpoint is intact
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary left behind
    s = load("smoke", open_storage(pg_url, heartbeat=None))
    failed = s.trials[0]
    assert failed.state == TrialState.FAIL and "File too large" in failed.user_attrs["reason"]
    assert check(env=env).returncode == 0
    again = run_cli("study", "run", str(SMOKE), *SLOW, "--n-trials", "2", "--verbose", env=env)
    assert again.returncode == 0, again.stderr
    assert "Resuming from" in again.stdout
    assert len([t for t in load("smoke", open_storage(pg_url, heartbeat=None)).trials
                if trained(t)]) == 2
    final = check(env=env)
    assert final.returncode == 0, final.stdout


@pytest.mark.parametrize("n_workers", [2, 4])
def test_workers_starting_together_on_a_new_postgresql_study(tmp_path: Path, pg_url: str, mlflow_db: str,
                                                             n_workers: int) -> None:
    cmd = [sys.executable, "-m", "mnistlab", "study", "run", str(SMOKE), "--epochs", "1", "--limit-train", "600",
           "--limit-eval", "200", "--threads", "1", "--n-trials", str(n_workers + 1), "--storage", pg_url]
    workers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(n_workers)]
    results = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0] * n_workers, results
    assert not [err for _, err in results if "Traceback" in err or "Error" in err], results
    # a server storage with a local MLflow store: fine on one machine, said once for several
    assert all("workers on other machines cannot see these runs" in err for _, err in results), results
    storage = open_storage(pg_url, heartbeat=None)
    import optuna

    assert optuna.get_all_study_names(storage) == ["smoke"]
    s = load("smoke", storage)
    assert [t.number for t in s.trials] == list(range(len(s.trials)))
    assert len([t for t in s.trials if trained(t)]) == n_workers + 1
    assert [t.number for t in s.trials if t.user_attrs.get("base")] == [0]  # one base trial, first
    final = run_cli("study", "check", "--name", "smoke", "--storage", pg_url)
    assert final.returncode == 0, final.stdout + final.stderr


def test_check_reports_a_record_that_does_not_add_up(tmp_path: Path, mlflow_db: str) -> None:
    proc = run_cli("study", "run", str(SMOKE), "--epochs", "1", "--limit-train", "600", "--limit-eval", "200",
                   "--n-trials", "1")
    assert proc.returncode == 0, proc.stderr
    from mlflow.entities import Metric

    s = load("smoke", open_storage(None, heartbeat=None))
    run_id = s.trials[0].user_attrs["mlflow_run_id"]
    client = MlflowClient(mlflow_db)
    client.log_batch(run_id, metrics=[Metric("val_acc", 50.0, 0, 1)])  # a duplicated epoch
    client.set_terminated(run_id, "FAILED")
    stored = next((tmp_path / "mlruns").rglob(f"{run_id}/artifacts/checkpoints/best.safetensors"))
    raw = bytearray(stored.read_bytes())
    raw[-5] ^= 0x01
    stored.write_bytes(bytes(raw))
    found = run_cli("study", "check", "--name", "smoke")
    assert found.returncode == 1
    assert "expected FINISHED" in found.stdout and "duplicate steps [1]" in found.stdout, found.stdout
    assert "best.safetensors does not match the SHA-256 in best.json" in found.stdout
    assert "1 problem" not in found.stdout and "3 problem(s)" in found.stdout


def test_a_long_mlflow_outage_keeps_training_and_repair_sends_what_was_kept(tmp_path: Path,
                                                                           _mlflow_template: Path) -> None:
    """The server goes away after trial 0's first epoch and stays away for the rest of the study."""
    shutil.copy(_mlflow_template, tmp_path / "server.db")
    backend, port = f"sqlite:///{tmp_path / 'server.db'}", free_port()
    server, url = start_mlflow_server(backend, tmp_path / "server-artifacts", port)
    env = {"MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
    worker = start_worker("--n-trials", "2", env=env)
    try:
        wait_for(last_checkpoint(), worker)
        stop(server)
        down = time.monotonic()
        out, err = worker.communicate(timeout=600)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "unsent metrics kept in" in err and "trains without its run" in err, err
    s = load("smoke", open_storage(None, heartbeat=None))
    assert len([t for t in s.trials if trained(t)]) == 2  # the outage stopped no training
    server, _ = start_mlflow_server(backend, tmp_path / "server-artifacts", port)
    print(f"MLflow outage ridden out: {time.monotonic() - down:.0f} s, the rest of the study")
    try:
        found = check(env=env)
        assert found.returncode == 1
        assert "not sent yet" in found.stdout and "0 MLflow runs, expected exactly 1" in found.stdout, found.stdout
        repaired = check("--repair", env=env)
        assert repaired.returncode == 0, repaired.stdout + repaired.stderr
        assert "metric values kept during an MLflow outage sent" in repaired.stdout
        assert "created" in repaired.stdout and "from its checkpoint" in repaired.stdout
        final = check(env=env)
        assert final.returncode == 0, final.stdout
    finally:
        stop(server)


def test_commands_starting_together_in_a_fresh_folder_create_each_store_once(tmp_path: Path) -> None:
    """Three `study create` at the same instant in an empty folder: optuna.db and mlflow.db are each
    made once, whole (without the creation lock their migrations collide)."""
    cmd = [sys.executable, "-m", "mnistlab", "study", "create", str(SMOKE)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], results
    assert not [err for _, err in results if "Traceback" in err or "error:" in err], results
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert "runs" in tables and not [t for t in tables if t.startswith("_alembic_tmp")]

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert len(runs) == 1 and runs[0].data.tags["mnistlab.parent"] == "true"
    s = load("smoke", open_storage(None, heartbeat=None))
    assert len(s.trials) == 1 and s.trials[0].state == TrialState.WAITING  # the base trial, enqueued once


def test_a_half_migrated_mlflow_store_is_refused_in_one_line_with_the_remedy(tmp_path: Path, mlflow_db: str) -> None:
    """What an interrupted MLflow migration leaves behind: a `_alembic_tmp_*` table."""
    import sqlite3

    import optuna

    with sqlite3.connect(tmp_path / "mlflow.db") as con:
        con.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32))")
    proc = run_cli("study", "create", str(SMOKE))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "half-migrated" in proc.stderr and "_alembic_tmp_runs" in proc.stderr
    assert f"delete {tmp_path / 'mlflow.db'}" in proc.stderr  # it holds no runs: making it anew loses nothing
    assert optuna.get_all_study_names(open_storage(None, heartbeat=None)) == []  # no study was created


def test_a_resumed_trial_that_is_pruned_logs_its_restored_epochs_and_repair_backfills(
        tmp_path: Path, mlflow_db: str) -> None:
    """Trial 1 (hopeless) is interrupted after epoch 1, resumed, and pruned at epoch 2: its run holds
    both epochs. A run that lacks the restored epoch (as older versions left it) is mended by --repair."""
    path = pruning_study(tmp_path, name="smoke", warmup=2, overrides="{}")  # the flags below set the schedule
    cmd = [sys.executable, "-m", "mnistlab", "study", "run", str(path), *SLOW, "--n-trials", "2"]
    worker = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(last_checkpoint(1), worker)
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=60)
    assert worker.returncode == 128 + signal.SIGTERM
    resumed = run_cli("study", "run", str(path), *SLOW, "--n-trials", "2", "--verbose")
    assert resumed.returncode == 0 and "Resuming from" in resumed.stdout, resumed.stderr
    retry = load("smoke", open_storage(None, heartbeat=None)).trials[-1]
    assert retry.state == TrialState.PRUNED and retry.user_attrs["root_trial"] == 1
    assert retry.user_attrs["pruned_at_epoch"] == 2
    client = MlflowClient(mlflow_db)
    run_id = retry.user_attrs["mlflow_run_id"]
    for key in ("val_acc", "train_loss", "lr"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert check().returncode == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "mlflow.db") as con:  # the run as older versions recorded it
        con.execute("DELETE FROM metrics WHERE run_uuid = ? AND step = 1", (run_id,))
    found = check()
    assert found.returncode == 1 and "val_acc has 1 values for 2 epochs" in found.stdout, found.stdout
    repaired = check("--repair")
    assert repaired.returncode == 0 and "logged epochs [1]" in repaired.stdout, repaired.stdout
    for key in ("val_acc", "train_loss", "lr"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2], key
    assert check().returncode == 0
