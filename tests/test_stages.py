"""Screening, the study-wide stop and warm starts in real `mnistlab study run` processes on small
data: several workers, PostgreSQL, a SIGKILL in the middle of a screen."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from conftest import ROOT, run_cli, wait_until
from mnistlab.core import trials as tr
from mnistlab.core.trials import WARM_FROM
from mnistlab.search.screen import finished_at, winners
from mnistlab.search.storage import load, open_storage
from mnistlab.search.study_file import Rung, Screen
from mnistlab.util.keys import STOP_ATTR

pytestmark = pytest.mark.slow

BASE = f"""base: {ROOT / 'experiments' / 'eva4-s4.yaml'}
overrides: {{train.epochs: 2, train.batch_size: 64, train.lr: 0.05, data.limit_train: 1200, data.limit_eval: 300}}
max_params: 20000
sampler: {{name: tpe, seed: 5, n_startup_trials: 3}}
pruner: none
space:
  model.dropout: {{type: float, low: 0.0, high: 0.1}}
  model.widths.1: {{type: int, low: 8, high: 32, step: 4}}
"""
SCREEN = Screen((Rung(1, 300),), promote=0.5)


def write(tmp_path: Path, name: str, extra: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + BASE + extra)
    return path


def worker(path: Path, *args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mnistlab", "study", "run", str(path), "--threads", "1",
                             "--heartbeat", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **env})


def test_a_screened_study_with_two_workers_on_postgresql_survives_a_sigkill_mid_screen(
        tmp_path: Path, pg_url: str, mlflow_db: str, data_dir: Path) -> None:
    path = write(tmp_path, "scr", "n_trials: 6\nscreen: {epochs: 1, limit_train: 300, promote: 0.5}\n")
    env = {"MNISTLAB_STORAGE": pg_url, "MLFLOW_TRACKING_URI": mlflow_db}
    a, b = worker(path, env=env), worker(path, env=env)

    def screening() -> list[FrozenTrial]:
        trials = load("scr", open_storage(pg_url, heartbeat=None, create=False)).get_trials(deepcopy=False)
        return [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(tr.TRAINED)
                and tr.is_screen(t) and t.user_attrs.get(tr.WORKER)]

    screening = wait_until("a screen training", screening, 300, ignore=(Exception,))  # the study may not exist yet
    pid = int(screening[0].user_attrs[tr.WORKER].split("|")[3])  # the worker training that screen
    if pid == b.pid:
        a, b = b, a
    assert a.pid == pid
    a.send_signal(signal.SIGKILL)
    a.wait()
    out_b = b.communicate(timeout=600)[0]
    assert b.returncode == 0, out_b
    again = run_cli("study", "run", str(path), "--threads", "1", "--heartbeat", "1", env=env)
    assert again.returncode == 0, again.stdout + again.stderr
    checked = run_cli("study", "check", str(path), "--heartbeat", "1", env=env)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    trials = load("scr", open_storage(pg_url, heartbeat=None, create=False)).get_trials(deepcopy=False)
    screens = [t for t in trials if tr.is_screen(t) and tr.trained(t) and t.state == TrialState.COMPLETE]
    assert len(screens) == 6  # n_trials counts configurations, a killed screen's retry included once
    assert {t.user_attrs[tr.EPOCHS_RUN] for t in screens} == {1}
    per_rung = collections.Counter((t.user_attrs[tr.PROMOTED_FROM], tr.is_screen(t)) for t in trials
                                   if tr.is_promoted(t) and tr.trained(t))
    assert per_rung and set(per_rung.values()) == {1}  # every promotion trained exactly once
    # the quota: half of the 6 finished screens went up, each the best not yet promoted when its slot opened
    assert len({origin for origin, _ in per_rung}) == len(winners(finished_at(trials, 0, SCREEN), SCREEN, False)) == 3
    full = [t for t in trials if tr.is_promoted(t) and t.state == TrialState.COMPLETE]
    assert {t.user_attrs[tr.EPOCHS_RUN] for t in full} == {2}  # the full schedule: its own 2 epochs
    assert {t.number for t in full} >= {tr.best_trial(trials).number}  # the pick is a full-schedule trial
    killed = [t for t in trials if t.state == TrialState.FAIL]
    assert killed
    for dead in killed:  # retried as what it was: the same configuration at the same rung
        retry = next(t for t in trials if t.system_attrs.get("failed_trial") == dead.number
                     or t.user_attrs.get(tr.RETRY_OF_TRIAL) == dead.number)
        assert retry.params == dead.params and tr.is_screen(retry) == tr.is_screen(dead)
        assert retry.state == TrialState.COMPLETE
    client = MlflowClient(mlflow_db)
    runs = {r.data.tags.get("mnistlab.trial"): r for r in client.search_runs(
        [client.get_experiment_by_name("scr").experiment_id]) if r.data.tags.get("mnistlab.parent") != "true"}
    assert runs[str(screens[0].number)].data.tags["mnistlab.rung"] == "screen-0"
    promoted_run = runs[str(full[0].number)].data.tags
    assert promoted_run["mnistlab.rung"] == "full" and promoted_run["mnistlab.promoted_from"] == str(
        full[0].user_attrs[tr.PROMOTED_FROM])


def test_a_stop_reached_by_one_worker_stops_the_other(tmp_path: Path, mlflow_db: str, data_dir: Path) -> None:
    path = write(tmp_path, "halt", "n_trials: 30\nstop: {val_score: 5}\n")  # any trained network passes 5%
    proc = run_cli("study", "run", str(path), "--workers", "2", "--threads", "1", "--heartbeat", "1",
                   env={"MLFLOW_TRACKING_URI": mlflow_db})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("stopped at") == 2, proc.stdout  # each worker says it once
    s = load("halt", open_storage(None, heartbeat=None))
    flag = s.user_attrs[STOP_ATTR]
    assert "reached val_score" in flag["reason"] and "target 5%" in flag["reason"]
    trained = [t for t in s.get_trials() if tr.trained(t)]
    assert 1 <= len(trained) <= 3  # the first to finish, and at most what each worker had in hand
    parent = MlflowClient(mlflow_db).get_run(s.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["mnistlab.stop_reason"] == flag["reason"] and parent.info.status == "FINISHED"
    assert run_cli("study", "check", str(path)).returncode == 0


def test_a_warm_started_study_trains_the_imported_configurations_first(tmp_path: Path, mlflow_db: str,
                                                                       data_dir: Path) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_db}
    first = write(tmp_path, "first", "n_trials: 3\nenqueue_base: false\n")
    assert run_cli("study", "run", str(first), "--threads", "1", env=env).returncode == 0
    old = load("first", open_storage(None, heartbeat=None))
    best_two = [g.first for g in sorted(tr.groups(old.get_trials()), key=tr.rank_key)[:2]]
    second = write(tmp_path, "second", "n_trials: 3\nwarm_start: [{study: first, top: 2}]\n")
    proc = run_cli("study", "run", str(second), "--threads", "1", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    new = load("second", open_storage(None, heartbeat=None)).get_trials()
    assert new[0].user_attrs.get(tr.BASE) and [t.user_attrs.get(WARM_FROM) for t in new[1:3]] == [
        f"study first trial {t.number}" for t in best_two]
    assert [t.params for t in new[1:3]] == [t.params for t in best_two]  # trained right after the base
    assert all(t.state == TrialState.COMPLETE and tr.trained(t) for t in new[:3])
    assert len(old.get_trials()) == len(load("first", open_storage(None, heartbeat=None)).get_trials())
