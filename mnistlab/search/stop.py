"""A study-wide stop: once a study's ``stop:`` condition is met, every worker of it, on every
machine, stops taking new work.

``study.stop()`` stops only the process that calls it, so the stop is a flag in the shared
storage (the study attribute ``mnistlab_stop``: the reason, the moment and the host that saw
it), written once by whichever worker sees the condition first. Every worker reads it before it
takes a new configuration or a promotion (``objective.claim``) and after each trial, finishes
or checkpoints what it is training, and goes on to the confirmation stage. The wall-clock
budget counts from ``mnistlab_started_at``, set when the study is created, so that every worker
measures the same minutes.
"""

from __future__ import annotations

import socket
import time
from datetime import datetime, timezone
from typing import Any

from optuna.trial import FrozenTrial

from mnistlab.core import trials as tr
from mnistlab.search.study_file import Stop
from mnistlab.util.keys import STARTED_ATTR, STOP_ATTR


def reason(stop: Stop, trials: list[FrozenTrial], started: float | None, now: float | None = None) -> str | None:
    """Why the study is done now, or None."""
    if stop.minutes is not None and started is not None:
        elapsed = (time.time() if now is None else now) - started
        if elapsed >= 60 * stop.minutes:
            return f"{stop.minutes:g} minutes of wall clock reached"
    if stop.val_score is not None:
        best = tr.best_group(trials)
        if best is not None and best.mean >= stop.val_score:
            seeds = f", mean of {best.n_seeds} seeds" if best.n_seeds > 1 else ""
            return f"trial {best.number} reached val_score {best.mean:.2f}%{seeds} (target {stop.val_score:g}%)"
    return None


def stopped(study: Any) -> dict[str, Any] | None:
    """The stop flag of ``study`` as the storage holds it now (None while it runs on)."""
    flag = study.user_attrs.get(STOP_ATTR)
    return flag if isinstance(flag, dict) else None


def check(study: Any, stop: Stop, trials: list[FrozenTrial] | None = None) -> dict[str, Any] | None:
    """The study's stop flag, set first if ``stop`` is met now; None while the study runs on."""
    flag = stopped(study)
    if flag is not None or not stop:
        return flag
    why = reason(stop, trials if trials is not None else study.get_trials(deepcopy=False),
                 study.user_attrs.get(STARTED_ATTR))
    if why is None:
        return None
    flag = {"reason": why, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname()}
    if stopped(study) is None:  # another worker may have set it meanwhile: the first reason stands
        study.set_user_attr(STOP_ATTR, flag)
    return stopped(study) or flag
