"""Studies in a plain Optuna storage: create or load, run workers, look at the trials.

Storage is a local SQLite file by default (WAL journal, 60 s busy timeout: safe for several
local worker processes) or PostgreSQL for shared studies. Heartbeats mark trials of dead
workers failed; those are retried with the same parameters and resume from their checkpoint.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import optuna
from optuna.trial import TrialState

from mnistlab import interrupts
from mnistlab import trials as tr
from mnistlab.errors import UserError, clip
from mnistlab.locks import creating
from mnistlab.objective import Objective, StudyFull, best_trial, search_trained, state_label
from mnistlab.space import StudyConfig, check_name, make_pruner, make_sampler, safe_name, worker_salt
from mnistlab.tracking import sharing_warning
from mnistlab.train import Diverged
from mnistlab.uri import mask, quote_userinfo, split_url

# Heartbeats and the retry callback are marked experimental; they are what makes workers crash-safe.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

PARENT_ATTR = "mlflow_parent_run_id"
EXPERIMENT_ATTR = "mlflow_experiment_id"
TRACKING_ATTR = "mlflow_tracking_uri"
ID_ATTR = "mnistlab_study_id"  # a UUID set at creation: same-named studies in other storages stay apart


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

    def extra(self) -> dict[str, Any]:
        """CLI overrides applied to every trial's config."""
        names = {"train.device": self.device, "train.epochs": self.epochs,
                 "data.limit_train": self.limit_train, "data.limit_eval": self.limit_eval}
        return {k: v for k, v in names.items() if v is not None}


def storage_url(url: str | None) -> str:
    """``--storage``, else ``$MNISTLAB_STORAGE``, else ``optuna.db`` in the working folder."""
    url = url or os.environ.get("MNISTLAB_STORAGE") or f"sqlite:///{Path('optuna.db').resolve()}"
    url = quote_userinfo(url)
    parts = split_url(url, "storage URL")
    if parts.scheme.split("+")[0] not in ("sqlite", "postgresql", "mysql") or not (parts.path or parts.netloc):
        raise UserError(f"storage URL {mask(url)!r}: expected sqlite:///FILE or postgresql://USER@HOST/DB")
    return url


# Signs that a database server is not up yet (rather than refusing us): worth waiting for.
TRANSIENT = ("connection refused", "could not connect", "starting up", "shutting down", "timeout expired",
             "could not translate host name", "name or service not known", "temporary failure in name resolution",
             "no route to host", "connection timed out", "server closed the connection")


# Signs of workers creating the same new storage at the same instant: retry at once.
RACES = ("already exists", "duplicate key", "uniqueviolation", "deadlock detected", "database is locked")


def open_storage(url: str | None, heartbeat: int | None = 30, tracker: Any = None,
                 wait: float = 0.0, create: bool = True) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats; a dead worker's trial is failed and retried.

    With ``wait``, a database server that is not up yet is retried every 2 s for that many
    seconds (one line on stderr says so); a wrong password or database name fails at once.
    """
    url = storage_url(url)
    kwargs: dict[str, Any] = {}
    database = None
    if url.startswith("sqlite"):
        path = url.split("sqlite:///", 1)[-1]
        if path and path != ":memory:":
            database = Path(path)
            kwargs = {"creator": lambda: _sqlite_connect(path)}
        else:
            kwargs = {"connect_args": {"timeout": 60}}
    else:
        kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    hb = {}
    if heartbeat:
        hb = {"heartbeat_interval": heartbeat, "grace_period": 3 * heartbeat,
              "heartbeat_stale_trial_callback": _StaleTrial(tracker)}
    if database is None:
        return _connect(url, kwargs, hb, wait)
    if not database.parent.exists():
        raise UserError(f"storage: folder {database.parent} does not exist")
    if not create:  # a command that only reads never makes a database (nor its lock) for a mistyped path
        if not database.is_file():
            raise UserError(f"storage {database}: no such database (run `mnistlab study run` to create a study)")
        return _connect(url, kwargs, hb, wait)
    with creating(database):  # processes starting together would create Optuna's tables at once
        _sqlite_wal(database)
        return _connect(url, kwargs, hb, wait)


class ShieldedStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage whose calls hold SIGTERM/SIGINT until they return: raised inside
    SQLAlchemy, the signal could leave a SQLite write lock held (see mnistlab.interrupts)."""

    def __getattribute__(self, name: str) -> Any:
        attr = super().__getattribute__(name)
        if name.startswith("_") or not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with interrupts.shielded():
                return attr(*args, **kwargs)
        return call


def _connect(url: str, kwargs: dict[str, Any], hb: dict[str, Any], wait: float) -> optuna.storages.RDBStorage:
    """Open the storage, retrying creation races and (with ``wait``) a server still starting."""
    deadline, told, races = time.monotonic() + wait, False, 0
    while True:
        try:
            return ShieldedStorage(url, engine_kwargs=kwargs, **hb)
        except Exception as exc:  # sqlalchemy raises many types for a bad URL or an unreachable server
            detail = _first_line(exc)
            if races < 10 and any(sign in detail.lower() for sign in RACES):
                races += 1  # another worker is creating the same tables this instant
                time.sleep(0.2 + 0.3 * random.random())
                continue
            if time.monotonic() >= deadline or not any(sign in detail.lower() for sign in TRANSIENT):
                waited = f" after waiting {wait:.0f} s" if told else ""
                raise UserError(mask(f"storage {url}: cannot open ({detail}){waited}", url)) from None
            if not told:
                print(mask(f"waiting for the storage {url} ({detail}); retrying for up to {wait:.0f} s", url),
                      file=sys.stderr, flush=True)
                told = True
            time.sleep(2)


def _first_line(exc: BaseException) -> str:
    """The driver's own message, first line (psycopg's is the useful one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return (text.splitlines() or [type(exc).__name__])[0][:200]


def _sqlite_connect(path: str) -> sqlite3.Connection:
    """A connection with a 60 s busy timeout and synchronous=NORMAL: in WAL mode a commit is
    then durable against any crash of the process (SIGKILL included) and only a power cut can
    lose the last commits, never corrupt the file; each commit skips an fsync."""
    con = sqlite3.connect(path, timeout=60, check_same_thread=False)
    con.execute("PRAGMA synchronous=NORMAL")
    return con


def _sqlite_wal(path: Path) -> None:
    """WAL lets readers and one writer work at once; the mode is stored in the file."""
    with sqlite3.connect(path, timeout=60) as con:
        con.execute("PRAGMA journal_mode=WAL")


class _StaleTrial:
    """Heartbeat callback: retry the dead worker's trial and fail its MLflow run."""

    def __init__(self, tracker: Any) -> None:
        self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3, inherit_intermediate_values=True)
        self.tracker = tracker

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)  # the copy is linked to this one by Optuna's "failed_trial" attr
        run_id = trial.user_attrs.get(tr.MLFLOW_RUN_ID)
        if self.tracker is not None and run_id:
            try:
                self.tracker.finish(run_id, "FAILED", {"mnistlab.fail_reason": "worker stopped sending heartbeats"})
            except Exception as exc:  # the retry matters more than the dead run's status
                warnings.warn(f"could not mark MLflow run {run_id} FAILED ({type(exc).__name__})", stacklevel=2)


READY_ATTR = "mnistlab_ready"


def create(cfg: StudyConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """Create the study, or load it if it exists (the same command continues it).

    Race-safe: of workers starting together on a new study exactly one creates it, records its
    attributes and enqueues the base trial; the others wait until it has.
    """
    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if cfg.name in existing and [d.name.lower() for d in existing[cfg.name].directions] != cfg.directions:
        raise UserError(f"study {cfg.name!r} exists with other objectives; rename the study")
    kwargs = {"storage": storage, "study_name": cfg.name, "sampler": make_sampler(cfg), "pruner": make_pruner(cfg)}
    try:
        study = optuna.create_study(directions=cfg.directions, **kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
        _wait_ready(study)
        return study
    study.set_user_attr(ID_ATTR, uuid.uuid4().hex)
    study.set_user_attr("study_file", str(cfg.path))
    study.set_user_attr("max_params", cfg.max_params)
    study.set_user_attr("objectives", list(cfg.objectives))
    if cfg.enqueue_base:
        from mnistlab.config import get_path

        study.enqueue_trial({p.name: get_path(cfg.base, p.name) for p in cfg.space}, user_attrs={tr.BASE: True})
    study.set_user_attr(READY_ATTR, True)
    return study


def _wait_ready(study: optuna.Study, timeout: float = 30.0) -> None:
    """Wait for the worker that created the study to finish setting it up."""
    deadline = time.monotonic() + timeout
    while READY_ATTR not in study.user_attrs and not study.get_trials(deepcopy=False):
        if time.monotonic() > deadline:
            return  # a study made by plain Optuna, without mnistlab's attributes: use it as it is
        time.sleep(0.2)


def study_folder(study: optuna.Study) -> str:
    """The study's folder under the artifacts folder: ``NAME-<first 8 of its id>``; a study made
    before study ids keeps ``NAME``, where its checkpoints already are."""
    uid = study.user_attrs.get(ID_ATTR)
    return f"{study.study_name}-{uid[:8]}" if uid else study.study_name


def _id_in(storage: optuna.storages.BaseStorage, name: str) -> str | None:
    """The id of the study ``name`` in ``storage`` ("" for one made before ids); None if there is none."""
    if name not in optuna.get_all_study_names(storage):
        return None
    study = optuna.load_study(study_name=name, storage=storage)
    _wait_ready(study)  # its creator sets the id before it marks the study ready
    return study.user_attrs.get(ID_ATTR, "")


def check_name_free(cfg: StudyConfig, storage: optuna.storages.BaseStorage, tracker: Any) -> None:
    """UserError when the study's name is held in the tracker by a study of another storage.

    The tracker is read first: a study's id reaches its storage before its MLflow experiment,
    so workers starting one new study together never refuse each other.
    """
    holder = tracker.holder(cfg.name)
    if holder is not None and holder[0] != _id_in(storage, cfg.name):
        raise tracker.taken(cfg.name, holder[1])


def load(name: str, storage: optuna.storages.BaseStorage) -> optuna.Study:
    """An existing study by name; UserError listing the ones there are.

    A name that breaks the study name rule is refused even where a storage holds it (made by
    plain Optuna or an older mnistlab): it would become a path under the artifacts folder."""
    check_name(name, "study")
    names = optuna.get_all_study_names(storage)
    if name not in names:
        known = ", ".join(_shown(n) for n in names) or "none"
        raise UserError(f"no study named {name!r} in this storage (studies: {known})")
    return optuna.load_study(study_name=name, storage=storage)


class Progress:
    """After each trial: a line a terminal and a log file both read well, and stop checks."""

    def __init__(self, cfg: StudyConfig, n_trials: int | None, recorder: Any = None) -> None:
        self.cfg, self.n_trials, self.recorder = cfg, n_trials, recorder
        self.start = time.monotonic()
        self.done_here = 0

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        trials = study.get_trials(deepcopy=False)
        n_trained = sum(1 for t in trials if search_trained(t) and t.state != TrialState.RUNNING)
        n_busy = sum(1 for t in trials if search_trained(t) and t.state == TrialState.RUNNING)
        if search_trained(frozen):
            self.done_here += 1
        print(self.line(frozen, trials, n_trained), flush=True)
        if self.recorder is not None:
            self.recorder.summary(study, trials)
        target = self.cfg.target
        if (self.n_trials is not None and n_trained + n_busy >= self.n_trials) or (
                target is not None and any(t.user_attrs.get(tr.BEST_VAL_ACC, 0) >= target for t in trials
                                           if t.state in (TrialState.COMPLETE, TrialState.PRUNED))):
            study.stop()

    def line(self, t: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial], n_trained: int) -> str:
        state = state_label(t)
        a = t.user_attrs
        acc = a.get(tr.VAL_SCORE, a.get(tr.BEST_VAL_ACC))
        parts = [f"trial {t.number:>3} {state:<11}", f"params {a.get(tr.PARAM_COUNT, 0):>6,}",
                 f"val {acc:6.2f}% ± {tr.se(t):.2f}" if acc is not None else "val    -          "]
        if tr.is_repeat(t):
            parts.append(f"seed {a.get(tr.SEED)} of trial {a.get(tr.REPEAT_OF)}")
        else:
            total = f"/{self.n_trials}" if self.n_trials else ""
            parts.append(f"trained {n_trained}{total}")
        best = tr.best_group(trials)
        if best is not None:
            parts.append(f"best {best.mean:.2f}% ± {best.se:.2f} (trial {best.number}"
                         + (f", {best.n_seeds} seeds)" if best.n_seeds > 1 else ")"))
        if self.n_trials and self.done_here:
            per = (time.monotonic() - self.start) / self.done_here
            parts.append(f"ETA {_duration(per * max(0, self.n_trials - n_trained))}")
        return " | ".join(parts)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


# Trials that end without stopping the study: not needed any more, or diverged (FAIL with their reason).
CAUGHT = (StudyFull, Diverged)


def run_worker(cfg: StudyConfig, opts: RunOptions, storage: Any, recorder: Any = None) -> None:
    """One worker's loop: Optuna's own optimize, stopped by the study's trial count or target."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    salt = worker_salt(storage.get_all_trials(storage.get_study_id_from_name(cfg.name), deepcopy=False))
    study = optuna.load_study(study_name=cfg.name, storage=storage, sampler=make_sampler(cfg, salt),
                              pruner=make_pruner(cfg))
    n_trials = opts.n_trials or cfg.n_trials
    objective = Objective(cfg, extra=opts.extra(), data_dir=opts.data_dir, artifacts=opts.artifacts,
                          folder=study_folder(study), recorder=recorder, n_trials=n_trials, verbose=opts.verbose)
    objective.data_for(cfg.trial_config({}, opts.extra()))  # data problems surface before any trial
    progress = Progress(cfg, n_trials, recorder)
    if opts.heartbeat:
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial is retried, not counted
    if n_trials is not None and sum(map(search_trained, study.get_trials(deepcopy=False))) >= n_trials:
        print(f"study {cfg.name!r} already has {n_trials} trained trials; raise --n-trials to search more")
    else:
        study.optimize(objective, timeout=opts.timeout or cfg.timeout, catch=CAUGHT, callbacks=[progress])
    if cfg.confirm is not None:
        _confirmation(study, cfg, opts, objective, progress)


def _confirmation(study: optuna.Study, cfg: StudyConfig, opts: RunOptions, objective: Objective,
                  progress: Progress) -> None:
    """Seed repeats of the finalists, shared with the other workers like any trials."""
    from mnistlab import confirm

    def run_one() -> None:
        study.optimize(objective, n_trials=1, catch=CAUGHT, callbacks=[progress])

    def stale() -> None:
        if opts.heartbeat:
            optuna.storages.fail_stale_trials(study)

    base_seed = cfg.trial_config({}, opts.extra()).train.seed
    ran = confirm.run_stage(study, cfg.confirm, base_seed, run_one, stale=stale)
    if ran:
        print(f"confirmation: {ran} seed repeats trained by this worker", flush=True)


def worker_args(cfg: StudyConfig, opts: RunOptions, threads: int) -> list[str]:
    """The `mnistlab study run` arguments of one worker process of ``opts``.

    The storage URL and tracking URI are not among them: they may hold a password, and any
    user of the machine can read a process's arguments (``ps``); see worker_env.
    """
    args = [str(cfg.path), "--workers", "1", "--threads", str(threads), "--heartbeat", str(opts.heartbeat),
            "--artifacts", str(opts.artifacts), "--wait", str(opts.wait)]
    flags = {"--n-trials": opts.n_trials, "--timeout": opts.timeout, "--device": opts.device, "--epochs": opts.epochs,
             "--limit-train": opts.limit_train, "--limit-eval": opts.limit_eval, "--data-dir": opts.data_dir}
    for flag, value in flags.items():
        if value is not None:
            args += [flag, str(value)]
    return args + (["--verbose"] if opts.verbose else [])


def worker_env(opts: RunOptions, index: int) -> dict[str, str]:
    """The environment of worker ``index``: the storage and tracking URI travel here, where only
    the same user can read them, resolved as this process resolved them."""
    from mnistlab.uri import resolve_uri

    return dict(os.environ, MNISTLAB_WORKER=str(index), MNISTLAB_STORAGE=storage_url(opts.storage),
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
    if opts.workers <= 1 or opts.oversubscribe:
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    gpus = _gpus(opts.device)
    most = max(cores, gpus)
    memory = _available_memory()
    fits = memory // WORKER_MEMORY if memory is not None else most
    if opts.workers <= min(most, fits):
        return
    have = f"{cores} CPU cores" + (f" and {gpus} GPUs" if gpus else "")
    why = (f"this machine has {have}" if opts.workers > most else
           f"{opts.workers} workers need about {opts.workers * WORKER_MEMORY / 2**30:.0f} GB, "
           f"{memory / 2**30:.1f} GB is available")
    raise UserError(f"--workers {opts.workers}: {why}; more workers than that slow every trial or run out of memory. "
                    f"Use --workers {max(1, min(most, fits))} or fewer, or --oversubscribe "
                    "(env MNISTLAB_OVERSUBSCRIBE=1) to start them anyway")


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
        env = worker_env(opts, i)
        if n_gpu:
            env["CUDA_VISIBLE_DEVICES"] = str(i % n_gpu)  # one GPU per worker, round robin
        cmd = [sys.executable, "-m", "mnistlab", "study", "run", *worker_args(cfg, opts, threads)]
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


def recorder_for(study: optuna.Study, cfg: StudyConfig, tracker: Any, storage_url_: str) -> Any:
    """The study's MLflow experiment and its one parent run, kept as study attributes."""
    from mnistlab.runs import StudyRecorder

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
    recorder: Any  # runs.StudyRecorder
    tracker: Any  # tracking.Tracker
    url: str


def prepare(cfg: StudyConfig, opts: RunOptions) -> Prepared:
    """Check every input, then create or load the study and its MLflow experiment and parent run.

    Nothing is created when an input is bad.
    """
    from mnistlab.tracking import Tracker
    from mnistlab.uri import check_reachable

    cfg.trial_config({}, opts.extra())  # the CLI overrides must make a valid config
    smallest = cfg.smallest_params()
    if smallest > cfg.max_params:
        raise UserError(f"{cfg.path}: the smallest network in the space has {smallest:,} "
                        f"params, over the budget of {cfg.max_params:,}")
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the progress line and the trial's reason say it
    url = storage_url(opts.storage)
    tracker = Tracker(opts.tracking_uri)
    check_reachable(tracker.uri, wait=opts.wait)
    tracker.check_access()
    storage = open_storage(url, opts.heartbeat, tracker, wait=opts.wait)
    check_name_free(cfg, storage, tracker)  # makes a local MLflow store (or finds it broken) before the study
    study = create(cfg, storage)
    return Prepared(study, storage, recorder_for(study, cfg, tracker, url), tracker, url)


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
    from mnistlab import report

    if opts.n_trials is None and cfg.n_trials is None and opts.timeout is None and cfg.timeout is None \
            and cfg.target is None:
        raise UserError(f"{cfg.path}: give n_trials, timeout or target (or --n-trials / --timeout)")
    check_writable(opts.artifacts, "--artifacts")
    check_workers(opts)
    study, storage, recorder, tracker, url = prepare(cfg, opts)
    worker = "MNISTLAB_WORKER" in os.environ
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
        name = getattr(exc, "signame", "SIGINT")
        status, code = "KILLED", 128 + int(getattr(signal, name, signal.SIGINT))
        print(f"interrupted by {name}: the trial in progress is recorded and queued to resume from its last "
              "checkpoint; run the same command to continue", file=sys.stderr, flush=True)
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
                paths = report.write(study, cfg.objectives, opts.artifacts / study_folder(study) / "plots", recorder)
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


def trials_frame(study: optuna.Study, objectives: list[str] | tuple[str, ...]) -> Any:
    """One row a trial: number, state, params, scores with their uncertainty, sampled values.

    ``val_acc`` is the trial's score (mean validation accuracy of its last epochs) and
    ``val_se`` its binomial standard error; ``val_mean``/``seeds`` the seed-mean score of a
    configuration that was repeated; ``best`` marks the pick ``*`` and the trials within
    noise of it ``~`` (the Pareto front ``*`` for two objectives).
    """
    import pandas as pd

    trials = study.get_trials(deepcopy=False)
    gs = tr.groups(trials)
    best_g = tr.best_of(gs)
    best = best_g.first if best_g is not None else None
    tied = tr.tied_numbers(gs, best_g)
    by_group = {g.number: g for g in gs}
    front = {t.number for t in study.best_trials} if len(objectives) > 1 else set()
    rows = []
    for t in trials:
        a = t.user_attrs
        state = state_label(t)
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and \
            t.datetime_start else None
        has_score = tr.VAL_SCORE in a or tr.BEST_VAL_ACC in a
        group = by_group.get(t.number)
        mark = "*" if (best is not None and t.number == best.number) or t.number in front else (
            "~" if t.number in tied else "")
        row = {"number": t.number, "state": state, "param_count": a.get(tr.PARAM_COUNT),
               "val_acc": round(tr.score(t), 2) if has_score else None,
               "val_se": round(tr.se(t), 2) if has_score else None,
               "val_mean": round(group.mean, 2) if group is not None and group.n_seeds > 1 else None,
               "seeds": group.n_seeds if group is not None and group.n_seeds > 1 else None,
               "repeat_of": a.get(tr.REPEAT_OF), "best_epoch_acc": a.get(tr.BEST_VAL_ACC),
               "test_acc": a.get(tr.TEST_ACC), "epochs": a.get(tr.EPOCHS_RUN),
               "duration_s": round(duration, 1) if duration else None, "best": mark}
        row.update({k: v for k, v in t.params.items()})
        rows.append(row)
    frame = pd.DataFrame(rows)
    for column in ("val_mean", "seeds", "repeat_of"):  # shown only where a study has seed repeats
        if all(r[column] is None for r in rows):
            frame = frame.drop(columns=column)
    for column in frame.columns:  # whole numbers stay whole beside a trial that has none yet
        values = [r[column] for r in rows if r.get(column) is not None]
        if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            frame[column] = frame[column].astype("Int64")
    return frame


def status_table(study: optuna.Study, objectives: list[str] | tuple[str, ...]) -> Any:
    """The trials table as `mnistlab study status` prints it."""
    df = trials_frame(study, objectives)
    if df.empty:
        return df
    return df.set_index("number")


def list_studies(storage: optuna.storages.BaseStorage) -> Any:
    """One row a study: trials by state and the best validation accuracy."""
    import pandas as pd

    rows = []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        best = best_trial(trials)
        states = [t.state.name for t in trials]
        objectives = ",".join(study.user_attrs.get("objectives", []))
        rows.append({"study": _shown(summary.study_name), "objectives": objectives,
                     "trials": len(trials), "complete": states.count("COMPLETE"),
                     "pruned": states.count("PRUNED"), "failed": states.count("FAIL"),
                     "running": states.count("RUNNING"),
                     "best_val_acc": best.user_attrs[tr.BEST_VAL_ACC] if best else None,
                     "best_trial": best.number if best else None})
    return pd.DataFrame(rows)


def _shown(name: str) -> str:
    """A name from a storage as a listing shows it: a name that breaks the rule is quoted, cut short
    and marked, since no command will act on it."""
    return name if safe_name(name) else f"{clip(name, 60)} (unsafe name, refused)"
