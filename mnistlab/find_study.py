"""A stored study as the commands after `study run` find it (check, status, report, best): named by
its study file or by --name, with the MLflow store it logs to.

The study file is read before Optuna is imported: a bad file is answered at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mnistlab.search.study_file import StudyConfig, check_name, load_study
from mnistlab.util.errors import UserError
from mnistlab.util.keys import OBJECTIVES_ATTR, TRACKING_ATTR

if TYPE_CHECKING:
    import optuna


class Stored(NamedTuple):
    study: optuna.Study
    objectives: tuple[str, ...]
    config: StudyConfig | None  # the study file, when the study was named by it


def load(study_file: Path | None, name: str | None, storage: str | None) -> Stored:
    """The stored study a command names, by its file or ``--name`` (one of them)."""
    if (study_file is None) == (name is None):
        raise UserError("give a study file or --name NAME (one of them)")
    cfg = None
    objectives: tuple = ()
    if study_file is not None:
        cfg = load_study(study_file)
        name, objectives = cfg.name, cfg.objectives
    check_name(name, "--name")
    from mnistlab.search.storage import load as load_stored  # Optuna: only once the file is read
    from mnistlab.search.storage import open_storage

    loaded = load_stored(name, open_storage(storage, heartbeat=None, create=False))
    return Stored(loaded, objectives or tuple(loaded.user_attrs.get(OBJECTIVES_ATTR, ["val_acc"])), cfg)


def tracker(study: Any, tracking_uri: str | None) -> Any:
    """The MLflow store of a study: --tracking-uri, $MLFLOW_TRACKING_URI, the one it recorded, the
    default (the rule of uri.resolve_uri)."""
    from mnistlab.tracking.tracker import Tracker

    return Tracker(tracking_uri, recorded=study.user_attrs.get(TRACKING_ATTR))
