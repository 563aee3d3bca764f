"""What one epoch measured: the record the trainer emits, the checkpoint keeps and MLflow logs.

Its own module at the bottom of the trainer core, so that the trainer (train.py) and the
checkpoint (checkpoint.py) both import it without importing each other. A new field needs a
default: checkpoints written before it existed must still resume.
"""

from __future__ import annotations

from dataclasses import dataclass


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
