"""The weights an export delivers, checksum- and shape-verified against their config: a trial's
best epoch (from its checkpoint folder, or from its MLflow run where that folder is gone) or a
refit's final weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import torch

from mnistlab.core import checkpoint
from mnistlab.core import trials as trials_mod
from mnistlab.core.checkpoint_files import BEST, BEST_META
from mnistlab.core.config import ExperimentConfig, from_dict
from mnistlab.core.model import build_model, count_params
from mnistlab.util.errors import UserError, clip

if TYPE_CHECKING:
    from mnistlab.tracking.tracker import Tracker


def trial_weights(trial: optuna.trial.FrozenTrial, tracker: Tracker, scratch: Path
                  ) -> tuple[ExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The trial's best-epoch weights and config, checksum- and shape-verified.

    Read from the trial's checkpoint folder; where that is gone (another machine), from the
    checkpoints its MLflow run stored.
    """
    folder = Path(trial.user_attrs.get(trials_mod.CHECKPOINT_DIR, ""))
    run_id = trial.user_attrs.get(trials_mod.MLFLOW_RUN_ID)
    if not (folder / BEST).is_file() and run_id and tracker is not None:
        folder = tracker.download_checkpoints(run_id, scratch) or folder
    if not (folder / BEST).is_file():
        raise UserError(f"trial {trial.number}: checkpoint missing ({folder / BEST} does not exist"
                        + (f" and MLflow run {run_id} has no checkpoints/{BEST}" if run_id else "") + ")")
    weights, meta = checkpoint.load_best(folder)
    cfg = from_dict(meta.get("config"), f"{folder / BEST_META}")
    n_params = count_params(cfg.model)
    if n_params != trial.user_attrs.get(trials_mod.PARAM_COUNT, n_params):
        raise UserError(f"{folder / BEST_META}: its config has {n_params:,} params, "
                        f"trial {trial.number} recorded {trial.user_attrs[trials_mod.PARAM_COUNT]:,}")
    net = build_model(cfg.model)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{folder / BEST}: weights do not match their config "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return cfg, weights, _checked(folder, weights, meta)


def _checked(folder: Path, weights: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` once the weights are finite and the figures it records (copied into an export) are numbers:
    UserError naming the file otherwise (a diverged or tampered checkpoint is never delivered)."""
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise UserError(f"{folder / BEST}: weights hold NaN or infinite values ({', '.join(bad[:3])})")
    for key, kind in (("epoch", int), ("val_acc", float)):
        value = meta.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or (kind is int and value != int(value))
                                  or not 0 <= value <= (10**6 if kind is int else 100)):
            raise UserError(f"{folder / BEST_META}: {key} is {clip(value)}, not a valid {kind.__name__}")
    return meta


def refit_weights(refit: Any) -> tuple[ExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The exported refit's final weights and config, checksum- and shape-verified."""
    folder = refit.exported.folder
    weights, meta = checkpoint.load_best(folder)
    cfg = from_dict(meta.get("config"), f"{folder / BEST_META}")
    net = build_model(cfg.model)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError:
        raise UserError(f"{folder / BEST}: weights do not match their config") from None
    return cfg, weights, _checked(folder, weights, meta)
