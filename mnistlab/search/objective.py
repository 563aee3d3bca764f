"""The Optuna objective: sample a config, check the budget, train with a callback, return values.

Data and the tracker come in through the callable class, so data loads once per worker.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnistlab.core import checkpoint
from mnistlab.core import data as data_mod
from mnistlab.core import trials as tr
from mnistlab.core.config import ExperimentConfig
from mnistlab.core.metrics import EpochMetrics, Result
from mnistlab.core.model import count_params
from mnistlab.core.tracked import EpochLog, tracked_train
from mnistlab.core.train import Diverged, resolve_device
from mnistlab.search import stop as stop_mod
from mnistlab.search import workers
from mnistlab.search.screen import promotion_key
from mnistlab.search.study_file import Screen, Stop, StudyConfig
from mnistlab.util import interrupts
from mnistlab.util.errors import Interrupted, UserError

if TYPE_CHECKING:
    from mnistlab.tracking.recorder import RunLog, StudyRecorder


class StudyFull(Exception):
    """This trial is not needed: the study already has its trained trials, met its target or was
    stopped, or it repeats a seed or a promotion that another trial trains."""


class Objective:
    """Callable for ``study.optimize``; holds the data and the tracker for one worker."""

    def __init__(self, study: StudyConfig, *, extra: dict[str, Any] | None = None, data_dir: Path | None = None,
                 artifacts: Path = Path("mnistlab-artifacts"), folder: str | None = None,
                 recorder: StudyRecorder | None = None, n_trials: int | None = None, verbose: bool = False,
                 stop: Stop | None = None) -> None:
        self.study, self.extra, self.data_dir = study, extra or {}, data_dir
        self.artifacts, self.recorder, self.n_trials, self.verbose = artifacts, recorder, n_trials, verbose
        self.folder = folder or study.name  # the study's folder under ``artifacts`` (study.study_folder)
        self.stop = study.stop if stop is None else stop
        self.closed = False  # set once the search takes no new configurations (promotions, confirmation)
        self._data: dict[tuple[Any, ...], data_mod.MnistData] = {}

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        """One trial's life: claimed (sampled, budget-checked, a training slot taken), its run
        created, its epochs, then pruned, complete or failed. An interrupt at any instant of it,
        before its run exists or while a pruning is being recorded, ends it the one way a next
        run can finish: FAIL with its reason, queued to resume, its run KILLED."""
        life = _Life(trial)
        try:
            trial.set_user_attr(tr.WORKER, workers.identity())  # a re-run on this machine knows at once if it died
            interrupts.point("trial.start")
            return self._live(trial, life)
        except optuna.TrialPruned as exc:
            try:
                with interrupts.shielded():  # the pruned run's end is written whole
                    interrupts.point("trial.pruning")
                    life.end(exc)
            except KeyboardInterrupt as stop:  # the user stopped while the pruning was recorded
                life.fail(stop)
                raise stop from None
            raise
        except StudyFull:
            raise  # declined before it trained: its reason is recorded
        except BaseException as exc:
            life.fail(exc)
            raise

    def _live(self, trial: optuna.Trial, life: _Life) -> float | tuple[float, ...]:
        cfg, n_params = self.sample(trial)
        interrupts.point("trial.claimed")
        root = life.root
        ckpt = self.artifacts / self.folder / f"trial-{root}"
        trial.set_user_attr(tr.ROOT_TRIAL, root)
        trial.set_user_attr(tr.CHECKPOINT_DIR, str(ckpt))
        device = str(resolve_device(cfg.train.device))
        earlier_run = trial.user_attrs.get(tr.MLFLOW_RUN_ID)  # a retry's: the run of the attempt that died
        if self.recorder is not None:
            try:
                with interrupts.shielded():  # made and known whole: a signal waits for the run's id
                    life.run = self.recorder.start(trial, cfg, n_params, ckpt, device)
            except Exception as exc:  # MLflow is down: train anyway; `study check --repair` makes the run later
                warnings.warn(f"MLflow unreachable ({type(exc).__name__}); trial {trial.number} trains without its "
                              "run, which `mnistlab study check --repair` creates from its checkpoint", stacklevel=2)
                trial.set_user_attr(tr.MLFLOW_MISSING, True)
        interrupts.point("trial.run")
        resume = root != trial.number
        if resume and earlier_run and self.recorder is not None:
            self._fetch(earlier_run, ckpt, cfg)
        reporter = _Reporter(trial, life.run, multi=len(self.study.objectives) > 1, epochs=cfg.train.epochs)
        life.history = reporter.history  # the same list: the epochs as they are recorded, restored ones first
        # the trial's run is ended by __call__ (pruned, failed or interrupted), with Optuna's state
        result = tracked_train(cfg, self.data_for(cfg), life.run, ckpt, resume=resume, verbose=self.verbose,
                               epochs=reporter, instant="trial.epoch", end_run=False)
        interrupts.point("trial.trained")
        _record(trial, result)
        if life.run is not None:
            life.run.complete(result)
        interrupts.point("trial.recorded")
        return self.values(result, n_params)

    def _fetch(self, run_id: str, ckpt: Path, cfg: ExperimentConfig) -> None:
        """The checkpoint the dying attempt sent to its run, into the local folder when newer:
        the attempt may have run on another machine."""
        import tempfile

        ckpt.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=ckpt.parent, prefix=".fetch-") as scratch:
            folder = self.recorder.tracker.download_checkpoints(run_id, Path(scratch))
            note = checkpoint.adopt(folder, ckpt, cfg.to_dict()) if folder is not None else ""
        if note.startswith(checkpoint.TOOK):
            print(f"checkpoint of run {run_id}: {note}", flush=True)
            return
        _, local, _ = checkpoint.load_latest(ckpt, config=cfg.to_dict())
        where = (f"its local checkpoint after epoch {local['epoch']} ({ckpt})" if local else
                 "epoch 0: the earlier attempt stopped before it checkpointed an epoch")
        remote = f"; MLflow: {note}" if note else ("" if folder is not None else
                                                    f"; its MLflow run {run_id} holds no checkpoint")
        print(f"trial resumes from {where}{remote}", flush=True)

    def sample(self, trial: optuna.Trial) -> tuple[ExperimentConfig, int]:
        """The trial's config and exact parameter count; over-budget or invalid ones never train."""
        start = time.perf_counter()
        values = {p.name: _suggest(trial, p) for p in self.study.space}
        attrs = trial.user_attrs
        repeat = attrs.get(tr.REPEAT_OF)
        extra = dict(self.extra)
        if repeat is not None:  # a seed repeat: the same configuration with another seed
            extra["train.seed"] = int(attrs[tr.SEED])
        screen = self.study.screen
        if screen is not None and tr.SCREEN not in attrs and repeat is None and tr.PROMOTED_FROM not in attrs:
            trial.set_user_attr(tr.SCREEN, 0)  # a new configuration starts at the cheapest rung
            attrs = trial.user_attrs
        try:
            cfg = self.study.trial_config(values, extra)
            if screen is not None and tr.SCREEN in attrs:
                cfg = self.study.trial_config(values, {**extra, **_rung(cfg, screen.rungs[int(attrs[tr.SCREEN])])})
        except UserError as exc:
            trial.set_user_attr(tr.REASON, f"invalid config: {exc}")
            raise optuna.TrialPruned("invalid config") from None
        n_params = count_params(cfg.model)
        trial.set_user_attr(tr.PARAM_COUNT, n_params)
        # Feasibility as Optuna itself reads it (best_trials, samplers, optuna-dashboard): <= 0 fits the budget.
        trial.set_constraint("params_over_budget", float(n_params - self.study.max_params))
        if n_params > self.study.max_params:
            trial.set_user_attr(tr.REASON, f"over budget: {n_params:,} > {self.study.max_params:,} params "
                                          f"(rejected in {1000 * (time.perf_counter() - start):.1f} ms)")
            raise optuna.TrialPruned("over budget")
        if repeat is not None:
            claim_repeat(trial)
        elif tr.PROMOTED_FROM in attrs:
            claim_promotion(trial, self.stop, screen)
        else:
            claim(trial, self.n_trials, self.study.target, stop=self.stop, closed=self.closed)
        return cfg, n_params

    def data_for(self, cfg: ExperimentConfig) -> data_mod.MnistData:
        """Load each distinct data selection once per worker."""
        d = cfg.data
        key = (d.limit_train, d.limit_eval, d.full_train, cfg.train.device)
        if key not in self._data:
            self._data[key] = data_mod.load(d, resolve_device(cfg.train.device), self.data_dir)
        return self._data[key]

    def values(self, result: Result, n_params: int) -> float | tuple[float, ...]:
        best = result.history[result.best_epoch - 1] if result.best_epoch else result.history[-1]
        score = tr.trial_score([m.val_acc for m in result.history])
        table = {"val_acc": score, "params": float(n_params), "val_loss": best.val_loss}
        out = tuple(table[o] for o in self.study.objectives)
        return out[0] if len(out) == 1 else out


def retryable(exc: BaseException) -> bool:
    """Failures of the environment, not of the config: an interrupt, a full disk, an I/O error."""
    return isinstance(exc, (KeyboardInterrupt, OSError))


class _Life:
    """What one trial has done so far, for ending it whatever the instant it is stopped at."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.root = int(trial.user_attrs.get(tr.ROOT_TRIAL, trial.number))  # a retry keeps its original's folder
        self.run: RunLog | None = None  # its MLflow run, once made
        self.history: list[EpochMetrics] = []

    def end(self, exc: BaseException) -> None:
        if self.run is not None:
            self.run.end(exc, self.history)

    def fail(self, exc: BaseException) -> None:
        """FAIL with the reason (queued to resume when the environment failed it); the run ended."""
        _failed(self.trial, exc, self.root, self.run.run_id if self.run is not None else None, self.history)
        try:
            with interrupts.shielded():
                self.end(exc)
        except KeyboardInterrupt:  # a second stop while the first is recorded: the first is raised
            pass


def _failed(trial: optuna.Trial, exc: BaseException, root: int, run_id: str | None, history: list[Any]) -> None:
    """Record why the trial failed; re-enqueue it (same params, same checkpoint folder) when the
    environment failed it, so the next run resumes it from its last good checkpoint."""
    done = history[-1].epoch if history else 0
    if isinstance(exc, Interrupted):
        reason = f"interrupted by {exc.signame} after epoch {done}"
    elif isinstance(exc, KeyboardInterrupt):
        reason = f"interrupted after epoch {done}"
    else:
        reason = f"{type(exc).__name__}: {exc}"[:1000]
    try:
        trial.set_user_attr(tr.REASON, reason)
        if isinstance(exc, Diverged):
            trial.set_user_attr(tr.DIVERGED, True)
        study = getattr(trial, "study", None)
        if retryable(exc) and study is not None:
            attrs = {tr.ROOT_TRIAL: root, tr.RETRY_OF_TRIAL: trial.number}
            for key in (tr.REPEAT_OF, tr.SEED, tr.SCREEN, tr.PROMOTED_FROM):  # a retry is still that repeat, rung
                if key in trial.user_attrs:
                    attrs[key] = trial.user_attrs[key]
            if run_id:
                attrs[tr.MLFLOW_RUN_ID] = run_id  # the retry's run links to this one
            study.enqueue_trial(dict(trial.params), user_attrs=attrs)
            trial.set_user_attr(tr.RETRIED, True)
    except Exception:  # the storage itself may be what failed; the exception still propagates
        pass


def _suggest(trial: optuna.Trial, p: Any) -> Any:
    if p.type == "float":
        return trial.suggest_float(p.name, p.low, p.high, step=p.step, log=p.log)
    if p.type == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_categorical(p.name, list(p.choices))


def _rung(full: ExperimentConfig, rung: Any) -> dict[str, Any]:
    """The values that make ``full`` (the trial's config at the study's schedule) a screen of
    ``rung``: its epochs and images, never more than the full schedule's (a CLI --limit-train or
    --epochs shortens the screens too)."""
    out: dict[str, Any] = {"train.epochs": min(rung.epochs, full.train.epochs)}
    if rung.limit_train is not None:
        out["data.limit_train"] = min(rung.limit_train, full.data.limit_train or rung.limit_train)
    return out


def _decline(trial: optuna.Trial, why: str) -> None:
    trial.set_user_attr(tr.TRAINED, False)
    trial.set_user_attr(tr.REASON, f"not run: {why}")
    raise StudyFull(why)


def _stopped(trial: optuna.Trial, study: optuna.Study, stop: Stop | None) -> None:
    """Decline the trial when the study is stopped (the flag in the storage, or ``stop`` met now)."""
    flag = stop_mod.check(study, stop or Stop())
    if flag is not None:
        _decline(trial, f"the study was stopped ({flag.get('reason', 'stopped')})")


def claim(trial: optuna.Trial, n_trials: int | None, target: float | None, wait: float = 10.0,
          stop: Stop | None = None, closed: bool = False) -> None:
    """Take one of the study's ``n_trials`` training slots, exactly, even with many workers.

    Trial numbers order the claims: a trial trains only if fewer than ``n_trials`` trials
    numbered below it trained or are training. Raises StudyFull otherwise, and when the study
    was stopped, or ``closed`` (this worker takes no new configuration any more).
    """
    trial.set_user_attr(tr.TRAINED, True)
    study = getattr(trial, "study", None)
    if study is None:
        return
    if closed and tr.RETRY_OF_TRIAL not in trial.user_attrs and not trial.user_attrs.get(tr.BASE):
        _decline(trial, "the search takes no new configurations")
    _stopped(trial, study, stop)
    deadline = time.monotonic() + wait
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
        undecided = [t for t in earlier if t.state == TrialState.RUNNING
                     and tr.TRAINED not in t.user_attrs and tr.REASON not in t.user_attrs]
        if not undecided or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    reached = target is not None and any(
        t.state in tr.FINISHED and t.user_attrs.get(tr.BEST_VAL_ACC, 0) >= target for t in earlier)
    if reached or (n_trials is not None and sum(map(tr.search_trained, earlier)) >= n_trials):
        _decline(trial, f"target {target}% reached" if reached else f"the study has its {n_trials} trained trials")


def claim_repeat(trial: optuna.Trial, wait: float = 10.0) -> None:
    """A seed repeat trains once: not when an earlier trial already trains or trained the same
    (configuration, seed). Several workers may enqueue the same repeat; trial numbers decide."""
    trial.set_user_attr(tr.TRAINED, True)
    study = getattr(trial, "study", None)
    if study is None:
        return
    key = (trial.user_attrs[tr.REPEAT_OF], trial.user_attrs[tr.SEED])
    _once(trial, study, lambda t: (t.user_attrs.get(tr.REPEAT_OF), t.user_attrs.get(tr.SEED)) == key, wait,
          f"seed {key[1]} of trial {key[0]} is already trained")


def claim_promotion(trial: optuna.Trial, stop: Stop | None, screen: Screen, wait: float = 10.0) -> None:
    """A promotion trains once: not when an earlier trial already trains or trained the same
    (configuration, rung), and not once the study is stopped. Trial numbers decide between
    workers that enqueued the same promotion."""
    trial.set_user_attr(tr.TRAINED, True)
    study = getattr(trial, "study", None)
    if study is None:
        return
    _stopped(trial, study, stop)
    key = promotion_key(trial, screen)
    _once(trial, study, lambda t: tr.is_promoted(t) and promotion_key(t, screen) == key, wait,
          f"trial {key[0]} is already promoted to rung {key[1]}")


def _once(trial: optuna.Trial, study: optuna.Study, same: Callable[[FrozenTrial], bool], wait: float, why: str) -> None:
    """Decline ``trial`` (``why``) when an earlier trial of the same work (``same``) trains or trained;
    one that is RUNNING but has not decided yet is waited for, up to ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number and same(t)]
        undecided = [t for t in earlier if t.state == TrialState.RUNNING and tr.TRAINED not in t.user_attrs]
        if not undecided or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if any(tr.trained(t) for t in earlier):
        _decline(trial, why)


class _Reporter(EpochLog):
    """A trial's epochs: logged to MLflow with the checkpoint shared, reported to Optuna, pruned."""

    def __init__(self, trial: optuna.Trial, run: RunLog | None, multi: bool, epochs: int) -> None:
        super().__init__(run)
        # a seed repeat is never pruned: it measures a configuration, it does not search; a screen is
        # neither reported nor pruned: its short schedule's epochs are not comparable with the full one's
        self.trial, self.run = trial, run
        self.multi = multi or tr.REPEAT_OF in trial.user_attrs or tr.SCREEN in trial.user_attrs
        self.epochs = epochs

    def restored(self, history: list[EpochMetrics]) -> None:
        """The epochs a resumed trial takes over from its checkpoint are logged and reported, and the
        pruner judges the last of them as it would have then: a trial stopped while it was being
        pruned ends pruned, as it would have uninterrupted, instead of training on."""
        super().restored(history)
        if self.multi or not self.history:
            return
        for m in self.history:
            self.trial.report(m.val_acc, m.epoch)
        self._judge(self.history[-1])

    def record(self, m: EpochMetrics) -> None:
        super().record(m)
        if self.run is not None:
            self.run.share_checkpoint()
        if self.multi:
            return  # Optuna cannot prune multi-objective studies
        self.trial.report(m.val_acc, m.epoch)
        self._judge(m)

    def _judge(self, m: EpochMetrics) -> None:
        if m.epoch < self.epochs and self.trial.should_prune():  # a trial that ran every epoch competes
            best = max(self.history, key=lambda h: h.val_acc)
            self.trial.set_user_attr(tr.BEST_VAL_ACC, best.val_acc)
            self.trial.set_user_attr(tr.BEST_EPOCH, best.epoch)
            self.trial.set_user_attr(tr.EPOCHS_RUN, m.epoch)
            self.trial.set_user_attr(tr.PRUNED_AT_EPOCH, m.epoch)
            tr.record_score(self.trial, [h.val_acc for h in self.history], m.val_total)
            raise optuna.TrialPruned(f"pruned at epoch {m.epoch}")


def _record(trial: optuna.Trial, r: Result) -> None:
    if r.history and r.history[-1].eval_split == "val":
        tr.record_score(trial, [m.val_acc for m in r.history], r.history[-1].val_total)
    for key, value in {tr.BEST_VAL_ACC: r.best_val_acc, tr.BEST_EPOCH: r.best_epoch, tr.TEST_ACC: r.test_acc,
                       tr.EPOCHS_RUN: r.epochs_run, tr.DEVICE: r.device,
                       tr.SECONDS_PER_EPOCH: round(r.seconds_per_epoch, 3)}.items():
        trial.set_user_attr(key, value)
