"""What rejecting an over-budget config costs, from sampling to the recorded PRUNED trial.

Runs a real study on a temporary SQLite storage with heartbeats, as `mnistlab study run` does,
whose space is entirely over budget, so every trial is rejected by the budget check; the same
number of trials of an empty objective in the same process is the reference (the storage's own
cost of a trial). Prints milliseconds per trial for both, their ratio, and the cost of the
parameter count alone.

    python benchmarks/budget.py [--trials 50] [--storage postgresql://USER@HOST/EMPTY_DB]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from mnistlab.core.model import count_params
from mnistlab.search import study_file
from mnistlab.search.objective import Objective
from mnistlab.search.storage import create, load, open_storage

ROOT = Path(__file__).resolve().parent.parent


def timed_trials(s: optuna.Study, objective: object, n: int) -> list[float]:
    """Wall milliseconds of each trial, start of one to start of the next."""
    marks: list[float] = []
    s.optimize(objective, n_trials=n, callbacks=[lambda *_: marks.append(time.perf_counter())])
    return [1000 * (b - a) for a, b in zip(marks, marks[1:], strict=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--storage", help="an empty database URL to use instead of a temporary SQLite file")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "over.yaml"
        path.write_text(f"name: over\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\nmax_params: 13000\n"
                        "enqueue_base: false\nsampler: {name: tpe, seed: 0, n_startup_trials: 10}\nspace:\n"
                        "  model.widths.1: {type: int, low: 40, high: 64}\n"
                        "  model.dropout: {type: float, low: 0.0, high: 0.2}\n")
        cfg = study_file.load_study(path)
        storage = open_storage(args.storage or f"sqlite:///{tmp}/o.db", heartbeat=30)
        rejected = timed_trials(create(cfg, storage), Objective(cfg, n_trials=10**6), args.trials)
        empty = create(dataclasses.replace(cfg, name="empty"), storage)
        reference = timed_trials(empty, lambda t: t.suggest_int("model.widths.1", 40, 64) * 0.0, args.trials)
        states = {t.state.name for t in load("over", storage).trials}
    base = study_file.load_study(ROOT / "studies" / "under20k.yaml").base.model
    start = time.perf_counter()
    for _ in range(10_000):
        count_params(base)
    count_us = 100 * (time.perf_counter() - start)
    print(f"trials: {args.trials} (states of the rejected ones: {', '.join(sorted(states))})")
    print(f"over-budget trial, sample -> count -> record PRUNED: median {statistics.median(rejected):.1f} ms "
          f"(p90 {sorted(rejected)[int(0.9 * len(rejected))]:.1f} ms)")
    print(f"empty trial on the same storage (reference):       median {statistics.median(reference):.1f} ms")
    print(f"ratio: {statistics.median(rejected) / statistics.median(reference):.2f}x the storage's own cost")
    print(f"exact parameter count alone: {count_us:.1f} us")


if __name__ == "__main__":
    main()
