"""Trials per hour with 1 and 2 workers on one storage, and the scaling efficiency.

Runs `mnistlab study run` as a user does, on a fresh SQLite storage and MLflow store for each
setting, with a fixed number of trained trials of the reference network family (a random
sampler, no pruning, so every trial does the same work). Threads per worker are the machine's
cores divided by the workers, as `--workers N` sets them. Prints wall time, trials per hour and
efficiency = (trials/hour with N workers) / (N x trials/hour with 1 worker).

    python benchmarks/scaling.py [--trials 8] [--workers 1 2] [--limit-train 5000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = """name: scaling
base: {base}
max_params: 20000
objectives: [val_acc]
sampler: {{name: random, seed: 1}}
pruner: none
enqueue_base: false
space:
  model.dropout: {{type: float, low: 0.0, high: 0.1}}
  train.lr: {{type: float, low: 0.02, high: 0.2, log: true}}
"""


def run(workers: int, args: argparse.Namespace, folder: Path) -> float:
    study_file = folder / "scaling.yaml"
    study_file.write_text(STUDY.format(base=ROOT / "experiments" / "eva4-s4.yaml"))
    cmd = [sys.executable, "-m", "mnistlab", "study", "run", str(study_file), "--n-trials", str(args.trials),
           "--workers", str(workers), "--epochs", str(args.epochs), "--limit-train", str(args.limit_train),
           "--limit-eval", str(args.limit_eval), "--storage", f"sqlite:///{folder / 'optuna.db'}",
           "--tracking-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts", str(folder / "artifacts")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{workers} worker(s) failed:\n{proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--limit-train", type=int, default=5000)
    parser.add_argument("--limit-eval", type=int, default=2000)
    args = parser.parse_args()
    env_data = os.environ.get("MNISTLAB_DATA_DIR", "default cache")
    print(f"{args.trials} trained trials each, {args.epochs} epoch(s) on {args.limit_train:,} images, "
          f"{os.cpu_count()} cores, data {env_data}")
    rates = {}
    for n in args.workers:
        with tempfile.TemporaryDirectory() as tmp:
            seconds = run(n, args, Path(tmp))
        rates[n] = args.trials / seconds * 3600
        print(f"{n} worker(s), {max(1, (os.cpu_count() or 1) // n)} thread(s) each: {seconds:7.1f} s  "
              f"{rates[n]:7.1f} trials/hour", flush=True)
    base = rates.get(1)
    if base:
        for n, rate in rates.items():
            if n > 1:
                print(f"efficiency with {n} workers: {rate / (n * base):.2f} (speed-up {rate / base:.2f}x)")


if __name__ == "__main__":
    main()
