"""What one epoch measured (the record the trainer emits, the checkpoint keeps and MLflow logs),
and what a finished run measured (``Result``, which the trainer returns and MLflow records).

Its own module at the bottom of the trainer core, so that the trainer (train.py) and the
checkpoint (checkpoint.py) both import it without importing each other. A new field needs a
default: checkpoints written before it existed must still resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochMetrics:
    """What one epoch measured. Losses are mean NLL; accuracies are percent."""

    epoch: int  # 1-based
    train_loss: float
    train_acc: float
    val_loss: float  # on the test set when eval_split == "test" (full_train runs)
    val_acc: float
    val_correct: int
    val_total: int
    lr: float  # at the end of the epoch
    epoch_seconds: float
    images_per_s: float  # training images per second, this epoch
    eval_split: str = "val"


@dataclass
class Result:
    """A finished run."""

    params: int
    device: str
    history: list[EpochMetrics] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    test_loss: float | None = 0.0  # None only in a run made afterwards from a checkpoint (study check --repair)
    test_acc: float | None = 0.0  # of the best-validation-epoch weights (last epoch with full_train)
    test_correct: int = 0
    test_total: int = 0
    checkpoint_dir: str | None = None

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def seconds_per_epoch(self) -> float:
        return sum(m.epoch_seconds for m in self.history) / max(1, len(self.history))
