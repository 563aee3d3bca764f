"""Running a study: check every input, create or load it with its MLflow experiment and parent
run, train its trials in one worker or in worker processes on this machine, report at the end.

The storage itself (opening it, creating or loading a study) is storage.py's; the line after
each trial is progress.py's; the trials tables are tables.py's. A little over 350 lines: the
worker processes (arguments, environment, signals passed on) stay beside the one loop they run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import optuna
from optuna.trial import TrialState

from mnistlab.core.config import FLAGS, flag_values
from mnistlab.core.train import Diverged
from mnistlab.core.trials import WORKER, search_trained
from mnistlab.search.objective import Objective, StudyFull
from mnistlab.search.progress import Progress
from mnistlab.search.screen import enqueue_due
from mnistlab.search.screen import run_stage as screen_stage
from mnistlab.search.storage import check_file, check_name_free, create, open_storage, storage_url
from mnistlab.search.study_file import Screen, Stop, StudyConfig, make_pruner, make_sampler, worker_salt
from mnistlab.search.tables import status_table
from mnistlab.search.workers import fail_dead_here
from mnistlab.tracking.tracker import sharing_warning
from mnistlab.tracking.uri import mask
from mnistlab.util import interrupts
from mnistlab.util.errors import UserError, clip
from mnistlab.util.keys import (
    COLUMNS_TAG,
    EXPERIMENT_ATTR,
    ID_ATTR,
    PARENT_ATTR,
    STARTED_ATTR,
    STUDY_FILE_ATTR,
    TRACKING_ATTR,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from mnistlab.tracking.recorder import StudyRecorder
    from mnistlab.tracking.tracker import Tracker


@dataclass(frozen=True)
class RunOptions:
    """What `mnistlab study run` was asked beyond the study file."""

    n_trials: int | None = None
    timeout: float | None = None
    storage: str | None = None
    workers: int = 1
    device: str | None = None
    epochs: int | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    tracking_uri: str | None = None
    data_dir: Path | None = None
    artifacts: Path = Path("mnistlab-artifacts")
    heartbeat: int = 30  # seconds between heartbeats; a trial is stale after 3 missed ones
    threads: int = 0  # torch threads per worker; 0 splits the cores among the workers
    verbose: bool = False  # per-epoch lines and bars
    wait: float = 0.0  # seconds to wait for the storage and the MLflow server to come up
    oversubscribe: bool = False  # start --workers beyond the cores (or memory) of this machine anyway
    stop_val_score: float | None = None  # --stop-val-score: the study file's stop.val_score, overridden
    stop_minutes: float | None = None  # --stop-minutes: the study file's stop.minutes, overridden
    worker_index: int | None = None  # set in the processes `--workers N` starts (0..N-1); None in any other
    space_change: bool = False  # --change-space: continue a stored study whose space the file changed

    def config_flags(self) -> dict[str, Any]:
        """The flags of config.FLAGS that `study run` takes (all but --seed), as given (None: unset)."""
        return {name: getattr(self, name) for name in FLAGS if name in self.__dataclass_fields__}

    def extra(self) -> dict[str, Any]:
        """CLI overrides applied to every trial's config."""
        return flag_values(**self.config_flags())

    def stop(self, cfg: StudyConfig) -> Stop:
        """The study's stop: the file's, with the command line's values in place of its own."""
        return cfg.stop.merged(self.stop_val_score, self.stop_minutes)


def study_folder(study: optuna.Study) -> str:
    """The study's folder under the artifacts folder: ``NAME-<first 8 of its id>``; a study made
    before study ids keeps ``NAME``, where its checkpoints already are."""
    uid = study.user_attrs.get(ID_ATTR)
    return f"{study.study_name}-{uid[:8]}" if uid else study.study_name


# Trials that end without stopping the study: not needed any more, or diverged (FAIL with their reason).
CAUGHT = (StudyFull, Diverged)


def run_worker(cfg: StudyConfig, opts: RunOptions, storage: optuna.storages.BaseStorage,
               recorder: StudyRecorder | None = None) -> None:
    """One worker's loop: Optuna's own optimize, stopped by the study's trial count or target."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    salt = worker_salt(storage.get_all_trials(storage.get_study_id_from_name(cfg.name), deepcopy=False),
                       opts.worker_index)
    study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg, salt),
                              pruner=make_pruner(cfg))
    n_trials = opts.n_trials or cfg.n_trials
    stop = opts.stop(cfg)
    objective = Objective(cfg, extra=opts.extra(), data_dir=opts.data_dir, artifacts=opts.artifacts,
                          folder=study_folder(study), recorder=recorder, n_trials=n_trials, verbose=opts.verbose,
                          stop=stop)
    objective.data_for(cfg.trial_config({}, opts.extra()))  # data problems surface before any trial
    progress = Progress(cfg, n_trials, recorder, stop)
    if STARTED_ATTR not in study.user_attrs:  # a study made before stops existed: its clock starts now
        study.set_user_attr(STARTED_ATTR, time.time())
    if opts.heartbeat:
        _fail_dead(study)  # a dead worker's trial is retried, not counted
    callbacks = ([Promoter(cfg.screen, len(cfg.objectives) > 1)] if cfg.screen else []) + [progress]
    if n_trials is not None and _searched(study) >= n_trials:
        print(f"study {cfg.name!r} already has {n_trials} trained trials; raise --n-trials to search more")
    elif not progress.stopped(study):
        study.optimize(objective, timeout=opts.timeout or cfg.timeout, catch=CAUGHT, callbacks=callbacks)
    if progress.barren is not None:
        raise UserError(f"{cfg.path}: the last {progress.refused} configurations sampled were all refused before "
                        f"training (the last: {clip(progress.barren, 200)}); the search space hardly holds a valid "
                        f"network under the budget: narrow its ranges")
    objective.closed = True  # from here on only promotions, retries and seed repeats train
    if cfg.screen is not None:
        _promotions(study, cfg, opts, objective, progress)
    if cfg.confirm is not None:
        _confirmation(study, cfg, opts, objective, progress)
    if opts.heartbeat and n_trials is not None and _searched(study) >= n_trials:
        _last_trials(study, objective, progress)


def _searched(study: optuna.Study) -> int:
    return sum(map(search_trained, study.get_trials(deepcopy=False)))


def _last_trials(study: optuna.Study, objective: Objective, progress: Progress, poll: float = 2.0) -> int:
    """The end of a study that has all its trials, for one worker: stay while another worker's
    trial runs, so that a worker that dies in it (another machine or container, whose death only
    its heartbeat shows) has its retry trained here; returns the retries this worker ran.

    Only trials that mnistlab workers run (they send heartbeats) are waited for: a RUNNING trial
    without a worker would never go stale. A stopped study waits for nothing.
    """
    ran, said = 0, False
    while not progress.stopped(study):
        _fail_dead(study)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            study.optimize(objective, n_trials=1, catch=CAUGHT, callbacks=[progress])
            ran += 1
            continue
        running = [t.number for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get(WORKER)]
        if not running:
            break
        if not said:
            said = True
            print(f"waiting for trial{'s' if len(running) > 1 else ''} {', '.join(map(str, running))} of other "
                  "workers to end (a dead worker's trial is retried here once its heartbeat is stale)", flush=True)
        time.sleep(poll)
    if ran:
        print(f"{ran} retries of dead workers' trials run by this worker at the end of the study", flush=True)
    return ran


def _fail_dead(study: optuna.Study) -> None:
    """Fail (and retry) the trials of dead workers: those of this machine at once, whose process is
    gone (search/workers.py), the others once their heartbeat is stale."""
    for number in fail_dead_here(study):
        print(f"trial {number}: its worker on this machine is gone; failed and queued to resume", flush=True)
    optuna.storages.fail_stale_trials(study)


class Promoter:
    """After each trial: enqueue the promotions the screening stage has earned (search/screen.py)."""

    def __init__(self, screen: Screen, multi: bool) -> None:
        self.screen, self.multi = screen, multi

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        enqueue_due(study, self.screen, self.multi)


def _stage_hooks(study: optuna.Study, opts: RunOptions, objective: Objective,
                 progress: Progress) -> tuple[Callable[[], None], Callable[[], None]]:
    """What a stage after the search needs of this worker: run one trial of the study (Optuna pops
    the queue first), and fail dead workers' trials (when heartbeats are on) so that their retries
    are queued."""

    def run_one() -> None:
        study.optimize(objective, n_trials=1, catch=CAUGHT, callbacks=[progress])

    def stale() -> None:
        if opts.heartbeat:
            _fail_dead(study)

    return run_one, stale


def _promotions(study: optuna.Study, cfg: StudyConfig, opts: RunOptions, objective: Objective,
                progress: Progress) -> None:
    """The screened configurations still due a promotion, trained once the search samples no more."""
    assert cfg.screen is not None
    run_one, stale = _stage_hooks(study, opts, objective, progress)
    ran = screen_stage(study, cfg.screen, len(cfg.objectives) > 1, run_one, lambda: progress.stopped(study),
                       stale=stale)
    if ran:
        print(f"screening: {ran} promoted or queued trials run by this worker after the search", flush=True)


def _confirmation(study: optuna.Study, cfg: StudyConfig, opts: RunOptions, objective: Objective,
                  progress: Progress) -> None:
    """Seed repeats of the finalists, shared with the other workers like any trials."""
    from mnistlab.search import confirm

    run_one, stale = _stage_hooks(study, opts, objective, progress)
    base_seed = cfg.trial_config({}, opts.extra()).train.seed
    ran = confirm.run_stage(study, cfg.confirm, base_seed, run_one, stale=stale)
    if ran:
        print(f"confirmation: {ran} seed repeats trained by this worker", flush=True)


def worker_args(cfg: StudyConfig, opts: RunOptions, threads: int, index: int) -> list[str]:
    """The `mnistlab study run` arguments of worker process ``index`` of ``opts``; ``--worker-index``
    tells it that it is one.

    The storage URL and tracking URI are not among them: they may hold a password, and any
    user of the machine can read a process's arguments (``ps``); see worker_env.
    """
    args = [str(cfg.path), "--workers", "1", "--worker-index", str(index), "--threads", str(threads),
            "--heartbeat", str(opts.heartbeat), "--artifacts", str(opts.artifacts), "--wait", str(opts.wait)]
    flags = {"--n-trials": opts.n_trials, "--timeout": opts.timeout, "--data-dir": opts.data_dir,
             "--stop-val-score": opts.stop_val_score, "--stop-minutes": opts.stop_minutes,
             **{"--" + name.replace("_", "-"): value for name, value in opts.config_flags().items()}}
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    return args + (["--verbose"] if opts.verbose else []) + (["--change-space"] if opts.space_change else [])


def worker_env(opts: RunOptions) -> dict[str, str]:
    """The environment of the worker processes: the storage and tracking URI travel here, where
    only the same user can read them, resolved as this process resolved them."""
    from mnistlab.tracking.uri import resolve_uri

    return dict(os.environ, MNISTLAB_STORAGE=storage_url(opts.storage),
                MLFLOW_TRACKING_URI=resolve_uri(opts.tracking_uri))


# What one worker process holds once it trains on the CPU: torch, the MNIST tensors, a model and
# its optimiser (about 0.3 GB before the first trial, under 1 GB while training, measured here).
WORKER_MEMORY = 1 << 30


def check_workers(opts: RunOptions) -> None:
    """UserError, before anything is created, when this machine cannot hold ``opts.workers`` workers:
    more than its cores (or GPUs, when they are used), or more than its available memory.

    The workers' memory itself is not limited (an address-space limit breaks CUDA, which reserves
    far more than it uses); too many of them are refused instead.
    """
    cores = _cores()
    if opts.worker_index is None and opts.threads * max(1, opts.workers) > cores and not opts.oversubscribe:
        # (100,000 threads crashed torch after the study existed; a worker process was checked by its parent)
        raise UserError(f"--threads {opts.threads}: {max(1, opts.workers)} worker(s) x {opts.threads} threads is more "
                        f"than this machine's {cores} CPU cores; give at most {max(1, cores // max(1, opts.workers))} "
                        "(0 splits the cores), or --oversubscribe")
    if opts.workers <= 1 or opts.oversubscribe:
        return
    gpus, memory, most, fits = _capacity(opts.device)
    if opts.workers <= min(most, fits):
        return
    have = f"{cores} CPU cores" + (f" and {gpus} GPUs" if gpus else "")
    why = (f"this machine has {have}" if opts.workers > most else
           f"{opts.workers} workers need about {opts.workers * WORKER_MEMORY / 2**30:.0f} GB, "
           f"{memory / 2**30:.1f} GB is available")
    raise UserError(f"--workers {opts.workers}: {why}; more workers than that slow every trial or run out of memory. "
                    f"Use --workers {max(1, min(most, fits))} or fewer, or --oversubscribe "
                    "(env MNISTLAB_OVERSUBSCRIBE=1) to start them anyway")


def most_workers(device: str | None) -> tuple[int, str]:
    """The most workers ``check_workers`` lets `study run --workers` start here, and why."""
    gpus, memory, most, fits = _capacity(device)
    have = f"{_cores()} CPU cores" + (f", {gpus} GPUs" if gpus else "")
    if memory is not None:
        have += f", {memory / 2**30:.1f} GB of memory available at about {WORKER_MEMORY / 2**30:.0f} GB a worker"
    return max(1, min(most, fits)), have


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _capacity(device: str | None) -> tuple[int, int | None, int, int]:
    """(GPUs used, available memory or None, the cores or GPUs, the workers that memory holds)."""
    gpus = _gpus(device)
    most = max(_cores(), gpus)
    memory = _available_memory()
    return gpus, memory, most, memory // WORKER_MEMORY if memory is not None else most


def _gpus(device: str | None) -> int:
    if (device or "auto") not in ("auto", "cuda"):
        return 0
    import torch

    return torch.cuda.device_count()


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def spawn_workers(cfg: StudyConfig, opts: RunOptions) -> int:
    """Run ``opts.workers`` worker processes on this machine against one storage."""

    n_gpu = _gpus(opts.device)
    threads = opts.threads or max(1, (os.cpu_count() or 1) // opts.workers)
    procs = []
    for i in range(opts.workers):
        env = worker_env(opts)
        if n_gpu:
            env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpu)  # one GPU per worker, round robin
        cmd = [sys.executable, "-m", "mnistlab", "study", "run", *worker_args(cfg, opts, threads, i)]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # pass SIGTERM/SIGINT on, then wait for the workers to record their trials
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
        raise
    return max(codes, key=abs)


def recorder_for(study: optuna.Study, cfg: StudyConfig, tracker: Tracker, storage_url_: str) -> Any:
    """The study's MLflow experiment and its one parent run, kept as study attributes."""
    from mnistlab.tracking.recorder import StudyRecorder
    from mnistlab.tracking.ui_plugin import searched_columns

    attrs = study.user_attrs
    known = attrs.get(TRACKING_ATTR)
    if known is not None and known != mask(tracker.uri):
        raise UserError(f"study {cfg.name!r} logs to MLflow at {known}; pass --tracking-uri for it")
    uid = attrs.get(ID_ATTR)
    exp_id = attrs.get(EXPERIMENT_ATTR)
    if exp_id:  # an existing study's experiment, made before it was tagged as model training
        tracker.mark_training(exp_id)
    else:
        exp_id = tracker.experiment(cfg.name, uid, mask(storage_url_))
    # the runs table's columns in `mnistlab ui`: the score, then what this study searches (tracking/ui_plugin.py)
    tracker.tag_experiment(exp_id, COLUMNS_TAG, json.dumps(searched_columns([p.name for p in cfg.space])))
    parent = attrs.get(PARENT_ATTR)
    if parent is None:
        params = {"study.name": cfg.name, "study.file": str(cfg.path), "study.max_params": cfg.max_params,
                  "study.objectives": ",".join(cfg.objectives), "study.sampler": cfg.sampler.name,
                  "study.pruner": cfg.pruner.name, "study.storage": mask(storage_url_)}
        parent = tracker.parent_run(exp_id, cfg.name, params, uid)
        study.set_user_attr(EXPERIMENT_ATTR, exp_id)
        study.set_user_attr(PARENT_ATTR, parent)
        study.set_user_attr(TRACKING_ATTR, mask(tracker.uri))
    return StudyRecorder(tracker, cfg.name, exp_id, parent, cfg.path, uid)


class Prepared(NamedTuple):
    study: optuna.Study
    storage: optuna.storages.RDBStorage
    recorder: StudyRecorder | None
    tracker: Tracker
    url: str


def prepare(cfg: StudyConfig, opts: RunOptions) -> Prepared:
    """Check every input, then create or load the study and its MLflow experiment and parent run.

    Nothing is created when an input is bad.
    """
    from mnistlab.tracking.tracker import Tracker
    from mnistlab.tracking.uri import check_reachable

    cfg.trial_config({}, opts.extra())  # the CLI overrides must make a valid config
    smallest = cfg.smallest_params()
    if smallest > cfg.max_params:
        raise UserError(f"{cfg.path}: the smallest network in the space has {smallest:,} "
                        f"params, over the budget of {cfg.max_params:,}")
    if cfg.confirm is not None and cfg.confirm.max_params is not None and cfg.confirm.max_params < smallest:
        raise UserError(f"{cfg.path}: confirm.max_params {cfg.confirm.max_params:,} is below the smallest network in "
                        f"the space ({smallest:,} params): no configuration could ever be confirmed")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress line and the trial's reason say it
    url = storage_url(opts.storage)
    new = check_file(url)  # before the MLflow store is made: a bad storage creates nothing
    warm = None
    if cfg.warm_start:  # read and checked before anything is made; enqueued only if the study is new
        from mnistlab.search.warm import configurations

        warm = configurations(cfg, opts.storage)
    tracker = Tracker(opts.tracking_uri)
    check_apart(url, tracker.uri)
    check_reachable(tracker.uri, wait=opts.wait)
    tracker.check_access()
    if new and tracker.known() and (holder := tracker.holder(cfg.name)) is not None:
        raise tracker.taken(cfg.name, holder[1])  # a study of a storage not made yet holds no name: none is made
    storage = open_storage(url, opts.heartbeat, tracker, wait=opts.wait)
    check_name_free(cfg, storage, tracker)  # makes a local MLflow store (or finds it broken) before the study
    study = create(cfg, storage, warm, space_change=opts.space_change)
    return Prepared(study, storage, recorder_for(study, cfg, tracker, url), tracker, url)


def check_apart(storage: str, tracking_uri: str) -> None:
    """UserError when the Optuna storage and the MLflow store are one SQLite file: each needs its own."""
    from mnistlab.tracking.uri import sqlite_file

    mine, theirs = sqlite_file(storage), sqlite_file(tracking_uri)
    if mine is not None and theirs is not None and mine.resolve() == theirs.resolve():
        raise UserError(f"the storage and the tracking URI are one file, {mine}: Optuna and MLflow each need "
                        "their own database (the defaults are optuna.db and mlflow.db)")


def create_study(cfg: StudyConfig, opts: RunOptions) -> None:
    """`mnistlab study create`: the study, its MLflow experiment and parent run made (or found), and said."""
    made = prepare(cfg, opts)
    print(f"study {cfg.name!r} ready in {mask(made.url)}: {len(made.study.trials)} trials so far; "
          f"MLflow {mask(made.tracker.uri)} experiment {made.recorder.experiment_id} "
          f"parent run {made.recorder.parent_id}")


def report_study(study: optuna.Study, objectives: tuple[str, ...], tracker: Tracker, artifacts: Path) -> None:
    """`mnistlab study report`: draw the study's plots and attach them to its MLflow parent run
    in ``tracker`` (the store the study recorded, as `check` and `best` find it)."""
    from mnistlab.search import plots
    from mnistlab.tracking.recorder import StudyRecorder

    parent = study.user_attrs.get(PARENT_ATTR)
    if parent and not tracker.known():  # a mistyped store would be created empty, and the plots sent nowhere
        raise UserError(f"study {study.study_name!r} logs to MLflow, but there is no MLflow store at "
                        f"{mask(tracker.uri)}: pass --tracking-uri")
    recorder = StudyRecorder(tracker, study.study_name, study.user_attrs.get(EXPERIMENT_ATTR, ""),
                             parent, Path(study.user_attrs.get(STUDY_FILE_ATTR, ""))) if parent else None
    paths = plots.write(study, objectives, artifacts.resolve() / study_folder(study) / "plots", recorder)
    for path in paths:
        if recorder is not None:
            tracker.log_artifact(parent, path, "plots")
        print(f"wrote {path}")


def check_writable(folder: Path, what: str) -> None:
    """UserError unless ``folder`` is a folder this process may write in, or can be made as one:
    checked before the study exists, not found out by its first trial."""
    probe = folder.resolve()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{what} {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {folder}: {probe} is not writable")


def run(cfg: StudyConfig, opts: RunOptions) -> int:
    """`mnistlab study run`: check inputs, create or load the study, run the workers, report."""
    from mnistlab.search import plots

    if opts.n_trials is None and cfg.n_trials is None and opts.timeout is None and cfg.timeout is None \
            and cfg.target is None and not opts.stop(cfg):
        raise UserError(f"{cfg.path}: give n_trials, timeout, target or stop (or --n-trials / --timeout / "
                        "--stop-minutes)")
    check_writable(opts.artifacts, "--artifacts")
    check_workers(opts)
    study, storage, recorder, tracker, url = prepare(cfg, opts)
    worker = opts.worker_index is not None  # one of the processes of `--workers N`: its parent reports
    if not worker:
        tracker.set_status(recorder.parent_id, "RUNNING")
        print(f"study {cfg.name!r} in {mask(url)}; MLflow {mask(tracker.uri)} parent run {recorder.parent_id}",
              flush=True)
        shared = sharing_warning(url, tracker, recorder.experiment_id)
        if shared:
            print(shared, file=sys.stderr, flush=True)
    status, code, failure = "FINISHED", 0, None
    previous = interrupts.stop_on_signals()
    try:
        if opts.workers > 1:
            code = spawn_workers(cfg, opts)
        else:
            run_worker(cfg, opts, storage, recorder)
    except KeyboardInterrupt as exc:
        status, code = "KILLED", interrupts.stopped(exc, "the trial in progress is recorded and queued to resume "
                                                         "from its last checkpoint; run the same command to continue")
    except OSError as exc:  # a full disk, an unwritable folder: the trial is recorded and queued again
        status, code = "FAILED", 2
        failure = UserError(f"stopped by an I/O error ({exc}); finished trials and checkpoints are intact and "
                            "the trial in progress is queued to resume: fix the cause and run the same command")
    except UserError as exc:  # e.g. a confirmation asking for more finalists than the search has
        status, code, failure = "FAILED", 2, exc
    except Exception as exc:  # a bug: the parent run still ends (FAILED) before its traceback shows
        status, code, failure = "FAILED", 1, exc
    finally:
        interrupts.restore(previous)
    if not worker:
        trials = study.get_trials(deepcopy=False)
        recorder.summary(study, trials)
        try:
            if status == "FINISHED":  # an interrupted run exits at once; `study report` draws the plots later
                paths = plots.write(study, cfg.objectives, opts.artifacts / study_folder(study) / "plots", recorder)
                for path in paths:
                    tracker.log_artifact(recorder.parent_id, path, "plots")
            if status != "FINISHED" or not any(t.state == TrialState.RUNNING for t in trials):
                tracker.finish(recorder.parent_id, status)
        except Exception as exc:  # every trial is recorded in the storage and on disk already
            warnings.warn(f"MLflow unreachable at the end of the study ({type(exc).__name__}); the parent run is "
                          "not finished: run `mnistlab study check --repair` when it is back", stacklevel=2)
        if status == "FINISHED":
            print(status_table(study, cfg.objectives).to_string(max_rows=30))
    if failure is not None:
        raise failure
    return code

