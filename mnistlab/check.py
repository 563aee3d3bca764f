"""`mnistlab study check`: the study's record is whole, or a readable list of what is not.

The invariant, once every worker has stopped:

- no trial and no MLflow run is RUNNING;
- every completed or pruned trial has exactly one MLflow child run with the matching status
  (FINISHED / KILLED), one ``val_acc`` value per epoch it ran, and its checkpoint artifact,
  whose SHA-256 matches the one recorded in ``best.json``;
- trial numbers are unique and every failed trial has a reason;
- in a screened study, each promotion (a configuration at a rung) trained once.

With ``repair``: stale RUNNING trials are failed (and retried, as a dead worker's are),
RUNNING runs of finished trials are ended FAILED, metrics and run endings that an MLflow outage
kept on local disk are sent, epochs missing from a run's metrics are logged from its checkpoint,
artifacts that could not be uploaded are uploaded, and an experiment made before mnistlab tagged
its experiments as model training (``mlflow.experimentKind``) is tagged.
"""

from __future__ import annotations

import collections
import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from mnistlab.core import checkpoint_files as files
from mnistlab.core import trials as tr
from mnistlab.core.trials import trained
from mnistlab.search.workers import dead_here
from mnistlab.tracking.tracker import RunRecord
from mnistlab.util.errors import UserError
from mnistlab.util.files import sha256
from mnistlab.util.jsonfile import read_json, write_json
from mnistlab.util.keys import (
    EXPERIMENT_ATTR,
    FAIL_REASON_TAG,
    ID_ATTR,
    INTERRUPTED_TAG,
    MISSING_ARTIFACTS_TAG,
    PARENT_ATTR,
    PARENT_TAG,
    REFIT_OF_TAG,
    REFIT_TAG,
    SEED_TAG,
    STUDY_FILE_ATTR,
    STUDY_ID_TAG,
    STUDY_TAG,
    TRIAL_TAG,
)

if TYPE_CHECKING:
    from mnistlab.tracking.tracker import Tracker

RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED"}
CHECKPOINT_FILES = files.KEPT


@dataclass
class Finding:
    """One broken rule (``fixed`` when ``--repair`` mended it)."""

    where: str
    what: str
    fixed: bool = False

    def __str__(self) -> str:
        return f"{'repaired' if self.fixed else 'PROBLEM '}  {self.where}: {self.what}"


class Checker:
    def __init__(self, study: optuna.Study, tracker: Tracker, repair: bool = False) -> None:
        self.study, self.tracker, self.repair = study, tracker, repair
        self.findings: list[Finding] = []

    def note(self, where: str, what: str, fixed: bool = False) -> None:
        self.findings.append(Finding(where, what, fixed))

    def run(self) -> list[Finding]:
        if self.repair:
            self.send_local()
            self.fail_stale()
        else:
            for folder in self._checkpoint_dirs():
                for name, what in (("mlflow-pending.json", "metrics kept during an MLflow outage, not sent yet"),
                                   ("mlflow-unfinished.json", "a run MLflow could not end during an outage")):
                    if (folder / name).is_file():
                        self.note(str(folder / name), what)
        trials = self.study.get_trials(deepcopy=False)
        self.check_trials(trials)
        if self.tracker is not None and self.study.user_attrs.get(PARENT_ATTR):
            self.check_runs(trials)
        return self.findings

    # -- repairs that come first ---------------------------------------------------------------
    def send_local(self) -> None:
        """Metrics and run endings an MLflow outage left beside the checkpoints."""
        if self.tracker is None:
            return
        for folder in self._checkpoint_dirs():
            pending, unfinished = folder / "mlflow-pending.json", folder / "mlflow-unfinished.json"
            if pending.is_file():
                try:
                    n = self.tracker.send_pending(pending)
                    self.note(str(pending), f"{n} metric values kept during an MLflow outage sent", fixed=True)
                except Exception as exc:
                    self.note(str(pending), f"metrics still unsent ({type(exc).__name__}: {str(exc)[:120]})")
            if unfinished.is_file():
                try:
                    runs = read_json(unfinished)
                    if not isinstance(runs, dict):
                        raise ValueError(f"a JSON {type(runs).__name__}, not an object")
                except (OSError, ValueError) as exc:
                    self.note(str(unfinished), f"unreadable ({str(exc)[:120]}); the runs it notes are not ended")
                    continue
                for run_id, record in list(runs.items()):
                    try:
                        self.tracker.finish(run_id, record["status"], record.get("tags"))
                    except Exception as exc:
                        self.note(str(unfinished), f"run {run_id} still not ended ({type(exc).__name__})")
                        continue
                    del runs[run_id]
                    self.note(str(unfinished), f"run {run_id} ended {record['status']}", fixed=True)
                if runs:
                    write_json(unfinished, runs)
                else:
                    unfinished.unlink()

    def fail_stale(self) -> None:
        from mnistlab.search.workers import fail_dead_here

        before = {t.number for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
        for number in fail_dead_here(self.study) if before else []:  # this machine's dead workers: at once
            self.note(f"trial {number}", "RUNNING, its worker on this machine gone: failed and queued for a retry",
                      fixed=True)
            before.discard(number)
        if before:
            optuna.storages.fail_stale_trials(self.study)  # the storage's callback retries them
        after = {t.number for t in self.study.get_trials(deepcopy=False) if t.state == TrialState.RUNNING}
        for number in sorted(before - after):
            self.note(f"trial {number}", "RUNNING without a heartbeat: failed and queued for a retry", fixed=True)

    # -- the storage ---------------------------------------------------------------------------
    def check_trials(self, trials: list[optuna.trial.FrozenTrial]) -> None:
        counts = collections.Counter(t.number for t in trials)
        for number, n in sorted(counts.items()):
            if n > 1:
                self.note(f"trial {number}", f"number used {n} times")
        retried = {t.system_attrs.get("failed_trial") for t in trials} | {
            t.user_attrs.get(tr.RETRY_OF_TRIAL) for t in trials}
        for t in trials:
            if t.state == TrialState.RUNNING:
                gone = isinstance(t.user_attrs.get(tr.WORKER), str) and dead_here(t.user_attrs[tr.WORKER])
                self.note(f"trial {t.number}", "RUNNING" + (
                    " but its worker on this machine is gone (--repair fails and retries it now)" if gone else
                    " (its worker is alive, or --repair fails it once its heartbeat is stale)" if not self.repair else
                    " and its worker is still sending heartbeats"))
            elif t.state == TrialState.FAIL and not t.user_attrs.get(tr.REASON) and t.number not in retried:
                if self.repair:  # an older mnistlab left interrupted trials so: retried as an interruption is now
                    self.retry_unexplained(t)
                    self.note(f"trial {t.number}", "FAIL without a reason: a retry queued", fixed=True)
                else:
                    self.note(f"trial {t.number}", "FAIL without a reason (--repair retries it)")
        promotions = collections.defaultdict(list)  # a screened study: each promotion trains once at its rung
        for t in trials:
            if tr.is_promoted(t) and trained(t):
                promotions[(t.user_attrs[tr.PROMOTED_FROM], t.user_attrs.get(tr.SCREEN, "full"))].append(t.number)
        for (origin, rung), numbers in sorted(promotions.items(), key=str):
            if len(numbers) > 1:
                self.note(f"trial {origin}", f"promoted to rung {rung} and trained {len(numbers)} times (trials "
                                             f"{', '.join(map(str, numbers))})")

    def retry_unexplained(self, t: optuna.trial.FrozenTrial) -> None:
        """A FAIL without a reason (older versions' interruptions ended so) gets a retry with its
        parameters and checkpoint folder, as an interrupted trial does now; the retry names it
        (``retry_of_trial``), which is its explanation (a finished trial cannot be written to)."""
        attrs = {k: t.user_attrs[k] for k in (tr.REPEAT_OF, tr.SEED, tr.SCREEN, tr.PROMOTED_FROM, tr.MLFLOW_RUN_ID)
                 if k in t.user_attrs}
        attrs.update({tr.ROOT_TRIAL: t.user_attrs.get(tr.ROOT_TRIAL, t.number), tr.RETRY_OF_TRIAL: t.number})
        self.study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)

    # -- MLflow --------------------------------------------------------------------------------
    def check_runs(self, trials: list[optuna.trial.FrozenTrial]) -> None:

        attrs = self.study.user_attrs
        parent_id, experiment = attrs[PARENT_ATTR], attrs.get(EXPERIMENT_ATTR)
        uid = attrs.get(ID_ATTR)
        query = f"tags.`{STUDY_TAG}` = '{self.study.study_name}'"
        if uid:
            query += f" AND tags.`{STUDY_ID_TAG}` = '{uid}'"
        runs = self.tracker.search_all_runs(experiment, query)
        if not uid:  # a study made before ids: runs of a newer same-named study are not its own
            runs = [r for r in runs if STUDY_ID_TAG not in r.tags]
        by_trial: dict[int, list[RunRecord]] = collections.defaultdict(list)
        state = {t.number: t for t in trials}
        for r in runs:
            if r.tags.get(PARENT_TAG) == "true":
                continue
            if r.tags.get(REFIT_TAG) == "true":
                self.check_refit_run(r, state)
                continue
            by_trial[int(r.tags.get(TRIAL_TAG, -1))].append(r)
        for number, found in sorted(by_trial.items()):
            for i, r in enumerate(found):
                if r.status == "RUNNING" and (number not in state or state[number].state != TrialState.RUNNING):
                    found[i] = r = self._stuck_run(r, number, state.get(number))
                if r.tags.get("mlflow.parentRunId") != parent_id:
                    self.note(f"run {r.run_id}", f"trial {number}'s run is not under the study's parent run")
        for t in trials:
            if t.state in RUN_STATUS and trained(t):
                self.check_trial_run(t, by_trial.get(t.number, []))
        self.check_kind(experiment)
        any_running = any(t.state == TrialState.RUNNING for t in self.study.get_trials(deepcopy=False))
        parent = self.tracker.get_run(parent_id)
        if parent.status == "RUNNING" and not any_running:
            if self.repair:
                self.tracker.finish(parent_id, "FINISHED")
                self.note(f"parent run {parent_id}", "RUNNING with no trial running: ended FINISHED", fixed=True)
            else:
                self.note(f"parent run {parent_id}", "RUNNING although no trial is running")

    def check_kind(self, experiment: str | None) -> None:
        """With repair, an experiment made before mnistlab tagged them is tagged as model training (for
        MLflow's UI). Without, nothing is reported: the record is whole either way."""
        from mnistlab.tracking.tracker import KIND, KIND_TAG

        if self.repair and experiment and self.tracker.mark_training(experiment):
            self.note(f"experiment {experiment}", f"no {KIND_TAG} tag: set to {KIND}", fixed=True)

    def check_refit_run(self, r: RunRecord, state: dict[int, optuna.trial.FrozenTrial]) -> None:
        """A refit seed's run is RUNNING only while a process holds that seed's lock (best/refit.py)."""
        from mnistlab.best.refit import LOCK, folder_for
        from mnistlab.util.locks import held

        if r.status != "RUNNING":
            return
        tags = r.tags
        seed, of = tags.get(SEED_TAG), tags.get(REFIT_OF_TAG)
        where = f"run {r.run_id} (refit seed {seed} of trial {of})"
        trial = state.get(int(of)) if str(of).isdigit() else None
        lock = None
        if trial is not None and str(seed).isdigit():  # the seed's folder as the refit spells it
            artifacts = Path(str(trial.user_attrs.get(tr.CHECKPOINT_DIR, ""))).parent.parent
            with contextlib.suppress(UserError):
                lock = folder_for(trial, artifacts, int(seed)) / LOCK
        if lock is not None and held(lock):
            return  # a refit trains it now
        if self.repair:
            self.tracker.finish(r.run_id, "KILLED",
                                {INTERRUPTED_TAG: "its process died; ended by mnistlab study check"})
            self.note(where, "RUNNING but no process trains it: ended KILLED", fixed=True)
        else:
            self.note(where, "RUNNING but no process trains it")

    def _stuck_run(self, r: RunRecord, number: int, trial: optuna.trial.FrozenTrial | None) -> RunRecord:
        """A run left RUNNING after its trial ended (its worker died between the two records): ended
        as its trial ended (FINISHED, KILLED for a pruned one), FAILED when the trial failed or is gone."""
        where = f"run {r.run_id} (trial {number})"
        if not self.repair:
            self.note(where, "RUNNING although its trial is not")
            return r
        status = RUN_STATUS.get(trial.state, "FAILED") if trial is not None else "FAILED"
        tags = {} if status != "FAILED" else {FAIL_REASON_TAG: "its worker stopped; ended by mnistlab study check"}
        self.tracker.finish(r.run_id, status, tags)
        self.note(where, f"RUNNING after its trial ended: ended {status}", fixed=True)
        return RunRecord(r.run_id, status, r.tags)

    def check_trial_run(self, t: optuna.trial.FrozenTrial, found: list[RunRecord]) -> None:
        where = f"trial {t.number}"
        if not found and self.repair:
            made = self.backfill(t)
            if made is not None:
                self.note(where, f"no MLflow run (MLflow was down when it started): created {made.run_id} "
                                 "from its checkpoint", fixed=True)
                found = [made]
        if len(found) != 1:
            self.note(where, f"{len(found)} MLflow runs, expected exactly 1")
            if not found:
                return
        run = found[-1]
        expected = RUN_STATUS[t.state]
        if run.status != expected and run.status != "RUNNING":
            self.note(where, f"MLflow run {run.run_id} is {run.status}, expected {expected}")
        epochs = t.user_attrs.get(tr.EPOCHS_RUN) or t.user_attrs.get(tr.PRUNED_AT_EPOCH)
        steps = [step for step, _ in self.tracker.metric_history(run.run_id, "val_acc")]
        if epochs is not None and sorted(steps) != list(range(1, int(epochs) + 1)):
            dupes = sorted(s for s, n in collections.Counter(steps).items() if n > 1)
            logged = self.log_epochs(t, run.run_id, int(epochs)) if self.repair and not dupes else []
            if logged:
                self.note(where, f"MLflow run {run.run_id} lacked some epochs' metrics: logged epochs {logged} "
                                 "from its checkpoint", fixed=True)
            else:
                detail = f"duplicate steps {dupes}" if dupes else f"steps {sorted(steps)}"
                self.note(where, f"val_acc has {len(steps)} values for {epochs} epochs ({detail})")
        self.check_checkpoint(t, run)

    def log_epochs(self, t: optuna.trial.FrozenTrial, run_id: str, epochs: int) -> list[int]:
        """Log the epochs a trial's run lacks from its checkpoint's history (the epochs a resumed
        trial took over were missing from runs that ended pruned); [] when the checkpoint lacks them."""
        from mnistlab.core.train import restored_history

        history = [m for m in restored_history(Path(t.user_attrs.get(tr.CHECKPOINT_DIR, ""))) if m.epoch <= epochs]
        if [m.epoch for m in history] != list(range(1, epochs + 1)):
            return []
        return self.tracker.log_missing_epochs(run_id, history)

    def backfill(self, t: optuna.trial.FrozenTrial) -> RunRecord | None:
        """Make the missing run of a trial from its local checkpoint; None if that is gone too."""
        from mnistlab.core.checkpoint import load_latest
        from mnistlab.core.config import from_dict
        from mnistlab.core.metrics import EpochMetrics
        from mnistlab.tracking.recorder import StudyRecorder

        folder = Path(t.user_attrs.get(tr.CHECKPOINT_DIR, ""))
        last, state, _ = load_latest(folder) if folder.is_dir() else (None, {}, "")
        if last is None:
            return None
        history = [EpochMetrics(**m) for m in state["history"]]
        epochs = t.user_attrs.get(tr.EPOCHS_RUN) or t.user_attrs.get(tr.PRUNED_AT_EPOCH) or len(history)
        attrs = self.study.user_attrs
        recorder = StudyRecorder(self.tracker, self.study.study_name, attrs.get(EXPERIMENT_ATTR),
                                 attrs[PARENT_ATTR], Path(attrs.get(STUDY_FILE_ATTR, "")), attrs.get(ID_ATTR))
        run_id = recorder.backfill(t, from_dict(state["config"], str(last)), history[:epochs], folder)
        return self.tracker.get_run(run_id)

    def check_checkpoint(self, t: optuna.trial.FrozenTrial, run: RunRecord) -> None:
        where = f"trial {t.number}"
        listed = self.tracker.checkpoint_names(run.run_id)
        # files the run's end could not send: MLflow may hold an older epoch's copy of them
        unsent = {Path(p).name for p in run.tags.get(MISSING_ARTIFACTS_TAG, "").split(",") if p}
        missing = [n for n in CHECKPOINT_FILES
                   if n in unsent or (n in (files.BEST, files.BEST_META) and n not in listed)]
        if missing and self.repair:
            folder = Path(t.user_attrs.get(tr.CHECKPOINT_DIR, ""))
            if all((folder / n).is_file() for n in missing):
                for name in CHECKPOINT_FILES:
                    if (folder / name).is_file() and (name not in listed or name in unsent):
                        self.tracker.log_artifact(run.run_id, folder / name, "checkpoints")
                if run.tags.get(MISSING_ARTIFACTS_TAG):
                    self.tracker.delete_tag(run.run_id, MISSING_ARTIFACTS_TAG)
                self.note(where, f"uploaded {', '.join(missing)} from {folder}", fixed=True)
                missing = []
        if missing:
            self.note(where, f"MLflow run {run.run_id} lacks checkpoints/{', checkpoints/'.join(missing)}")
            return
        with tempfile.TemporaryDirectory() as tmp:
            got = self.tracker.download_artifact(run.run_id, f"checkpoints/{files.BEST_META}", Path(tmp))
            weights = self.tracker.download_artifact(run.run_id, f"checkpoints/{files.BEST}", Path(tmp))
            try:
                recorded = files.read_meta(got).get("sha256")
            except UserError:
                recorded = None
            if recorded != sha256(weights):
                self.note(where, f"checkpoints/{files.BEST} does not match the SHA-256 in {files.BEST_META}")

    def _checkpoint_dirs(self) -> list[Path]:
        dirs = {Path(t.user_attrs[tr.CHECKPOINT_DIR]) for t in self.study.get_trials(deepcopy=False)
                if t.user_attrs.get(tr.CHECKPOINT_DIR)}
        return sorted(d for d in dirs if d.is_dir())


def check(study: optuna.Study, tracker: Tracker, repair: bool = False) -> list[Finding]:
    """Every finding; the invariant holds when none is unfixed."""
    return Checker(study, tracker, repair).run()


def check_study(study: optuna.Study, storage: str | None, tracking_uri: str | None, repair: bool,
                heartbeat: int) -> int:
    """`mnistlab study check`: print each finding and the verdict; 1 when a problem is left, else 0.

    The study's MLflow store is checked first (reachable, known, allowed); ``repair`` fails stale
    trials, which needs the workers' ``heartbeat``, and ends their runs in this study's store.
    """
    from mnistlab import find_study
    from mnistlab.search.storage import load, open_storage
    from mnistlab.tracking.uri import check_reachable

    name = study.study_name
    tracker = find_study.tracker(study, tracking_uri)
    if study.user_attrs.get(PARENT_ATTR):
        check_reachable(tracker.uri)
        if not tracker.known():
            raise UserError(f"study {name!r} logs to MLflow, but there is no MLflow store at {tracker.uri}: "
                            "pass --tracking-uri")
        tracker.check_access()
    if repair:
        study = load(name, open_storage(storage, heartbeat=heartbeat, tracker=tracker, create=False))
    findings = check(study, tracker, repair=repair)
    for finding in findings:
        print(finding)
    open_ = [f for f in findings if not f.fixed]
    n = len(study.trials)
    if open_:
        print(f"study {name!r}: {len(open_)} problem(s) in {n} trials" + ("" if repair else "; try --repair"))
        return 1
    print(f"study {name!r}: consistent ({n} trials, nothing RUNNING, every finished trial has its one MLflow run, "
          "metrics and checkpoint)")
    return 0
