"""Real MNIST from the IDX files mnistlab ships: exact pixels, the classic split, refused alterations."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab.core import data
from mnistlab.core.config import DataConfig
from mnistlab.util.errors import UserError

# Per-digit counts of the official files: first 50,000 / last 10,000 training images, and test.
COUNTS = {
    "train": [4932, 5678, 4968, 5101, 4859, 4506, 4951, 5175, 4842, 4988],
    "val": [991, 1064, 990, 1030, 983, 915, 967, 1090, 1009, 961],
    "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009],
}


def test_cache_holds_the_classic_split_as_exact_uint8(data_dir: Path) -> None:
    arrays = data.load_arrays(data_dir)
    for split, (x, y) in arrays.items():
        assert x.dtype == np.uint8 and x.shape == (data.SIZES[split], 28, 28)
        assert y.dtype == np.int64
        assert data.class_counts(y) == COUNTS[split]
    # The cache gives back the shipped IDX bytes exactly, in the files' order.
    with gzip.open(data.PACKAGED / "train-images-idx3-ubyte.gz", "rb") as fh:
        raw = fh.read()
    assert raw[:4] == bytes([0, 0, 8, 3]) and len(raw) == 16 + 60_000 * 784
    assert arrays["train"][0].tobytes() + arrays["val"][0].tobytes() == raw[16:]
    assert arrays["train"][1][:5].tolist() == [5, 0, 4, 1, 9] and arrays["test"][1][:5].tolist() == [7, 2, 1, 0, 4]


def test_normalised_tensors_and_limits(data_dir: Path) -> None:
    full = data.load(DataConfig(), "cpu", data_dir)
    assert full.train.x.shape == (50_000, 1, 28, 28) and full.train.x.dtype == torch.float32
    both = torch.cat([full.train.x, full.val.x])
    assert abs(both.mean().item()) < 1e-3 and abs(both.std().item() - 1) < 1e-3  # 0.1307 / 0.3081
    small = data.load(DataConfig(limit_train=300, limit_eval=200, full_train=True), "cpu", data_dir)
    assert (len(small.train), len(small.test), small.val) == (300, 200, None)
    assert len(data.load(DataConfig(full_train=True), "cpu", data_dir).train) == 60_000


def test_batches_follow_a_seeded_permutation(data_dir: Path) -> None:
    split = data.load(DataConfig(limit_train=1000, limit_eval=10), "cpu", data_dir).train
    cfg = DataConfig(augment=True)

    def labels(seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.cat([x.flatten(), y.float()]) for x, y in data.batches(split, 128, gen, cfg)]

    first, again, other = labels(1), labels(1), labels(2)
    assert len(first) == 8 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])
    seen = torch.cat([y for _, y in data.batches(split, 128, torch.Generator().manual_seed(0))])
    assert sorted(seen.tolist()) == sorted(split.y.tolist())  # every image once an epoch


def test_augmentation_moves_digits_but_keeps_the_background(data_dir: Path) -> None:
    x = data.load(DataConfig(limit_train=64, limit_eval=10), "cpu", data_dir).train.x
    out = data.augment(x, DataConfig(rotate_deg=15, translate=0.1), torch.Generator().manual_seed(0))
    background = -data.MEAN / data.STD
    assert out.shape == x.shape and not torch.allclose(out, x)
    assert torch.isclose(out[:, :, 0, 0], torch.full_like(out[:, :, 0, 0], background), atol=1e-5).all()


def test_an_altered_truncated_or_inflated_idx_file_is_refused(tmp_path: Path) -> None:
    """Each shipped file is checked against MNIST's published SHA-256 before it is used, reading
    no more than one byte past the original's size (a gzip bomb is cut short)."""
    name = "t10k-labels-idx1-ubyte"
    with gzip.open(data.PACKAGED / f"{name}.gz", "rb") as fh:
        raw = fh.read()
    assert data._idx(data.PACKAGED, name)[:5].tolist() == [7, 2, 1, 0, 4]
    cases = {
        "altered": raw[:100] + bytes([raw[100] ^ 1]) + raw[101:],
        "truncated": raw[:5000],
        "inflated": raw + bytes(1000),
    }
    for case, body in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        with gzip.open(folder / f"{name}.gz", "wb", compresslevel=1) as fh:
            fh.write(body)
        with pytest.raises(UserError, match=rf"{case}/{name}\.gz: not the original MNIST file"):
            data._idx(folder, name)
    (tmp_path / "missing").mkdir()
    with pytest.raises(UserError, match=r"train-images-idx3-ubyte\.gz: unreadable"):
        data.read_packaged(tmp_path / "missing")


def test_a_corrupt_cache_is_reported_not_used(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "cache"
    copy.mkdir()
    for name in (data.CACHE_FILE, "manifest.json"):
        (copy / name).write_bytes((data_dir / name).read_bytes())
    with open(copy / data.CACHE_FILE, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\xff")
    with pytest.raises(UserError, match="checksum mismatch"):
        data.load_arrays(copy)
    with pytest.raises(UserError, match="checksum mismatch"):
        data.prepare(copy)  # never silently rebuilt over
    with pytest.raises(UserError, match="no data cache"):
        data.load_arrays(tmp_path / "empty")
