"""Training throughput of the reference network (eva4-s4, 12,400 params): the 2019 pipeline vs mnistlab's.

(a) ``reference``: torchvision ``MNIST`` + ``DataLoader(batch_size=128, shuffle=True)`` with per-sample
    ``ToTensor()`` + ``Normalize`` (``num_workers=1, pin_memory=True`` on CUDA, as the original), SGD(0.01, 0.9)
    and the plain ``zero_grad / model / nll_loss / backward / step`` loop. MNIST cannot be downloaded here, so
    the 60,000 training images of mnistlab's cache (train + val) are written as torchvision's raw IDX files
    into a temporary folder.
(b) ``mnistlab``: the trainer's own ``_Run(...).train_epoch()`` on ``--batches`` x 128 images held normalised
    on the device (``data.limit_train``), batches from ``mnistlab.core.data.batches``, configured as the YAML says
    (``train.channels_last`` and ``train.compile`` included; bf16 autocast on CUDA).

Each path trains ``--batches`` batches after ``--warmup`` untimed ones; the paths alternate a, b, a, b, ...
``--repeats`` times in one process, so background load hits both alike. Reported: median images/s per path and
``ratio = b / a`` (on CUDA also seconds per 50,000-image epoch). Variants of (b) join the alternation and are
compared with plain (b): ``--channels-last`` (the other ``train.channels_last``), ``--compile`` (``train.compile``),
``--no-mkldnn`` (``torch.backends.mkldnn`` off).

    MNISTLAB_DATA_DIR=/tmp/mnl-data python benchmarks/throughput.py [--device cpu] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from mnistlab.core import config
from mnistlab.core import data as mdata
from mnistlab.core.model import build_model, count_params
from mnistlab.core.train import _Run, resolve_device

CONFIG = Path(__file__).resolve().parent.parent / "experiments" / "eva4-s4.yaml"
BATCH = 128
EPOCH_IMAGES = 50_000


def write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed IDX file: big-endian magic (0x0803 images, 0x0801 labels), dims, uint8 data."""
    head = struct.pack(f">I{array.ndim}I", 0x0800 | array.ndim, *array.shape)
    path.write_bytes(head + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def torchvision_dataset(root: Path, data_dir: Path) -> datasets.MNIST:
    """torchvision's MNIST (train=True, 60,000 images) read from IDX files made from mnistlab's cache."""
    arrays = mdata.load_arrays(data_dir)
    train_x = np.concatenate([arrays["train"][0], arrays["val"][0]])
    train_y = np.concatenate([arrays["train"][1], arrays["val"][1]])
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, x, y in (("train", train_x, train_y), ("t10k", *arrays["test"])):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    ds = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    if not (np.array_equal(ds.data.numpy(), train_x) and np.array_equal(ds.targets.numpy(), train_y)):
        raise RuntimeError("torchvision read back different images or labels than were written")
    return ds


def sync(device: torch.device) -> None:
    if device.type == "cuda":  # CUDA runs asynchronously: wait before reading the clock
        torch.cuda.synchronize()


class Reference:
    """(a): the 2019 exercise's DataLoader and loop."""

    def __init__(self, cfg: config.ExperimentConfig, ds: datasets.MNIST, device: torch.device) -> None:
        kwargs: dict[str, Any] = {"num_workers": 1, "pin_memory": True} if device.type == "cuda" else {}
        self.loader = DataLoader(ds, batch_size=BATCH, shuffle=True, **kwargs)
        torch.manual_seed(cfg.train.seed)
        self.device = device
        self.model = build_model(cfg.model).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.batches = itertools.chain.from_iterable(itertools.repeat(self.loader))  # a new epoch when one ends

    def step(self) -> None:
        x, y = next(self.batches)
        x, y = x.to(self.device), y.to(self.device)
        self.opt.zero_grad()
        out = self.model(x)
        loss = F.nll_loss(out, y)
        loss.backward()
        self.opt.step()

    def measure(self, warmup: int, batches: int) -> float:
        self.model.train()
        for _ in range(warmup):
            self.step()
        sync(self.device)
        start = time.perf_counter()
        for _ in range(batches):
            self.step()
        sync(self.device)
        return batches * BATCH / (time.perf_counter() - start)


class Mnistlab:
    """(b): mnistlab's trainer epoch over a split of exactly ``batches`` batches, config overrides applied.

    The inputs need no memory-format change: with one channel, NCHW and NHWC strides coincide.
    """

    def __init__(self, data_dir: Path, device: torch.device, warmup: int, batches: int,
                 overrides: Sequence[str] = (), mkldnn: bool = True) -> None:
        cfg = config.load(CONFIG, [f"data.limit_train={batches * BATCH}", "data.limit_eval=1", *overrides])
        data = mdata.load(cfg.data, device, data_dir)
        self.run = _Run(cfg, data, device)
        n = warmup * BATCH
        self.full, self.warm = data, dataclasses.replace(data, train=mdata.Split(data.train.x[:n], data.train.y[:n]))
        self.device, self.mkldnn = device, mkldnn

    def measure(self, warmup: int, batches: int) -> float:
        before, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, self.mkldnn
        try:
            if warmup:
                self.run.data = self.warm
                self.run.train_epoch(show=False)
            self.run.data = self.full
            sync(self.device)
            start = time.perf_counter()
            self.run.train_epoch(show=False)
            sync(self.device)
        finally:
            torch.backends.mkldnn.enabled = before
        return batches * BATCH / (time.perf_counter() - start)


def alternate(paths: dict[str, Any], repeats: int, warmup: int, batches: int) -> dict[str, list[float]]:
    """images/s of each path, measured in turn ``repeats`` times, so background load hits all alike.

    The first measurement of a compiled path pays for the compilation in its warm-up, not its timing.
    """
    runs: dict[str, list[float]] = {name: [] for name in paths}
    width = max(map(len, paths))
    for r in range(repeats):
        for name, path in paths.items():
            start = time.perf_counter()
            runs[name].append(path.measure(warmup, batches))
            print(f"  repeat {r + 1}  {name:{width}s} {runs[name][-1]:9.0f} images/s"
                  f"  ({time.perf_counter() - start:.1f} s with warm-up)", flush=True)
    return runs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; 0: torch's default")
    p.add_argument("--data-dir", type=Path, default=None, help="mnistlab's cache (default: default_data_dir())")
    p.add_argument("--batches", type=int, default=100, help="timed batches of 128 per measurement")
    p.add_argument("--warmup", type=int, default=10, help="untimed batches before each measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--channels-last", action="store_true", help="also time (b) with train.channels_last flipped")
    p.add_argument("--compile", action="store_true", help="also time (b) with train.compile=true")
    p.add_argument("--no-mkldnn", action="store_true", help="also time (b) with torch.backends.mkldnn disabled")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    args = p.parse_args(argv)
    if not 1 <= args.batches <= EPOCH_IMAGES // BATCH or args.warmup > args.batches or args.repeats < 1:
        p.error(f"need 1 <= --batches <= {EPOCH_IMAGES // BATCH}, --warmup <= --batches, --repeats >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data_dir = args.data_dir or mdata.default_data_dir()
    cfg = config.load(CONFIG)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", threads {torch.get_num_threads()}, model {cfg.name} ({count_params(cfg.model):,} params)")
    print(f"(b) as configured: train.channels_last={cfg.train.channels_last}, train.compile={cfg.train.compile}")
    print(f"{args.repeats} x alternating, {args.batches} timed batches of {BATCH} after {args.warmup} warm-up")

    with tempfile.TemporaryDirectory(prefix="mnist-tv-") as tmp:
        paths: dict[str, Any] = {"reference": Reference(cfg, torchvision_dataset(Path(tmp), data_dir), device),
                                 "mnistlab": Mnistlab(data_dir, device, args.warmup, args.batches)}
        flip = "contiguous" if cfg.train.channels_last else "channels_last"
        for name, wanted, kwargs in [
            (flip, args.channels_last, {"overrides": [f"train.channels_last={not cfg.train.channels_last}"]}),
            ("compile", args.compile and not cfg.train.compile, {"overrides": ["train.compile=true"]}),
            ("no_mkldnn", args.no_mkldnn, {"mkldnn": False}),
        ]:
            if wanted:
                paths[f"mnistlab+{name}"] = Mnistlab(data_dir, device, args.warmup, args.batches, **kwargs)
        runs = alternate(paths, args.repeats, args.warmup, args.batches)

    median = {name: statistics.median(v) for name, v in runs.items()}
    ratio = median["mnistlab"] / median["reference"]
    print("median images/s:")
    for name, v in median.items():
        extra = f"  = {EPOCH_IMAGES / v:.2f} s per 50,000-image epoch" if device.type == "cuda" else ""
        print(f"  {name:30s} {v:9.0f}{extra}")
    print(f"ratio = mnistlab / reference = {ratio:.2f}")
    for name in [n for n in median if n.startswith("mnistlab+")]:
        gain = median[name] / median["mnistlab"]
        verdict = "helped" if gain > 1.02 else "hurt" if gain < 0.98 else "no clear difference"
        print(f"{name.removeprefix('mnistlab+')}: {gain:.2f} x plain mnistlab ({verdict})")
    if args.channels_last:
        gain = (median["mnistlab"] / median["mnistlab+contiguous"] if cfg.train.channels_last
                else median["mnistlab+channels_last"] / median["mnistlab"])
        print(f"channels_last {'helped' if gain > 1 else 'did not help'}: {gain:.2f} x contiguous")
    figures = {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
               "batch_size": BATCH, "batches": args.batches, "warmup": args.warmup, "repeats": args.repeats,
               "images_per_s": runs, "median_images_per_s": median, "ratio": ratio}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return figures


if __name__ == "__main__":
    main()
