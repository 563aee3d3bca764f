"""Real MNIST, offline: one uint8 cache on disk, normalised tensors in memory on the device.

Sources: MNIST's four original IDX files, shipped in this package (``mnistlab/core/mnist/``, each
checked against its published SHA-256), or a folder in torchvision's MNIST layout given with
``mnistlab data prepare --source``. The cache keeps the classic split: train = first 50,000
training images, validation = last 10,000, test = the official 10,000.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mnistlab.core.config import SIZES, DataConfig
from mnistlab.util.errors import UserError
from mnistlab.util.files import sha256
from mnistlab.util.jsonfile import read_json

MEAN, STD = 0.1307, 0.3081
CACHE_FILE = "mnist-uint8.npz"
SPLITS = ("train", "val", "test")


def default_data_dir() -> Path:
    """``$MNISTLAB_DATA_DIR``, else ``$XDG_CACHE_HOME/mnistlab``, else ``~/.cache/mnistlab``."""
    if os.environ.get("MNISTLAB_DATA_DIR"):
        return Path(os.environ["MNISTLAB_DATA_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mnistlab"


PACKAGED = Path(__file__).parent / "mnist"  # the IDX files this package ships (README.md there)
IDX_SHA256 = {  # the published digests of the decompressed files
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
_IDX_SIZE = {"train-images-idx3-ubyte": 47_040_016, "train-labels-idx1-ubyte": 60_008,
             "t10k-images-idx3-ubyte": 7_840_016, "t10k-labels-idx1-ubyte": 10_008}


def _idx(folder: Path, name: str) -> np.ndarray:
    """One gzipped IDX file, checked against its published digest, as uint8 images or labels."""
    path = folder / f"{name}.gz"
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read(_IDX_SIZE[name] + 1)  # bounded: a file larger than the original is refused
    except (OSError, EOFError) as exc:
        raise UserError(f"{path}: unreadable ({exc})") from None
    if len(raw) != _IDX_SIZE[name] or hashlib.sha256(raw).hexdigest() != IDX_SHA256[name]:
        raise UserError(f"{path}: not the original MNIST file (size or SHA-256 differs); reinstall mnistlab")
    if name.endswith("idx3-ubyte"):
        return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    return np.frombuffer(raw, dtype=np.uint8, offset=8).astype(np.int64)


def read_packaged(folder: Path = PACKAGED) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The shipped IDX files, split the classic way."""
    tx, ty = _idx(folder, "train-images-idx3-ubyte"), _idx(folder, "train-labels-idx1-ubyte")
    return {
        "train": (tx[:50_000], ty[:50_000]),
        "val": (tx[50_000:], ty[50_000:]),
        "test": (_idx(folder, "t10k-images-idx3-ubyte"), _idx(folder, "t10k-labels-idx1-ubyte")),
    }


def read_torchvision(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A folder in torchvision's layout (``root/MNIST/raw``), split the classic way."""
    from torchvision.datasets import MNIST

    try:
        train = MNIST(str(root), train=True, download=False)
        test = MNIST(str(root), train=False, download=False)
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
    arrays = read_torchvision(source) if source is not None else read_packaged()
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


def image_counts(cfg: DataConfig) -> dict[str, int | None]:
    """How many images a config trains on, validates on (None: full-train has no validation split)
    and tests on, as ``load`` selects them."""
    pool = SIZES["train"] + (SIZES["val"] if cfg.full_train else 0)
    held = min(cfg.limit_eval or SIZES["test"], SIZES["test"])
    return {"train": min(cfg.limit_train or pool, pool), "val": None if cfg.full_train else held, "test": held}


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
