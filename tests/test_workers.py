"""A dead worker of this machine is known at once (search/workers.py): real processes, a real storage."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, run_cli, trial_dir, wait_until
from mnistlab.core import trials as tr
from mnistlab.search.storage import load, open_storage
from mnistlab.search.workers import dead_here, fail_dead_here, identity


def ended_worker() -> str:
    """The identity of a process of this machine that has ended since."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = identity(proc.pid)
    proc.kill()
    proc.wait()
    return worker


def test_this_process_is_alive_and_an_ended_one_is_dead() -> None:
    assert not dead_here(identity())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = identity(child.pid)
        assert not dead_here(alive)
    finally:
        child.kill()
        child.wait()
    assert dead_here(alive)  # the same PID is gone now


def test_only_this_machine_s_processes_are_judged() -> None:
    host, boot, namespace, pid, started = identity().split("|")
    assert dead_here("|".join((host, boot, namespace, pid, str(int(started) + 1))))  # the PID, reused later
    assert not dead_here("|".join(("elsewhere", boot, namespace, pid, "1")))  # another machine: heartbeats
    assert not dead_here("|".join((host, "another-boot", namespace, pid, "1")))  # before a reboot: heartbeats
    assert not dead_here("|".join((host, boot, "123", pid, "1")))  # another container's PIDs
    for odd in ("", "a|b", "|||||", f"{host}|{boot}|{namespace}|x|1", f"{host}|{boot}|{namespace}|1|"):
        assert not dead_here(odd)


def test_a_dead_worker_s_trial_is_failed_with_its_reason_and_retried(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=30)
    study = optuna.create_study(storage=storage, study_name="s")
    dead, alive = study.ask(), study.ask()
    for trial, worker in ((dead, ended_worker()), (alive, identity())):
        trial.suggest_float("x", 0, 1)
        trial.set_user_attr(tr.WORKER, worker)
        trial.set_user_attr(tr.TRAINED, True)
    assert fail_dead_here(study) == [dead.number]
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "is gone" in trials[0].user_attrs[tr.REASON]
    assert trials[1].state == TrialState.RUNNING  # a live worker's trial is left alone
    retry = trials[2]
    assert retry.state == TrialState.WAITING and retry.system_attrs["failed_trial"] == dead.number
    assert tr.REASON not in retry.user_attrs and retry.params == trials[0].params
    assert fail_dead_here(study) == []  # once


@pytest.mark.slow
def test_sigkill_then_the_same_command_at_once_resumes_without_waiting(tmp_path: Path, mlflow_db: str,
                                                                       data_dir: Path) -> None:
    """The default heartbeat (30 s): the re-run does not wait 90 s for the dead trial to go stale."""
    args = [str(ROOT / "studies" / "smoke.yaml"), "--epochs", "3", "--limit-train", "3000", "--limit-eval", "300",
            "--threads", "1", "--n-trials", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": mlflow_db}
    worker = subprocess.Popen([sys.executable, "-m", "mnistlab", "study", "run", *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = lambda: trial_dir(tmp_path / "mnistlab-artifacts", 0) / "last.pt"  # noqa: E731
    wait_until("trial 0's first checkpoint", lambda: last().exists(), 300, worker)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    started = time.monotonic()
    again = run_cli("study", "run", *args, "--verbose", env={"MLFLOW_TRACKING_URI": mlflow_db})
    assert again.returncode == 0, again.stdout + again.stderr
    assert "trial 0: its worker on this machine is gone" in again.stdout and "Resuming from" in again.stdout
    assert time.monotonic() - started < 80  # not the 90 s a stale heartbeat takes
    checked = run_cli("study", "check", "smoke", env={"MLFLOW_TRACKING_URI": mlflow_db})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    s = load("smoke", open_storage(None, heartbeat=None))
    dead, retry = s.trials
    assert dead.state == TrialState.FAIL and "is gone" in dead.user_attrs[tr.REASON]
    assert retry.state == TrialState.COMPLETE and retry.user_attrs[tr.ROOT_TRIAL] == 0


def test_repair_retries_a_fail_without_a_reason_that_an_older_version_left(tmp_path: Path) -> None:
    """Older versions ended a trial interrupted in its first instants FAIL with no reason and no retry:
    `study check` could never pass again. --repair now queues its retry, which explains it."""
    from mnistlab.check import check

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name="old")
    dist = {"x": optuna.distributions.IntDistribution(0, 10)}
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params={"x": 3}, distributions=dist))
    found = check(study, None)
    assert [(f.where, f.what) for f in found] == [("trial 0", "FAIL without a reason (--repair retries it)")]
    fixed = check(study, None, repair=True)
    assert [(f.where, f.fixed) for f in fixed] == [("trial 0", True)]
    retry = study.get_trials()[1]
    assert retry.state == TrialState.WAITING and retry.system_attrs["fixed_params"] == {"x": 3}
    assert retry.user_attrs[tr.RETRY_OF_TRIAL] == 0 and retry.user_attrs[tr.ROOT_TRIAL] == 0
    assert check(study, None) == []  # consistent from here on
