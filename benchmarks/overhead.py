"""What tracking and storage cost a trial: the same training with everything on and with nothing.

Alternates, in one process, (a) the bare trainer (`train()` with no checkpoints, no storage, no
MLflow) and (b) a full trial as `mnistlab study run` makes it (Optuna SQLite storage with
heartbeats, per-epoch checkpoints, an MLflow run on a local store with per-epoch metrics,
artifacts and checkpoints uploaded), on the same config and data. Prints the median wall time
of each and the overhead (b - a) / a.

Training time itself varies by several percent between repeats on a shared machine, more than
the overhead, so a second figure leaves it out: each run's time outside its epochs (wall time
minus the trainer's own per-epoch seconds, which cover training and validation), full minus
bare, over the bare wall time. Everything tracking and storage do happens outside the epochs
(checkpoints, metrics, heartbeats, the run's creation and uploads, the trial's bookkeeping).

    python benchmarks/overhead.py [--repeats 3] [--epochs 2] [--limit-train 10000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from mnistlab.core.config import get_path
from mnistlab.core.train import train
from mnistlab.search import runner, study_file
from mnistlab.search.objective import Objective
from mnistlab.search.storage import create, open_storage
from mnistlab.tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=10_000)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = study_file.load_study(ROOT / "studies" / "smoke.yaml")
    extra = {"train.epochs": args.epochs, "data.limit_train": args.limit_train, "data.limit_eval": 10_000}
    trial_cfg = cfg.trial_config({}, extra)
    bare, full, added = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        storage = open_storage(f"sqlite:///{root / 'optuna.db'}", heartbeat=30)
        tracker = Tracker(f"sqlite:///{root / 'mlflow.db'}")
        s = create(cfg, storage)
        recorder = runner.recorder_for(s, cfg, tracker, f"sqlite:///{root / 'optuna.db'}")
        objective = Objective(cfg, extra=extra, artifacts=root / "artifacts", recorder=recorder, verbose=False)
        mnist = objective.data_for(trial_cfg)  # loaded once: the same tensors for both
        base = {p.name: get_path(trial_cfg, p.name) for p in cfg.space}
        train(trial_cfg, mnist, verbose=False)  # warm-up: allocator, oneDNN kernels
        for i in range(args.repeats):
            start = time.perf_counter()
            result = train(trial_cfg, mnist, verbose=False)
            bare.append(time.perf_counter() - start)
            bare_outside = bare[-1] - sum(m.epoch_seconds for m in result.history)
            s.enqueue_trial(base)
            start = time.perf_counter()
            s.optimize(objective, n_trials=1)
            full.append(time.perf_counter() - start)
            ran = max((t for t in s.trials if t.datetime_complete), key=lambda t: t.datetime_complete)
            attrs = ran.user_attrs  # the trial optimize just ran (the queue may hold another)
            full_outside = full[-1] - attrs["seconds_per_epoch"] * attrs["epochs_run"]
            added.append((full_outside - bare_outside) / bare[-1])
            print(f"repeat {i + 1}: bare {bare[-1]:.2f} s ({bare_outside:.2f} s outside epochs), "
                  f"full {full[-1]:.2f} s ({full_outside:.2f} s outside epochs)", flush=True)
    a, b = statistics.median(bare), statistics.median(full)
    what = f"{args.epochs} epochs on {args.limit_train:,} images"
    print(f"median bare trainer: {a:.2f} s; full trial (storage + checkpoints + MLflow): {b:.2f} s")
    print(f"overhead, wall time: {100 * (b - a) / a:+.1f}% of the trial ({what})")
    print(f"overhead, time outside the epochs: {100 * statistics.median(added):+.1f}% of the trial "
          f"(repeats: {', '.join(f'{100 * v:+.1f}%' for v in added)})")


if __name__ == "__main__":
    main()
