"""One tracked-training path, for `mnistlab train`, a study's trials and refits: ``train()`` with
its run's record kept whole, whatever instant the training stops at.

The run is anything with the three methods of tracking/recorder.py's ``RunLog`` (``RunSink``):
the trainer core knows no MLflow. A resume reads and measures its checkpoint once (``restore``)
and hands it to the trainer; the epochs it takes over are logged first (they ran before this run
existed), then each new epoch as it ends; the run is ended (KILLED, FAILED) with its whole
history when the training raises, unless the caller ends it itself (a study trial, whose end
also depends on Optuna). What else happens to each epoch (a trial reports it to Optuna and may
be pruned) is an ``EpochLog`` subclass's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mnistlab.core.config import ExperimentConfig
from mnistlab.core.data import MnistData
from mnistlab.core.metrics import EpochMetrics, Result
from mnistlab.core.train import Restored, restore, train
from mnistlab.util import interrupts


class RunSink(Protocol):
    """Where a tracked training's epochs go (tracking/recorder.py's RunLog)."""

    def log_missing(self, history: list[EpochMetrics]) -> None: ...

    def epoch(self, m: EpochMetrics) -> None: ...

    def end(self, exc: BaseException, history: list[EpochMetrics]) -> None: ...


class EpochLog:
    """What happens to the epochs of a tracked training: each is kept in ``history`` (from the
    first epoch, those a resume takes over included) and logged to the run."""

    def __init__(self, run: RunSink | None) -> None:
        self.run = run
        self.history: list[EpochMetrics] = []

    def restored(self, history: list[EpochMetrics]) -> None:
        """The epochs a resume takes over: they ran before this run existed."""
        self.history[:] = history
        if self.run is not None:
            self.run.log_missing(history)

    def record(self, m: EpochMetrics) -> None:
        """One new epoch, its checkpoint on disk."""
        self.history.append(m)
        if self.run is not None:
            self.run.epoch(m)


def tracked_train(cfg: ExperimentConfig, data: MnistData, run: RunSink | None, checkpoint_dir: Path, *,
                  resume: bool, verbose: bool, test_once: bool = False, epochs: EpochLog | None = None,
                  instant: str = "train.epoch", end_run: bool = True) -> Result:
    """``train()`` with ``run`` kept whole; ``epochs`` (an ``EpochLog`` of ``run`` by default)
    records each epoch, whole or not at all: a signal that lands inside its writes is raised when
    they return, then ``instant`` is passed (the interruption tests stop a process there)."""
    log = epochs if epochs is not None else EpochLog(run)

    def on_epoch(m: EpochMetrics) -> None:
        # raised inside the MLflow write, before the run noted the epoch as logged, run.end logged it again
        with interrupts.shielded():
            log.record(m)
        interrupts.point(instant)

    try:
        restored = restore(cfg, data, checkpoint_dir) if resume else Restored()
        with interrupts.shielded():
            log.restored(restored.history)
        return train(cfg, data, on_epoch, checkpoint_dir=checkpoint_dir, resume=restored if resume else False,
                     verbose=verbose, test_once=test_once)
    except BaseException as exc:
        if end_run and run is not None:
            run.end(exc, log.history)
        raise
