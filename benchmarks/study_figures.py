"""The figures of a finished study: time and trials to a target accuracy, and what pruning saved.

Reads a study from its Optuna storage (nothing is trained) and prints:
- the first trial (in completion order) whose best validation accuracy reached the target,
  how many trials had been started by then, and the wall time from the study's first trial
  start to that trial's completion;
- epochs run against epochs a study without pruning would have run (every trained trial for
  the full `train.epochs`), and the fraction pruning saved;
- the share of each completed trial's wall time spent outside its epochs (the trainer's own
  per-epoch seconds cover training and validation): loading the data onto the device, building
  the model, the test evaluation, and everything tracking and storage cost (checkpoints,
  metrics, heartbeats, the MLflow run, Optuna's bookkeeping). An upper bound on the overhead
  of tracking and storage in real trials.

A retried trial (its worker died) counts once: its epochs are those of the retry, which
resumed from the dead attempt's checkpoint.

    python benchmarks/study_figures.py --storage sqlite:///optuna.db --name under20k [--target 99.4] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics

from optuna.trial import TrialState

from mnistlab.core.trials import trained
from mnistlab.search.storage import load, open_storage


def figures(s: object, target: float) -> dict[str, object]:
    trials = s.get_trials(deepcopy=False)
    started = [t for t in trials if t.datetime_start is not None]
    t0 = min(t.datetime_start for t in started)
    finished = sorted((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                       and t.datetime_complete), key=lambda t: t.datetime_complete)
    first = next((t for t in finished if t.user_attrs.get("best_val_acc", 0) >= target), None)
    full = max((t.user_attrs.get("epochs_run", 0) for t in trials if t.state == TrialState.COMPLETE), default=0)
    runs = [t for t in finished if trained(t)]
    ran = sum(t.user_attrs.get("epochs_run") or t.user_attrs.get("pruned_at_epoch") or 0 for t in runs)
    out: dict[str, object] = {
        "study": s.study_name,
        "trials": len(trials),
        "complete": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED and trained(t) for t in trials),
        "over_budget": sum("over budget" in t.user_attrs.get("reason", "") for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "wall_hours": round((max(t.datetime_complete for t in finished) - t0).total_seconds() / 3600, 3),
        "target": target,
        "epochs_full": full,
        "epochs_run": ran,
        "epochs_without_pruning": full * len(runs),
        "pruning_saved_fraction": round(1 - ran / (full * len(runs)), 3) if runs and full else None,
    }
    whole = [t for t in trials if t.state == TrialState.COMPLETE and "retry_of_trial" not in t.user_attrs
             and t.user_attrs.get("seconds_per_epoch") and t.datetime_complete]
    if whole:  # a resumed retry's wall time covers only the epochs it ran itself, so it is left out
        shares = sorted(1 - t.user_attrs["seconds_per_epoch"] * t.user_attrs["epochs_run"]
                        / (t.datetime_complete - t.datetime_start).total_seconds() for t in whole)
        out.update({"outside_epochs_trials": len(shares),
                    "outside_epochs_median_fraction": round(statistics.median(shares), 4),
                    "outside_epochs_max_fraction": round(shares[-1], 4)})
    if first is not None:
        out.update({
            "first_at_target_trial": first.number,
            "first_at_target_val_acc": first.user_attrs["best_val_acc"],
            "first_at_target_test_acc": first.user_attrs.get("test_acc"),
            "first_at_target_params": first.user_attrs.get("param_count"),
            "trials_started_by_then": sum(1 for t in started if t.datetime_start <= first.datetime_complete),
            "minutes_to_first_at_target": round((first.datetime_complete - t0).total_seconds() / 60, 1),
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--target", type=float, default=99.4)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    s = load(args.name, open_storage(args.storage, heartbeat=None))
    result = figures(s, args.target)
    for key, value in result.items():
        print(f"{key:>31}: {value}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")


if __name__ == "__main__":
    main()
