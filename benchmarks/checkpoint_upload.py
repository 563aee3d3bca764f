"""What sending a trial's checkpoint to MLflow costs per epoch, against the epoch it follows.

Trains the reference network (`experiments/eva4-s4.yaml`, 12,400 params) for two epochs on the
first 50,000 training images with its per-epoch checkpoints, starts a real `mlflow server` (SQLite
backend, proxied artifacts) on a free loopback port, and sends the checkpoint files the way a
trial does after each epoch (`RunLog.share_checkpoint`: best weights, prev.pt, last.pt and their
checksums) ``--repeats`` times. Prints the trainer's seconds per epoch, the median milliseconds
of one send, and the send as a share of the epoch.

    python benchmarks/checkpoint_upload.py [--repeats 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from mnistlab.core import config, data
from mnistlab.core.train import train
from mnistlab.tracking.recorder import RunLog
from mnistlab.tracking.tracker import Tracker

ROOT = Path(__file__).resolve().parent.parent


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                             f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("mlflow server did not start in 120 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config.load(ROOT / "experiments" / "eva4-s4.yaml", ["train.epochs=2", "data.full_train=false"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = root / "checkpoint"
        result = train(cfg, data.load(cfg.data), checkpoint_dir=ckpt, verbose=False)
        epoch_s = result.seconds_per_epoch
        server, url = start_server(root)
        try:
            tracker = Tracker(url)
            experiment = tracker.client.create_experiment("checkpoint-upload")
            log = RunLog(tracker, tracker.start_run(experiment, "bench", {}), ckpt, {})
            sizes = {p.name: p.stat().st_size for p in sorted(ckpt.iterdir())}
            times = []
            for _ in range(args.repeats):
                log.shared.clear()  # every file counts as changed, as after an epoch that improved
                start = time.perf_counter()
                log.share_checkpoint()
                times.append(time.perf_counter() - start)
            assert not log.share_failed
        finally:
            server.terminate()
            server.wait()
    send_ms = 1000 * statistics.median(times)
    print(f"reference network, {result.history[-1].epoch} epochs on 50,000 images, {args.threads} threads")
    print("files sent each epoch: " + ", ".join(f"{n} {b / 1024:.1f} KiB" for n, b in sizes.items()
                                                   if not n.startswith(".")))
    print(f"epoch (training + validation): {epoch_s:.1f} s")
    print(f"checkpoint send to a local mlflow server: median {send_ms:.0f} ms "
          f"(min {1000 * min(times):.0f}, max {1000 * max(times):.0f}, {args.repeats} sends)")
    print(f"share of an epoch: {100 * send_ms / 1000 / epoch_s:.2f}%")


if __name__ == "__main__":
    main()
