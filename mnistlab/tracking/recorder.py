"""What a training logs to MLflow: one run's metrics, files and status (RunLog), and a study's runs
nested under its parent run with their live summary and rank tags (StudyRecorder)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistlab.core.checkpoint_files import KEPT, SHARED
from mnistlab.core.metrics import EpochMetrics, Result
from mnistlab.tracking.provenance import environment
from mnistlab.tracking.tracker import RunRecord, Tracker
from mnistlab.util.jsonfile import read_note, write_json
from mnistlab.util.keys import (
    BACKFILLED_TAG,
    BEST_RUN_TAG,
    BEST_TRIAL_TAG,
    EPOCHS_RUN_TAG,
    FAIL_REASON_TAG,
    INTERRUPTED_TAG,
    MISSING_ARTIFACTS_TAG,
    PROMOTED_FROM_TAG,
    PRUNED_AT_TAG,
    RANK_TAG,
    REFIT_OF_TAG,
    REFIT_TAG,
    REPEAT_OF_TAG,
    RETRY_OF_RUN_TAG,
    RUNG_TAG,
    SEED_TAG,
    STOP_REASON_TAG,
    STOPPED_AT_TAG,
    STUDY_ID_TAG,
    STUDY_TAG,
    TIED_TAG,
    TRIAL_TAG,
)

if TYPE_CHECKING:
    import optuna

    from mnistlab.core.config import ExperimentConfig


def flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"dropout": 0.05}}`` -> ``{"model.dropout": 0.05}``."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


class RunLog:
    """One MLflow run of a training: per-epoch metrics, final figures, artifacts, status."""

    def __init__(self, tracker: Tracker, run_id: str, checkpoint_dir: Path, files: dict[str, Path]) -> None:
        self.tracker, self.run_id, self.checkpoint_dir, self.files = tracker, run_id, checkpoint_dir, files
        self.logged: set[int] = set()
        self.shared: dict[str, tuple[int, int]] = {}  # checkpoint file -> (mtime, size) as last sent
        self.share_failed = False

    @classmethod
    def start(cls, tracker: Tracker, experiment_id: str, name: str, cfg: ExperimentConfig, n_params: int, device: str,
              checkpoint_dir: Path, tags: dict[str, str], params: dict[str, Any] | None = None,
              parent: str | None = None, files: dict[str, Path] | None = None) -> RunLog:
        """Create the run and log its params: every config field by its dotted name."""
        from mnistlab.core.model import summary

        run_id = tracker.start_run(experiment_id, name, tags, parent)
        tracker.log_params(run_id, {**flatten(cfg.to_dict()), **(params or {}),
                                    "param_count": n_params, "device": device})
        texts = {"config.yaml": yaml_text(cfg.to_dict()), "model_summary.txt": summary(cfg.model) + "\n",
                 "environment.json": json.dumps(environment(), indent=2) + "\n"}
        try:
            for name, text in texts.items():
                tracker.log_text(run_id, text, name)
        except Exception as exc:  # an unwritable artifact store must not stop the training
            warnings.warn(f"MLflow cannot store artifacts of run {run_id} ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); checkpoints stay in {checkpoint_dir}", stacklevel=2)
        return cls(tracker, run_id, checkpoint_dir, files or {})

    def epoch(self, m: EpochMetrics) -> None:
        self.tracker.log_epoch(self.run_id, m)
        self.logged.add(m.epoch)

    def share_checkpoint(self) -> None:
        """Send the epoch's checkpoint files to the run (``checkpoints/``), those changed since the
        last send, so that a retry on any machine can resume from them. A failed send is said once;
        training goes on, and the next epoch's send or the end of the run sends what is current."""
        for name in SHARED:
            path = self.checkpoint_dir / name
            stamp = _stamp(path)
            if stamp is None or self.shared.get(name) == stamp:
                continue
            try:
                self.tracker.log_artifact(self.run_id, path, "checkpoints")
            except Exception as exc:
                if not self.share_failed:
                    warnings.warn(f"could not send the checkpoint to MLflow run {self.run_id} "
                                  f"({type(exc).__name__}); training goes on and it is sent later", stacklevel=2)
                    self.share_failed = True
                return
            self.shared[name] = stamp

    def log_missing(self, history: list[EpochMetrics]) -> None:
        """Log the epochs of ``history`` this run has not logged: those restored from a checkpoint
        ran before the run existed."""
        for m in history:
            if m.epoch not in self.logged:
                self.epoch(m)

    def _artifacts(self) -> dict[str, str]:
        """Upload the run's files; a failure is reported (and tagged), the files stay on local disk."""
        uploads = [(path, name) for name, path in self.files.items()]
        uploads += [(self.checkpoint_dir / n, "checkpoints") for n in KEPT]
        missing = []
        for path, where in uploads:
            if not path.is_file():
                continue
            if where == "checkpoints" and self.shared.get(path.name) == _stamp(path):
                continue  # sent with its epoch already
            try:
                self.tracker.log_artifact(self.run_id, path, where)
            except Exception as exc:  # an unwritable or unreachable artifact store
                warnings.warn(f"could not upload {path} to MLflow run {self.run_id} "
                              f"({type(exc).__name__}: {str(exc)[:200]}); it stays at {path}", stacklevel=2)
                missing.append(str(path))
        return {MISSING_ARTIFACTS_TAG: ",".join(missing)[:5000]} if missing else {}

    def complete(self, result: Result) -> None:
        """FINISHED, with the test figures and the checkpoints."""
        self.log_missing(result.history)
        final = {"test_acc": result.test_acc, "test_loss": result.test_loss, **_score_metrics(result.history)}
        if result.best_epoch:  # a refit has no validation split and so no best epoch
            final.update(best_val_acc=result.best_val_acc, best_epoch=result.best_epoch)
        self.tracker.log_metrics(self.run_id, {k: v for k, v in final.items() if v is not None},
                                 step=result.epochs_run)
        self._close("FINISHED", {EPOCHS_RUN_TAG: result.epochs_run, **self._artifacts()})

    def end(self, exc: BaseException, history: list[EpochMetrics]) -> None:
        """KILLED for a pruned or interrupted trial, FAILED with the reason otherwise."""
        self.log_missing(history)
        if type(exc).__name__ == "TrialPruned":
            self._close("KILLED", {PRUNED_AT_TAG: history[-1].epoch if history else 0,
                                   **self._artifacts()})
        elif isinstance(exc, KeyboardInterrupt):  # stopped by the user: quick, the checkpoints stay local
            self._close("KILLED", {INTERRUPTED_TAG: getattr(exc, "signame", "SIGINT"),
                                   EPOCHS_RUN_TAG: history[-1].epoch if history else 0})
        else:
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._close("FAILED", {FAIL_REASON_TAG: reason[:5000]})

    def _close(self, status: str, tags: dict[str, Any]) -> None:
        """End the run; if MLflow is gone, keep what it missed beside the checkpoints and say so."""
        self.tracker.offline_until = 0.0  # the end of a run is worth one more real attempt
        pending = self.tracker.save_pending(self.checkpoint_dir / "mlflow-pending.json")
        if pending is not None:
            warnings.warn(f"MLflow is unreachable; unsent metrics kept in {pending}", stacklevel=2)
        try:
            self.tracker.finish(self.run_id, status, tags)
        except Exception as exc:  # the training result must survive a tracking outage
            note = self.checkpoint_dir / "mlflow-unfinished.json"
            runs = read_note(note, dict)
            runs[self.run_id] = {"status": status, "tags": tags}
            write_json(note, runs)
            warnings.warn(f"could not end MLflow run {self.run_id} ({type(exc).__name__}); noted in {note}",
                          stacklevel=2)


def _stamp(path: Path) -> tuple[int, int] | None:
    """(mtime, size) of a file, None if it is not there: what tells a changed checkpoint file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_mtime_ns, stat.st_size


def _score_metrics(history: list[EpochMetrics]) -> dict[str, float]:
    """The trial's ranking score and its standard error (see mnistlab.core.trials), for the run's page."""
    from mnistlab.core.trials import binomial_se, trial_score

    if not history or getattr(history[-1], "eval_split", "val") != "val":
        return {}
    value = trial_score([m.val_acc for m in history])
    return {"val_score": value, "val_se": binomial_se(value, history[-1].val_total)}


def yaml_text(raw: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(raw, sort_keys=False)


class StudyRecorder:
    """Nests each trained trial's run under the study's parent run and keeps its summary live."""

    def __init__(self, tracker: Tracker, study: str, experiment_id: str, parent_id: str, study_file: Path,
                 study_id: str | None = None) -> None:
        self.tracker, self.study, self.experiment_id = tracker, study, experiment_id
        self.parent_id, self.study_file = parent_id, study_file
        self.marked: dict[str, str] = {}  # run id -> its mnistlab.rank tag as last set by this process
        self.tags = {STUDY_TAG: study, **({STUDY_ID_TAG: study_id} if study_id else {})}

    def start(self, trial: optuna.Trial | optuna.trial.FrozenTrial, cfg: ExperimentConfig, n_params: int,
              checkpoint_dir: Path, device: str) -> RunLog:
        from mnistlab.core import trials as tr

        tags = {**self.tags, TRIAL_TAG: str(trial.number)}
        if trial.user_attrs.get(tr.MLFLOW_RUN_ID):  # a retry: link the run of the attempt that died
            tags[RETRY_OF_RUN_TAG] = trial.user_attrs[tr.MLFLOW_RUN_ID]
        if tr.SCREEN in trial.user_attrs:  # a screened study's rungs: which schedule, promoted from where
            tags[RUNG_TAG] = f"screen-{trial.user_attrs[tr.SCREEN]}"
        elif tr.PROMOTED_FROM in trial.user_attrs:
            tags[RUNG_TAG] = "full"
        if tr.PROMOTED_FROM in trial.user_attrs:
            tags[PROMOTED_FROM_TAG] = str(trial.user_attrs[tr.PROMOTED_FROM])
        if tr.REPEAT_OF in trial.user_attrs:  # a seed repeat: link the configuration it confirms
            tags.update({REPEAT_OF_TAG: str(trial.user_attrs[tr.REPEAT_OF]),
                         SEED_TAG: str(trial.user_attrs.get(tr.SEED))})
        run = RunLog.start(self.tracker, self.experiment_id, f"trial-{trial.number}", cfg, n_params, device,
                           checkpoint_dir, tags, params=dict(trial.params), parent=self.parent_id,
                           files={"study": self.study_file})
        trial.set_user_attr(tr.MLFLOW_RUN_ID, run.run_id)
        return run

    def start_refit(self, trial: int, cfg: ExperimentConfig, n_params: int, folder: Path, device: str,
                    retry_of: list[str] | None = None) -> RunLog:
        """The run of one refit seed, under the parent, tagged with the trial it refits (and the
        runs of earlier attempts whose process died, ``retry_of``)."""
        tags = {**self.tags, REFIT_TAG: "true", REFIT_OF_TAG: str(trial),
                SEED_TAG: str(cfg.train.seed)}
        if retry_of:
            tags[RETRY_OF_RUN_TAG] = ",".join(retry_of)
        return RunLog.start(self.tracker, self.experiment_id, f"refit-{trial}-seed-{cfg.train.seed}", cfg, n_params,
                            device, folder, tags, parent=self.parent_id,
                            files={"study": self.study_file} if self.study_file.is_file() else {})

    def refit_runs(self, trial: int, seed: int, status: str = "RUNNING") -> list[RunRecord]:
        """This study's runs of refit seed ``seed`` of ``trial`` with ``status``."""
        query = " AND ".join([*(f"tags.`{k}` = '{v}'" for k, v in self.tags.items()),
                              f"tags.`{REFIT_TAG}` = 'true'", f"tags.`{REFIT_OF_TAG}` = '{int(trial)}'",
                              f"tags.`{SEED_TAG}` = '{int(seed)}'", f"attributes.status = '{status}'"])
        return self.tracker.search_all_runs(self.experiment_id, query)

    def end_dead_refits(self, trial: int, seed: int) -> list[str]:
        """End KILLED the RUNNING runs of a refit seed that no process trains (the caller holds the
        seed's lock): those of attempts killed before they could end their run. Returns their ids."""
        ended = []
        for r in self.refit_runs(trial, seed):
            self.tracker.finish(r.run_id, "KILLED", {INTERRUPTED_TAG: "its process died"})
            ended.append(r.run_id)
        return ended

    def backfill(self, trial: optuna.trial.FrozenTrial, cfg: ExperimentConfig, history: list[EpochMetrics],
                 checkpoint_dir: Path) -> str:
        """The run of a trial that trained while MLflow was unreachable, made afterwards from its
        checkpoint (``mnistlab study check --repair``); returns the new run id."""
        from mnistlab.core import trials as tr

        a = trial.user_attrs
        tags = {**self.tags, TRIAL_TAG: str(trial.number), BACKFILLED_TAG: "true"}
        run = RunLog.start(self.tracker, self.experiment_id, f"trial-{trial.number}", cfg, a[tr.PARAM_COUNT],
                           a.get(tr.DEVICE, "cpu"), checkpoint_dir, tags, params=dict(trial.params),
                           parent=self.parent_id, files={"study": self.study_file} if self.study_file.is_file() else {})
        for m in history:
            run.epoch(m)
        if trial.state.name == "COMPLETE":
            run.complete(Result(params=a[tr.PARAM_COUNT], device=a.get(tr.DEVICE, "cpu"), history=history,
                                best_epoch=a.get(tr.BEST_EPOCH) or 0, best_val_acc=a.get(tr.BEST_VAL_ACC) or 0.0,
                                test_loss=None, test_acc=a.get(tr.TEST_ACC)))
        else:
            from optuna import TrialPruned

            run.end(TrialPruned(), history)
        return run.run_id

    def summary(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial]) -> None:
        """Counts by state and the best trial so far, on the parent run (step = trials finished)."""
        from mnistlab.core import trials as tr
        from mnistlab.core.trials import best_of, groups, state_label, tied_numbers

        counts = {"n_complete": 0, "n_pruned": 0, "n_over_budget": 0, "n_failed": 0, "n_running": 0}
        for t in trials:
            key = f"n_{state_label(t).lower()}"
            counts[key if key in counts else "n_failed"] += 1  # skipped, failed, waiting
        finished = sum(1 for t in trials if t.state.is_finished())
        values = dict(counts)
        tags = {}
        gs = groups(trials)
        best = best_of(gs)
        if best is not None:
            values.update(best_val_score=best.mean, best_val_se=best.se, best_val_acc=best.first.user_attrs.get(
                tr.BEST_VAL_ACC, best.mean), best_seeds=best.n_seeds)
            tied = sorted(tied_numbers(gs, best) - {best.number})
            tags = {BEST_TRIAL_TAG: best.number,
                    BEST_RUN_TAG: best.first.user_attrs.get(tr.MLFLOW_RUN_ID),
                    TIED_TAG: ",".join(map(str, tied)) or "none"}
        try:
            self.tracker.log_metrics(self.parent_id, values, step=finished)
            if tags:
                self.tracker.set_tags(self.parent_id, tags)
            self._mark_ranks(gs, best, trials)
        except Exception as exc:  # the summary is a convenience; a trial's own data is never at stake
            warnings.warn(f"could not update the study summary in MLflow ({type(exc).__name__})", stacklevel=2)

    def _mark_ranks(self, gs: list[Any], best: Any, trials: list[Any]) -> None:
        """Tag every trained trial's run ``mnistlab.rank``: best, tied (within noise of it) or behind
        for a scored one, ``pruned`` for one the pruner stopped, ``screen`` for a screening run (never
        picked), so the runs table can be filtered on it; only changed tags are written."""
        from optuna.trial import TrialState

        from mnistlab.core import trials as tr
        from mnistlab.core.trials import tied

        ranks: dict[str, str] = {}
        for t in trials:
            if tr.trained(t) and t.user_attrs.get(tr.MLFLOW_RUN_ID):
                if t.state == TrialState.PRUNED:
                    ranks[t.user_attrs[tr.MLFLOW_RUN_ID]] = "pruned"
                elif t.state == TrialState.COMPLETE and tr.is_screen(t):
                    ranks[t.user_attrs[tr.MLFLOW_RUN_ID]] = "screen"
        for g in gs if best is not None else []:
            rank = "best" if g.number == best.number else ("tied" if tied(g, best) else "behind")
            for t in g.members:
                if t.user_attrs.get(tr.MLFLOW_RUN_ID):
                    ranks[t.user_attrs[tr.MLFLOW_RUN_ID]] = rank
        for run_id, rank in ranks.items():
            if self.marked.get(run_id) != rank:
                self.tracker.set_tags(run_id, {RANK_TAG: rank})
                self.marked[run_id] = rank

    def mark_stopped(self, at: str, reason: str) -> None:
        """The study-wide stop on the parent run: tags ``mnistlab.stopped_at`` and ``mnistlab.stop_reason``."""
        try:
            self.tracker.set_tags(self.parent_id, {STOPPED_AT_TAG: at, STOP_REASON_TAG: reason})
        except Exception as exc:  # the flag in the storage is what stops the workers; the tags only show it
            warnings.warn(f"could not tag the parent run with the stop ({type(exc).__name__})", stacklevel=2)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return self.tracker.metric_history(run_id, key)
