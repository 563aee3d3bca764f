"""`study check`'s findings in the fast tier: a study's records made by hand (no training) in a real
SQLite Optuna storage and a real SQLite MLflow store, through mnistlab's own recorder, then
broken the ways a crash or an outage breaks them. The checkpoint files are stand-in bytes with
their true checksums: check compares checksums and names, it never loads weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT
from mnistlab.check import check
from mnistlab.core import trials as tr
from mnistlab.core.metrics import EpochMetrics, Result
from mnistlab.search.runner import recorder_for
from mnistlab.search.storage import create, open_storage
from mnistlab.search.study_file import StudyConfig, load_study
from mnistlab.tracking.recorder import StudyRecorder
from mnistlab.tracking.tracker import Tracker
from mnistlab.util.files import sha256

EPOCHS = 2


@pytest.fixture(scope="module")
def migrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow store with its schema made once (its migrations take seconds); each test copies it."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    Tracker(f"sqlite:///{db}").client.search_experiments()
    return db


class Records:
    """A study of ``n`` trained trials, each with its MLflow run, metrics and checkpoint files."""

    def __init__(self, tmp_path: Path, migrated: Path, n: int = 2) -> None:
        shutil.copy(migrated, tmp_path / "mlflow.db")
        self.tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
        path = tmp_path / "hand.yaml"
        path.write_text(f"name: hand\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\nmax_params: 20000\n"
                        "enqueue_base: false\nspace:\n  train.lr: {type: float, low: 0.001, high: 0.1, log: true}\n")
        self.cfg: StudyConfig = load_study(path)
        url = f"sqlite:///{tmp_path / 'optuna.db'}"
        self.study = create(self.cfg, open_storage(url, heartbeat=None))
        self.recorder: StudyRecorder = recorder_for(self.study, self.cfg, self.tracker, url)
        self.artifacts = tmp_path / "artifacts"
        for _ in range(n):
            self.add()
        self.tracker.finish(self.study.user_attrs["mlflow_parent_run_id"], "FINISHED")

    def add(self, state: TrialState = TrialState.COMPLETE) -> optuna.trial.FrozenTrial:
        trial = self.study.ask({"train.lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True)})
        folder = self.artifacts / f"trial-{trial.number}"
        folder.mkdir(parents=True)
        best = folder / "best.safetensors"
        best.write_bytes(b"weights of trial %d" % trial.number)
        (folder / "best.json").write_text(json.dumps({"sha256": sha256(best), "epoch": EPOCHS}))
        (folder / "last.pt").write_bytes(b"epoch checkpoint")
        (folder / "last.pt.sha256").write_text(sha256(folder / "last.pt") + "\n")
        for key, value in {tr.TRAINED: True, tr.CHECKPOINT_DIR: str(folder), tr.PARAM_COUNT: 12_400,
                           tr.EPOCHS_RUN: EPOCHS}.items():
            trial.set_user_attr(key, value)
        cfg = self.cfg.trial_config({"train.lr": trial.params["train.lr"]}, {})
        run = self.recorder.start(trial, cfg, 12_400, folder, "cpu")
        history = [EpochMetrics(e, 0.1, 97.0, 0.1, 97.0 + e, 970 + e, 1000, 0.01, 1.0, 1000.0)
                   for e in range(1, EPOCHS + 1)]
        for m in history:
            run.epoch(m)
        run.complete(Result(params=12_400, device="cpu", history=history, best_epoch=EPOCHS, best_val_acc=99.0,
                            test_acc=98.9))
        trial.set_user_attr(tr.MLFLOW_RUN_ID, run.run_id)
        self.study.tell(trial, 99.0, state=state)
        return self.study.trials[trial.number]

    def run_of(self, number: int) -> str:
        return self.study.trials[number].user_attrs[tr.MLFLOW_RUN_ID]

    def findings(self, repair: bool = False) -> list[str]:
        return [str(f) for f in check(self.study, self.tracker, repair)]


def test_a_whole_record_has_no_finding(tmp_path: Path, migrated: Path) -> None:
    records = Records(tmp_path, migrated)
    assert records.findings() == []
    assert records.findings(repair=True) == []


def test_what_a_crash_leaves_is_found_and_repair_mends_what_it_can(tmp_path: Path, migrated: Path) -> None:
    records = Records(tmp_path, migrated)
    parent = records.study.user_attrs["mlflow_parent_run_id"]
    records.tracker.set_status(parent, "RUNNING")  # the worker died before it ended the parent run
    records.tracker.set_status(records.run_of(1), "RUNNING")  # ...and before trial 1's run ended
    found = records.findings()
    assert found == [f"PROBLEM   run {records.run_of(1)} (trial 1): RUNNING although its trial is not",
                     f"PROBLEM   parent run {parent}: RUNNING although no trial is running"], found
    repaired = records.findings(repair=True)
    # the run ends as its trial did (COMPLETE: FINISHED), not FAILED, which the next check would call wrong
    assert repaired == [f"repaired  run {records.run_of(1)} (trial 1): RUNNING after its trial ended: ended FINISHED",
                        f"repaired  parent run {parent}: RUNNING with no trial running: ended FINISHED"], repaired
    assert records.tracker.get_run(parent).status == "FINISHED"
    assert records.findings() == []


def test_metrics_logged_twice_or_missing_and_a_wrong_status_are_found(tmp_path: Path, migrated: Path) -> None:
    records = Records(tmp_path, migrated, n=3)
    records.tracker.log_metrics(records.run_of(0), {"val_acc": 98.0}, step=1)  # epoch 1 logged a second time
    records.tracker.finish(records.run_of(2), "KILLED")  # a COMPLETE trial whose run says it was stopped
    found = records.findings()
    assert found == ["PROBLEM   trial 0: val_acc has 3 values for 2 epochs (duplicate steps [1])",
                     f"PROBLEM   trial 2: MLflow run {records.run_of(2)} is KILLED, expected FINISHED"], found


def test_a_run_without_its_checkpoint_is_found_and_repair_uploads_the_local_one(tmp_path: Path,
                                                                                migrated: Path) -> None:
    records = Records(tmp_path, migrated)
    run = records.run_of(1)
    records.tracker.set_tags(run, {"mnistlab.missing_artifacts": "best.safetensors"})  # its end could not send it
    assert records.findings() == [f"PROBLEM   trial 1: MLflow run {run} lacks checkpoints/best.safetensors"]
    folder = Path(records.study.trials[1].user_attrs[tr.CHECKPOINT_DIR])
    assert records.findings(repair=True) == [f"repaired  trial 1: uploaded best.safetensors from {folder}"]
    assert records.findings() == []
    (folder / "best.safetensors").write_bytes(b"another file")  # not what best.json's checksum says
    records.tracker.log_artifact(run, folder / "best.safetensors", "checkpoints")
    assert records.findings() == ["PROBLEM   trial 1: checkpoints/best.safetensors does not match the SHA-256 in "
                                  "best.json"]


def test_a_trial_without_its_run_and_a_running_trial_are_found(tmp_path: Path, migrated: Path) -> None:
    records = Records(tmp_path, migrated)
    records.tracker.client.delete_run(records.run_of(0))  # as if MLflow was down when trial 0 started
    running = records.study.ask({"train.lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True)})
    running.set_user_attr(tr.TRAINED, True)
    found = records.findings()
    assert found == ["PROBLEM   trial 2: RUNNING (its worker is alive, or --repair fails it once its heartbeat is "
                     "stale)", "PROBLEM   trial 0: 0 MLflow runs, expected exactly 1"], found
