"""The GPU path, measured in one run: throughput, precision, compile / CUDA graphs, real epochs, concurrent workers.

Prepared for a machine with one CUDA GPU (README, "The GPU path"); ``--device cpu`` with small sizes checks the
script itself on any machine. Three parts, each printed as it finishes and all written to ``--json``:

1. ``throughput``: benchmarks/throughput.py's two paths on eva4-s4 (12,400 params), alternated ``--repeats``
   times in one process: (a) the reference pipeline (torchvision MNIST + DataLoader, per-sample ToTensor and
   Normalize, fp32) and (b) mnistlab's trainer as configured (data on the device, bf16 autocast on CUDA), plus
   variants of (b): ``fp32`` (train.amp=false), ``compile`` (train.compile=true) and ``cudagraphs``
   (torch.compile mode="reduce-overhead", which replays CUDA graphs; CUDA only). Median images/s, seconds per
   50,000-image epoch and the ratio to (a).
2. ``epochs``: experiments/eva4-s4-fast.yaml trained for real by ``mnistlab.core.train.train`` on the full data
   (evaluation included), plain and compiled: seconds per epoch and the accuracies reached.
3. ``workers``: N processes (``--workers``, e.g. 1,2,4,8,16), each mnistlab's trainer with its own copy of the
   data on the one device, train together for ``--worker-seconds`` after a barrier; per-worker and total
   images/s for each N, and the largest N whose per-worker rate stays at least 90% of one worker alone.

    MNISTLAB_DATA_DIR=/path/to/cache python benchmarks/gpu.py --json gpu.json
    python benchmarks/gpu.py --device cpu --no-compile --batches 4 --warmup 1 --repeats 1 --epochs 1 \
        --limit-train 1024 --workers 1,2 --worker-seconds 2     # a quick check of the script without a GPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (benchmarks/throughput.py, beside this file)

from mnistlab.core import config  # noqa: E402
from mnistlab.core import data as mdata  # noqa: E402
from mnistlab.core.train import resolve_device, train  # noqa: E402

FAST = Path(__file__).resolve().parent.parent / "experiments" / "eva4-s4-fast.yaml"
SERVED = 0.9  # a worker count is "served" while each worker keeps this fraction of one worker's rate


class CudaGraphs(tp.Mnistlab):
    """(b) with the model compiled in mode="reduce-overhead": torch.compile captures and replays CUDA graphs."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.run.net = torch.compile(self.run.model, mode="reduce-overhead")


def part_throughput(args: argparse.Namespace, device: torch.device, data_dir: Path) -> dict[str, Any]:
    cuda = device.type == "cuda"
    with tempfile.TemporaryDirectory(prefix="mnist-tv-") as tmp:
        cfg = config.load(tp.CONFIG)
        paths: dict[str, Any] = {
            "reference": tp.Reference(cfg, tp.torchvision_dataset(Path(tmp), data_dir), device),
            "mnistlab": tp.Mnistlab(data_dir, device, args.warmup, args.batches),
        }
        if cuda:  # on the CPU autocast is off anyway, and CUDA graphs do not exist
            paths["mnistlab+fp32"] = tp.Mnistlab(data_dir, device, args.warmup, args.batches, ["train.amp=false"])
        if args.compile:
            paths["mnistlab+compile"] = tp.Mnistlab(data_dir, device, args.warmup, args.batches,
                                                    ["train.compile=true"])
        if cuda and args.compile:
            paths["mnistlab+cudagraphs"] = CudaGraphs(data_dir, device, args.warmup, args.batches)
        runs = tp.alternate(paths, args.repeats, args.warmup, args.batches)
    median = {name: statistics.median(v) for name, v in runs.items()}
    out = {"images_per_s": runs, "median_images_per_s": median,
           "seconds_per_epoch": {n: tp.EPOCH_IMAGES / v for n, v in median.items()},
           "ratio_to_reference": {n: v / median["reference"] for n, v in median.items()}}
    print("part 1, throughput (median):")
    for name, v in median.items():
        print(f"  {name:22s} {v:9.0f} images/s  {tp.EPOCH_IMAGES / v:6.2f} s/epoch  "
              f"{out['ratio_to_reference'][name]:5.1f} x reference", flush=True)
    return out


def part_epochs(args: argparse.Namespace, device: torch.device, data_dir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, compiled in (("plain", False), ("compile", True))[: 2 if args.compile else 1]:
        overrides = [f"train.device={device.type}", f"train.compile={str(compiled).lower()}"]
        if args.epochs:
            overrides.append(f"train.epochs={args.epochs}")
        if args.limit_train:
            overrides.append(f"data.limit_train={args.limit_train}")
        cfg = config.load(FAST, overrides)
        data = mdata.load(cfg.data, device, data_dir)
        start = time.perf_counter()
        result = train(cfg, data, verbose=False)
        wall = time.perf_counter() - start
        per_epoch = [round(m.epoch_seconds, 3) for m in result.history]
        out[name] = {"epochs": result.epochs_run, "seconds_per_epoch": per_epoch, "wall_s": wall,
                     "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
                     "test_acc": result.test_acc, "train_images": len(data.train)}
        later = per_epoch[1:] or per_epoch  # the first epoch of a compiled run pays for the compilation
        print(f"part 2, {cfg.name} {name}: {result.epochs_run} epochs of {len(data.train):,} images, "
              f"{per_epoch[0]:.2f} s first epoch, {statistics.median(later):.2f} s median after; "
              f"best val {result.best_val_acc:.2f}% (epoch {result.best_epoch}), test {result.test_acc:.2f}%; "
              f"{wall:.1f} s in all", flush=True)
    return out


def _worker(rank: int, device: str, data_dir: str, batches: int, seconds: float, threads: int,
            barrier: Any, results: Any) -> None:
    torch.set_num_threads(threads)
    path = tp.Mnistlab(Path(data_dir), torch.device(device), warmup=batches, batches=batches)
    path.measure(batches, batches)  # warm-up: kernels chosen, allocator primed
    barrier.wait()
    images, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        path.run.train_epoch(show=False)
        images += batches * tp.BATCH
    tp.sync(path.device)
    results.put((rank, images / (time.perf_counter() - start)))


def part_workers(args: argparse.Namespace, device: torch.device, data_dir: Path) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    rows: dict[int, dict[str, Any]] = {}
    for n in args.workers:
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_worker, args=(r, str(device), str(data_dir), args.worker_batches,
                                                    args.worker_seconds, args.worker_threads, barrier, results))
                 for r in range(n)]
        for p in procs:
            p.start()
        rates: list[float] = []
        while len(rates) < n:
            try:
                rates.append(results.get(timeout=5)[1])
            except queue.Empty:
                if any(p.exitcode for p in procs):  # a dead worker would leave the others at the barrier
                    for p in procs:
                        p.kill()
                    raise RuntimeError(f"a worker of {n} failed (exit codes {[p.exitcode for p in procs]})") from None
        for p in procs:
            p.join()
        rows[n] = {"per_worker_images_per_s": statistics.median(rates), "total_images_per_s": sum(rates),
                   "rates": rates}
    one = rows[min(rows)]["per_worker_images_per_s"]
    served = max((n for n, row in rows.items() if row["per_worker_images_per_s"] >= SERVED * one), default=0)
    print(f"part 3, concurrent workers on one {device.type} device:")
    for n, row in rows.items():
        row["per_worker_vs_one"] = row["per_worker_images_per_s"] / one
        print(f"  {n:3d} workers: {row['per_worker_images_per_s']:9.0f} images/s each "
              f"({row['per_worker_vs_one']:.2f} x one alone), {row['total_images_per_s']:9.0f} in all", flush=True)
    print(f"  served at >= {SERVED:.0%} of one worker's rate: up to {served} workers", flush=True)
    return {"rows": rows, "served": served, "served_fraction": SERVED}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--data-dir", type=Path, default=None, help="mnistlab's cache (default: default_data_dir())")
    p.add_argument("--parts", default="throughput,epochs,workers", help="comma-separated parts to run")
    p.add_argument("--batches", type=int, default=200, help="part 1: timed batches of 128 per measurement")
    p.add_argument("--warmup", type=int, default=20, help="part 1: untimed batches before each measurement")
    p.add_argument("--repeats", type=int, default=3, help="part 1: alternations of the paths")
    p.add_argument("--epochs", type=int, default=0, help="part 2: epochs (0: the config's)")
    p.add_argument("--limit-train", type=int, default=0, help="part 2: train images (0: all 50,000)")
    p.add_argument("--workers", type=lambda s: sorted({int(v) for v in s.split(",")}), default=[1, 2, 4, 8, 16],
                   help="part 3: worker counts, comma-separated")
    p.add_argument("--worker-batches", type=int, default=50, help="part 3: batches of 128 in a worker's split")
    p.add_argument("--worker-seconds", type=float, default=15.0, help="part 3: seconds each worker trains")
    p.add_argument("--worker-threads", type=int, default=1, help="part 3: torch threads per worker")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the torch.compile and CUDA-graph variants (they compile for a minute or more)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if unknown := set(parts) - {"throughput", "epochs", "workers"}:
        p.error(f"unknown part {sorted(unknown)[0]!r}")
    if not 1 <= args.batches <= tp.EPOCH_IMAGES // tp.BATCH or args.warmup > args.batches or args.repeats < 1:
        p.error(f"need 1 <= --batches <= {tp.EPOCH_IMAGES // tp.BATCH}, --warmup <= --batches, --repeats >= 1")
    if not args.workers or min(args.workers) < 1:
        p.error("--workers: positive counts, e.g. 1,2,4,8")
    device = resolve_device(args.device)
    data_dir = args.data_dir or mdata.default_data_dir()
    mdata.cached_arrays(data_dir)  # build the cache once, before any worker looks for it
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, device {device} ({name}), {mp.cpu_count()} CPU cores", flush=True)
    figures: dict[str, Any] = {"torch": torch.__version__, "device": str(device), "device_name": name,
                               "cpu_cores": mp.cpu_count(), "argv": sys.argv[1:]}
    runners = {"throughput": part_throughput, "epochs": part_epochs, "workers": part_workers}
    for part in parts:
        figures[part] = runners[part](args, device, data_dir)
        if args.json:  # written after every part, so a run cut short keeps what it measured
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
