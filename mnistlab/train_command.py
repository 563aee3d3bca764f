"""One experiment run end to end (`mnistlab train`): config, data, training, the run's files."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mnistlab.core import config as config_mod
from mnistlab.core import data as data_mod
from mnistlab.core.config import ExperimentConfig
from mnistlab.core.metrics import EpochMetrics, Result
from mnistlab.core.model import count_params, summary
from mnistlab.core.tracked import tracked_train
from mnistlab.core.train import Diverged, resolve_device
from mnistlab.tracking.recorder import RunLog
from mnistlab.tracking.tracker import Tracker
from mnistlab.tracking.uri import check_reachable, mask
from mnistlab.util.errors import UserError
from mnistlab.util.keys import OUTPUT_TAG, RUN_KIND_TAG

METRIC_FIELDS = [f for f in EpochMetrics.__dataclass_fields__]


def write_metrics_csv(path: Path, history: list[EpochMetrics]) -> None:
    """Per-epoch metrics, one row an epoch."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for m in history:
            writer.writerow(asdict(m))


def result_summary(cfg: ExperimentConfig, result: Result, wall_seconds: float) -> dict[str, Any]:
    """The figures a user reads after a run (also written as summary.json)."""
    return {
        "name": cfg.name,
        "params": result.params,
        "device": result.device,
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch if not cfg.data.full_train else None,  # no validation split: none
        "best_val_acc": result.best_val_acc if not cfg.data.full_train else None,
        "images": data_mod.image_counts(cfg.data),  # train / val (null in full-train mode) / test
        "test_acc": result.test_acc,
        "test_correct": result.test_correct,
        "test_total": result.test_total,
        "seconds_per_epoch": round(result.seconds_per_epoch, 3),
        "wall_seconds": round(wall_seconds, 1),
    }


def run_experiment(
    cfg: ExperimentConfig,
    output: Path,
    data_dir: Path | None = None,
    tracker: Tracker | None = None,
    source: Path | None = None,
    resume: bool = False,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train one experiment, writing config.yaml, metrics.csv, summary.json and checkpoints.

    With a tracker, the run is also one MLflow run in the experiment named after the config.
    A run folder that holds anything is continued with ``resume`` and otherwise refused, never
    written over.
    """
    if not resume and output.is_dir() and any(output.iterdir()):
        raise UserError(f"run folder {output}: exists and is not empty (use --resume to continue that run, or "
                        "choose another --output)")
    if resume and output.is_dir() and any(output.iterdir()) and not (output / "config.yaml").is_file():
        raise UserError(f"run folder {output}: holds files but no config.yaml, so it is no run folder of "
                        "mnistlab train; --resume writes only into those")
    device = resolve_device(cfg.train.device)  # a device this machine lacks: refused before the run folder exists
    if tracker is not None:
        check_reachable(tracker.uri)
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(config_mod.dump_yaml(cfg))
    except OSError as exc:
        raise UserError(f"{output}: cannot write the run folder ({exc.strerror})") from None
    data = data_mod.load(cfg.data, device, data_dir)
    if verbose:
        print(summary(cfg.model))
    ckpt = output / "checkpoints"
    run = None
    if tracker is not None:
        run = RunLog.start(tracker, tracker.experiment(cfg.name), output.name, cfg, count_params(cfg.model),
                           str(device), ckpt, {RUN_KIND_TAG: "train", OUTPUT_TAG: str(output)},
                           files={"experiment": source} if source else None)
        if verbose:
            print(f"MLflow run {run.run_id} in experiment {cfg.name!r} at {mask(tracker.uri)}")
    start = time.perf_counter()
    try:
        result = tracked_train(cfg, data, run, ckpt, resume=resume, verbose=verbose)
    except BaseException as exc:
        if isinstance(exc, Diverged):
            raise UserError(f"{output}: {exc}") from None
        if isinstance(exc, OSError):  # a full disk: the checkpoint being written is a temporary file, removed
            raise UserError(f"{output}: cannot write the run's files ({exc.strerror or exc}); the checkpoints of "
                            f"finished epochs are intact: free space, then run again with --resume") from None
        raise
    wall = time.perf_counter() - start
    if run is not None:
        run.complete(result)
    figures = result_summary(cfg, result, wall)
    try:
        write_metrics_csv(output / "metrics.csv", result.history)
        (output / "summary.json").write_text(json.dumps(figures, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"{output}: trained, but cannot write metrics.csv and summary.json ({exc.strerror or exc}); "
                        "the checkpoints are intact") from None
    return figures


def train_command(cfg: ExperimentConfig, source: Path, output: Path | None = None, data_dir: Path | None = None,
                  tracking_uri: str | None = None, track: bool = True, resume: bool = False) -> None:
    """`mnistlab train`: run the experiment read from ``source`` into ``output`` (default
    runs/NAME-TIME), tracked unless ``track`` is off, and print its summary line."""
    out = output or Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = Tracker(tracking_uri) if track else None
    figures = run_experiment(cfg, out, data_dir, tracker, source=source, resume=resume)
    print(summary_line(cfg, figures, out))


def summary_line(cfg: ExperimentConfig, figures: dict[str, Any], out: Path) -> str:
    """`mnistlab train`'s last line: the images each figure counts. A full-train run has no
    validation split: its one held-out figure is the test set's, of the last epoch."""
    counts = data_mod.image_counts(cfg.data)
    test = f"test {figures['test_acc']:.2f}% on {figures['test_total']:,} images"
    if counts["val"] is None:
        held = f"trained on {counts['train']:,} images (no validation split) | {test}, last epoch"
    else:
        held = (f"trained on {counts['train']:,} images | best validation {figures['best_val_acc']:.2f}% on "
                f"{counts['val']:,} images at epoch {figures['best_epoch']} | {test}, best epoch's weights")
    return (f"params {figures['params']:,} | {held} | {figures['seconds_per_epoch']:.1f} s/epoch | "
            f"run folder {out}")
