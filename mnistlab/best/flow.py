"""A study's model delivered (`mnistlab best`: pick, refit, export, register) and an export
re-measured from its files alone (`mnistlab evaluate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mnistlab import find_study
from mnistlab.tracking.uri import mask
from mnistlab.util import interrupts
from mnistlab.util.errors import UserError
from mnistlab.util.keys import EXPERIMENT_ATTR, MAX_PARAMS_ATTR, PARENT_ATTR, TRIAL_TAG

if TYPE_CHECKING:
    import optuna

    from mnistlab.best.export import Exported
    from mnistlab.tracking.tracker import Tracker


@dataclass(frozen=True)
class BestOptions:
    """What `mnistlab best` was asked beyond the study."""

    min_accuracy: float | None = None  # fewest params among trials with at least this validation accuracy
    max_params: int | None = None  # highest validation accuracy among trials with at most this many params
    export: Path | None = None  # the folder to export the model to
    force: bool = False  # replace an earlier export there
    register: bool = True  # with an export, register it as models:/STUDY@best
    refit: bool = False  # retrain the pick on training + validation images first
    seeds: int = 3  # seeds of the refit
    artifacts: Path = Path("mnistlab-artifacts")
    tracking_uri: str | None = None
    data_dir: Path | None = None


def best(found: find_study.Stored, opts: BestOptions) -> int:
    """`mnistlab best`: print the pick; with ``refit`` retrain it on all training images, with
    ``export`` deliver it (verified in every format) and register it. Returns the exit code: 0, or
    the signal's (143, 130) when SIGTERM/SIGINT stopped the refit or the export."""
    from mnistlab.best import picks as pk

    loaded = found.study
    choice = pk.pick(loaded, found.objectives, opts.min_accuracy, opts.max_params)
    print(pk.describe(choice))
    if opts.export is None and not opts.refit:
        return 0  # the pick alone needs neither torch nor MLflow
    from mnistlab.best import export as ex
    from mnistlab.best import refit as rf
    from mnistlab.tracking.uri import check_reachable

    tracker = find_study.tracker(loaded, opts.tracking_uri)
    check_reachable(tracker.uri)
    tracker.check_access()
    known = tracker if tracker.known() else None
    if known is None and loaded.user_attrs.get(PARENT_ATTR):  # a mistyped store: the refit's runs would go nowhere
        raise UserError(f"study {loaded.study_name!r} logs to MLflow, but there is no MLflow store at "
                        f"{mask(tracker.uri)}: pass --tracking-uri")
    if opts.export is not None and opts.register:  # found out before anything is refitted or written
        parent = loaded.user_attrs.get(PARENT_ATTR)
        if parent and (known is None or not tracker.has_run(parent)):
            raise UserError(f"MLflow at {mask(tracker.uri)} has no run of study {loaded.study_name!r} (its parent run "
                            f"{parent}) to register the export in: pass the study's --tracking-uri, or --no-register")
    if opts.export is not None and not ex.holds_export(opts.export):  # refused before a refit trains; an
        ex.prepare_target(opts.export, opts.force)  # earlier export there may be this very one (export decides)
    refitted = None
    if opts.refit:
        budget = int(loaded.user_attrs.get(MAX_PARAMS_ATTR, 1 << 62))
        if found.config is not None:
            budget = min(budget, found.config.max_params)
        print()
        try:
            refitted = rf.for_choice(choice, loaded, budget, opts.seeds, opts.artifacts, known, opts.data_dir)
        except KeyboardInterrupt as exc:  # SIGTERM/SIGINT: the seed in progress keeps its last checkpoint
            return interrupts.stopped(exc, "the refit in progress resumes from its last checkpoint when the same "
                                           "command runs again")
        print(rf.describe(refitted))
    if opts.export is None:
        return 0
    try:
        done = ex.export(choice, loaded, opts.export, force=opts.force, tracker=known, data_dir=opts.data_dir,
                         refit=refitted)
    except KeyboardInterrupt as exc:  # the export's temporary folder is removed on the way out
        done_at = getattr(exc, "exported", None)
        return interrupts.stopped(exc, f"exported to {done_at}, not registered: the same command again registers it"
                                  if done_at else f"nothing exported, {opts.export} is as it was")
    formats = ", ".join(f"{k} {v:.2f}%" for k, v in done.accuracies.items())
    print(f"exported to {done.folder}: test accuracy {done.test_acc:.2f}% on {done.info['test_images']:,} "
          f"images, the same from every format ({formats})")
    if opts.register:
        register(tracker, loaded, done)
    return 0


def register(tracker: Tracker, loaded: optuna.Study, done: Exported) -> None:
    """The export ``done`` of study ``loaded`` registered as models:/STUDY@best; UserError when it cannot be."""
    from mnistlab.best import formats
    from mnistlab.tracking.registry import register_model

    run_id = done.info["mlflow_run_id"]
    if not run_id or not tracker.has_run(run_id):
        raise UserError(f"exported to {done.folder}, but MLflow at {tracker.uri} has no run "
                        f"{run_id}: pass the study's --tracking-uri, or --no-register")
    try:
        version = register_model(tracker, loaded.study_name, run_id, loaded.user_attrs.get(EXPERIMENT_ATTR),
                                 done.folder / formats.ONNX, done.example,
                                 {TRIAL_TAG: done.info["trial"], "test_acc": done.test_acc,
                                  "params": done.info["params"],
                                  "mnistlab.onnx_sha256": done.info["files"][formats.ONNX]})
    except Exception as exc:
        raise UserError(f"exported to {done.folder}, but registering in MLflow failed "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    print(f"registered models:/{loaded.study_name}@best (version {version}) in MLflow at {tracker.uri}")


def evaluate(folder: Path, data_dir: Path | None = None, trusted: bool = False) -> None:
    """`mnistlab evaluate`: an export's test accuracy re-measured in every format it loads (TorchScript,
    which is code, only from a ``trusted`` folder); UserError unless it matches the one its config.json
    records."""
    from mnistlab.best import export as ex

    result = ex.evaluate_folder(folder, data_dir, trusted=trusted)
    recorded = result["info"]["test_acc"]
    for name, acc in result["accuracies"].items():
        print(f"{name:>12}: {acc:.2f}% on {result['test_images']:,} test images")
    measured = result["accuracies"]["safetensors"]
    if abs(measured - recorded) > 1e-9:
        raise UserError(f"{folder}: re-measured {measured:.2f}% but config.json records {recorded:.2f}%")
    print(f"matches the recorded {recorded:.2f}%")
    if not trusted:
        print("model.torchscript.pt not loaded: TorchScript is code; pass --trusted for a folder you trust")
