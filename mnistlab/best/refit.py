"""Refit: the picked configuration trained again on the training and validation images together
(all 60,000 unless the study limits them), with N seeds.

The last step of the usual protocol, made a command (`mnistlab best … --refit --seeds N`):
validation chose the configuration; each refit trains it with its own recipe and epochs on
the training and validation images together and reads the test set once, after the last
epoch. Nothing here looks at a test figure to decide anything: the exported refit is the one
with the configuration's own seed, whatever the others score.

Each seed has a folder ``ARTIFACTS/STUDY/refit-T/seed-S/`` with the usual per-epoch
checkpoints (an interrupted refit resumes from them), the final weights as
``best.safetensors`` + ``best.json``, and ``result.json`` once it has finished; a finished
seed is never trained again. Each seed is an MLflow run under the study's parent run, tagged
``mnistlab.refit``.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistlab.best.card import images
from mnistlab.core import checkpoint, data
from mnistlab.core import trials as tr
from mnistlab.core.checkpoint_files import LAST
from mnistlab.core.config import SIZES, ExperimentConfig, from_dict
from mnistlab.core.model import build_model, count_params
from mnistlab.util import interrupts, locks
from mnistlab.util.errors import UserError
from mnistlab.util.jsonfile import read_json
from mnistlab.util.keys import EXPERIMENT_ATTR, ID_ATTR, PARENT_ATTR, STUDY_FILE_ATTR

if TYPE_CHECKING:
    import optuna

    from mnistlab.best.picks import Choice
    from mnistlab.core.data import MnistData
    from mnistlab.core.metrics import Result
    from mnistlab.tracking.recorder import StudyRecorder
    from mnistlab.tracking.tracker import Tracker

RESULT = "result.json"
LOCK = ".lock"  # held while a process trains the seed (util/locks.py)


@dataclass
class SeedResult:
    """One finished refit."""

    seed: int
    test_acc: float  # %, read once after the last epoch
    test_correct: int
    test_total: int
    epochs: int
    seconds: float
    run_id: str | None
    folder: Path


@dataclass
class Refit:
    trial: int
    config: ExperimentConfig  # the refit's config (all training images), seed of the first refit
    seeds: list[SeedResult]

    @property
    def mean(self) -> float:
        return statistics.fmean(s.test_acc for s in self.seeds)

    @property
    def std(self) -> float:
        return statistics.stdev(s.test_acc for s in self.seeds) if len(self.seeds) > 1 else 0.0

    @property
    def min(self) -> float:
        return min(s.test_acc for s in self.seeds)

    @property
    def exported(self) -> SeedResult:
        """The refit an export delivers: the configuration's own seed, chosen before any test."""
        return self.seeds[0]

    def summary(self) -> dict[str, Any]:
        return {"trial": self.trial, "seeds": [s.seed for s in self.seeds], "test_acc_mean": round(self.mean, 4),
                "test_acc_std": round(self.std, 4), "test_acc_min": round(self.min, 4),
                "test_acc": {str(s.seed): s.test_acc for s in self.seeds},
                "exported_seed": self.exported.seed}


def refit_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The trial's config on all training images (training + validation) with ``seed``."""
    raw = cfg.to_dict()
    raw["data"]["full_train"] = True
    raw["train"]["seed"] = seed
    return from_dict(raw, "refit config")


def folder_for(trial: optuna.trial.FrozenTrial, artifacts: Path, seed: int) -> Path:
    """``ARTIFACTS/STUDY/refit-T/seed-S``, beside the trial's own checkpoint folder."""
    study_folder = Path(str(trial.user_attrs.get(tr.CHECKPOINT_DIR, ""))).parent.name
    if not study_folder or study_folder in (".", ".."):
        raise UserError(f"trial {trial.number}: no checkpoint folder recorded; cannot place its refit")
    return artifacts / study_folder / f"refit-{trial.number}" / f"seed-{seed}"


def finished(folder: Path, cfg: ExperimentConfig) -> SeedResult | None:
    """The result of a refit that already finished in ``folder`` (its weights intact), else None."""
    try:
        r = read_json(folder / RESULT)
        weights, meta = checkpoint.load_best(folder)
    except (OSError, ValueError, UserError):
        return None
    if not isinstance(r, dict) or meta.get("config") != cfg.to_dict():
        return None
    try:
        return SeedResult(int(r["seed"]), float(r["test_acc"]), int(r["test_correct"]), int(r["test_total"]),
                          int(r["epochs"]), float(r["seconds"]), r.get("run_id"), folder)
    except (KeyError, TypeError, ValueError):
        return None


def run(trial: optuna.trial.FrozenTrial, trial_cfg: ExperimentConfig, n_seeds: int, max_params: int, artifacts: Path,
        recorder: StudyRecorder | None = None, data_dir: Path | None = None, verbose: bool = False) -> Refit:
    """Refit ``trial_cfg`` with ``n_seeds`` seeds (its own seed first, then the next ones)."""
    from mnistlab.core.train import resolve_device

    n_params = count_params(trial_cfg.model)
    if n_params > max_params:
        raise UserError(f"trial {trial.number}: its network has {n_params:,} params, over the study's budget of "
                        f"{max_params:,}; not refitting it")
    first = trial_cfg.train.seed
    configs = [refit_config(trial_cfg, first + i) for i in range(n_seeds)]
    results, loaded = [], None
    for cfg in configs:
        folder = folder_for(trial, artifacts, cfg.train.seed)
        done = finished(folder, cfg)
        if done is not None:
            print(f"refit seed {cfg.train.seed}: finished before, test {done.test_acc:.2f}% "
                  f"({done.test_correct}/{done.test_total})", flush=True)
            if recorder is not None:  # killed between its result and its run's end: the run is ended now
                with locks.claimed(folder / LOCK, f"refit seed {cfg.train.seed} of trial {trial.number}"):
                    recorder.end_dead_refits(trial.number, cfg.train.seed)
            results.append(done)
            continue
        if loaded is None:
            loaded = data.load(cfg.data, resolve_device(cfg.train.device), data_dir)
        results.append(_train_seed(trial.number, cfg, n_params, folder, loaded, recorder, verbose))
    return Refit(trial.number, configs[0], results)


def _train_seed(trial: int, cfg: ExperimentConfig, n_params: int, folder: Path, loaded: MnistData,
                recorder: StudyRecorder | None, verbose: bool) -> SeedResult:
    """Train one refit seed (resuming from its checkpoint if it was interrupted), record it. The
    seed's lock is held throughout: a second refit of the same seed is refused, not run beside it."""
    with locks.claimed(folder / LOCK, f"refit seed {cfg.train.seed} of trial {trial}"):
        done = finished(folder, cfg)  # finished by another process while this one waited to start
        return done if done is not None else _train_locked(trial, cfg, n_params, folder, loaded, recorder, verbose)


def _train_locked(trial: int, cfg: ExperimentConfig, n_params: int, folder: Path, loaded: MnistData,
                  recorder: StudyRecorder | None, verbose: bool) -> SeedResult:
    from mnistlab.core.tracked import tracked_train
    from mnistlab.core.train import resolve_device

    good = checkpoint.latest_good(folder)
    resume = good is not None
    if good is not None:
        print(f"refit seed {cfg.train.seed}: resuming from {good}", flush=True)
    device = str(resolve_device(cfg.train.device))
    run_log = None
    if recorder is not None:
        # the run of an attempt whose process died (SIGKILL, a crash) is RUNNING still: with the lock
        # held, no process trains this seed, so it is ended KILLED, and the new run links to it
        dead = recorder.end_dead_refits(trial, cfg.train.seed)
        with interrupts.shielded():  # made and known whole
            run_log = recorder.start_refit(trial, cfg, n_params, folder, device, retry_of=dead)
    interrupts.point("refit.run")
    start = time.perf_counter()
    result = tracked_train(cfg, loaded, run_log, folder, resume=resume, verbose=verbose, test_once=True)
    interrupts.point("refit.trained")
    seconds = time.perf_counter() - start
    _save_final(folder, cfg, result, trial)
    seed = SeedResult(cfg.train.seed, round(result.test_acc, 4), result.test_correct, result.test_total,
                      result.epochs_run, round(seconds, 1), run_log.run_id if run_log else None, folder)
    _write_result(folder, seed)
    interrupts.point("refit.saved")
    if run_log is not None:
        run_log.complete(result)
    print(f"refit seed {seed.seed}: test {seed.test_acc:.2f}% ({seed.test_correct}/{seed.test_total}) after "
          f"{seed.epochs} epochs on {len(loaded.train):,} images, {seconds:.0f} s", flush=True)
    return seed


def _save_final(folder: Path, cfg: ExperimentConfig, result: Result, trial: int) -> None:
    """The last epoch's weights as best.safetensors (what a refit delivers), from its checkpoint."""
    state = checkpoint.load_state(folder / LAST)
    net = build_model(cfg.model)
    net.load_state_dict(state["model"])
    meta = {"config": cfg.to_dict(), "epoch": result.epochs_run, "val_acc": None, "test_acc": result.test_acc,
            "params": result.params, "refit_of_trial": trial, "seed": cfg.train.seed}
    checkpoint.save_best(folder, net, meta)


def _write_result(folder: Path, r: SeedResult) -> None:
    body = {"seed": r.seed, "test_acc": r.test_acc, "test_correct": r.test_correct, "test_total": r.test_total,
            "epochs": r.epochs, "seconds": r.seconds, "run_id": r.run_id}
    tmp = folder / f".{RESULT}.tmp"
    tmp.write_text(json.dumps(body, indent=2) + "\n")
    tmp.replace(folder / RESULT)


def describe(refit: Refit) -> str:
    """What `mnistlab best --refit` prints: one line a seed, then mean ± std and min."""
    cfg = refit.config
    trained = images(data.image_counts(cfg.data)["train"], SIZES["train"] + SIZES["val"], "training images")
    lines = [f"refit of trial {refit.trial} on {trained} ({cfg.train.epochs} epochs each); the test set "
             f"({refit.seeds[0].test_total:,} images) read once per seed, after the last epoch:"]
    for s in refit.seeds:
        mark = "  (exported)" if s is refit.exported else ""
        lines.append(f"  seed {s.seed:>4}: test {s.test_acc:.2f}% ({s.test_correct}/{s.test_total})  "
                     f"{s.epochs} epochs  {s.seconds:.0f} s  run {s.run_id or '-'}{mark}")
    spread = f" ± {refit.std:.2f} (std over {len(refit.seeds)} seeds)" if len(refit.seeds) > 1 else " (1 seed)"
    lines.append(f"  test accuracy: mean {refit.mean:.2f}%{spread}, min {refit.min:.2f}%")
    return "\n".join(lines)


def check_seeds(n: int) -> None:
    if isinstance(n, bool) or not 1 <= n <= 100:
        raise UserError(f"--seeds {n}: expected 1 to 100")


def for_choice(choice: Choice, study: optuna.Study, max_params: int, n_seeds: int, artifacts: Path,
               tracker: Tracker | None = None, data_dir: Path | None = None, verbose: bool = False) -> Refit:
    """`mnistlab best --refit`: refit the picked configuration, log each seed under the study's
    parent run, keep the figures in the study's attributes (``refit:T``)."""
    from mnistlab.best.weights import trial_weights
    from mnistlab.tracking.recorder import StudyRecorder

    check_seeds(n_seeds)
    trial = choice.trial
    with tempfile.TemporaryDirectory() as scratch:  # the trial's checkpoint, if it has to come from MLflow
        cfg, _, _ = trial_weights(trial, tracker, Path(scratch))
    attrs = study.user_attrs
    recorder = None
    if tracker is not None and attrs.get(PARENT_ATTR) and attrs.get(EXPERIMENT_ATTR):
        recorder = StudyRecorder(tracker, study.study_name, attrs[EXPERIMENT_ATTR], attrs[PARENT_ATTR],
                                 Path(str(attrs.get(STUDY_FILE_ATTR, ""))), attrs.get(ID_ATTR))
    previous = interrupts.stop_on_signals()
    try:
        done = run(trial, cfg, n_seeds, max_params, artifacts, recorder, data_dir, verbose)
    finally:
        interrupts.restore(previous)
    study.set_user_attr(f"refit:{trial.number}", done.summary())
    return done
