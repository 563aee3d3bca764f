"""Configurations per hour at the same wall-clock budget: a study as it is, screened, or pruned by Hyperband.

Each design is the same study file with one block changed, run by the tool itself for the same
minutes (the study-wide stop, `--stop-minutes`) in a folder of its own, with the same workers and
threads; then, from its Optuna storage alone (nothing else is trained):

- configurations evaluated (trials that trained a new configuration, screens included) and
  per hour of the search;
- trainings at the study's full schedule (completed) and epochs-equivalent of compute
  (epochs x training images / 50,000, summed over every trained trial);
- the pick's validation score (the best full-schedule trial, the pick rule of `mnistlab best`,
  without seed repeats) and its configuration.

Designs: `today` (the file as it is, without its screen block), `epochs` (screen: 3 epochs on
all the images), `subset` (the full epochs on 10,000 images), `both` (3 epochs on 10,000 images,
the best fifth promoted), `tenth` (the same, the best tenth promoted), `rungs` (successive halving:
1 epoch on 5,000 images, then 3 epochs on 10,000, the best quarter of each promoted), `hyperband` (no screen;
Optuna's HyperbandPruner over the full schedule). Test figures are not
read; the refit of a pick is `mnistlab best --refit` afterwards, as for any study.

    python benchmarks/screening.py run --study studies/under4k.yaml --design today --minutes 25 --out DIR
    python benchmarks/screening.py summarize DIR [DIR ...] [--json benchmarks/results/F.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

DESIGNS = {
    "today": {"screen": None},
    "epochs": {"screen": {"epochs": 3, "promote": 0.2}},
    "subset": {"screen": {"limit_train": 10000, "promote": 0.2}},
    "both": {"screen": {"epochs": 3, "limit_train": 10000, "promote": 0.2}},
    "tenth": {"screen": {"epochs": 3, "limit_train": 10000, "promote": 0.1}},
    "rungs": {"screen": {"rungs": [{"epochs": 1, "limit_train": 5000}, {"epochs": 3, "limit_train": 10000}],
                         "promote": 0.25}},
    "hyperband": {"screen": None, "pruner": {"name": "hyperband", "min_resource": 1, "reduction_factor": 3}},
}


def design_file(study: Path, design: str, out: Path) -> Path:
    """The study file with the design's blocks, written into ``out`` (its base path made absolute)."""
    raw = yaml.safe_load(study.read_text())
    raw["base"] = str((study.parent / raw["base"]).resolve())
    # the file's confirm block stays: after the stop, every design confirms its finalists with more
    # seeds as the shipped studies do, and the pick is made on the seed mean (the search's hours are
    # counted without the repeats)
    raw["n_trials"] = 100_000  # the stop ends it
    for key, value in DESIGNS[design].items():
        if value is None:
            raw.pop(key, None)
        elif key == "screen" and "epochs" not in value:
            raw[key] = {**value, "epochs": raw["overrides"]["train.epochs"]}
        else:
            raw[key] = value
    path = out / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=False)
    path = design_file(Path(args.study), args.design, out)
    start = time.time()
    with open(out / "study.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "mnistlab", "study", "run", str(path), "--workers",
                                str(args.workers), "--threads", str(args.threads), "--stop-minutes",
                                str(args.minutes)], cwd=out, stdout=log, stderr=subprocess.STDOUT)
    (out / "design.json").write_text(json.dumps({"design": args.design, "minutes": args.minutes,
                                                 "workers": args.workers, "threads": args.threads,
                                                 "exit": code, "wall_s": round(time.time() - start, 1)}))
    print(json.dumps(summary(out), indent=1))


def summary(folder: Path) -> dict[str, object]:
    import optuna
    from optuna.trial import TrialState

    from mnistlab.core import trials as tr
    from mnistlab.core.config import TRAIN_IMAGES
    from mnistlab.search.storage import open_storage

    storage = open_storage(f"sqlite:///{folder / 'optuna.db'}", heartbeat=None, create=False)
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials(deepcopy=False)
    run = [t for t in trials if t.datetime_start and t.datetime_complete and tr.trained(t) and not tr.is_repeat(t)]
    t0 = min(t.datetime_start for t in run)
    hours = (max(t.datetime_complete for t in run) - t0).total_seconds() / 3600  # the search: seed repeats after
    raw = yaml.safe_load(Path(study.user_attrs["study_file"]).read_text())
    full_epochs = raw["overrides"]["train.epochs"]
    full_images = raw["overrides"].get("data.limit_train") or TRAIN_IMAGES
    screen = raw.get("screen") or {}
    compute = 0.0
    for t in run:
        epochs = t.user_attrs.get(tr.EPOCHS_RUN) or t.user_attrs.get(tr.PRUNED_AT_EPOCH) or 0
        rung = (screen.get("rungs") or [screen])[int(t.user_attrs.get(tr.SCREEN, 0))] if tr.is_screen(t) else {}
        images = min(rung.get("limit_train", full_images), full_images)
        compute += epochs * images / TRAIN_IMAGES
    configs = [t for t in run if tr.search_trained(t)]
    full = [t for t in run if t.state == TrialState.COMPLETE and not tr.is_screen(t)]
    best = tr.best_group(trials)
    design = json.loads((folder / "design.json").read_text()) if (folder / "design.json").is_file() else {}
    return {"folder": str(folder), "study": name, **design, "search_hours": round(hours, 3),
            "configurations": len(configs), "configurations_per_hour": round(len(configs) / hours, 1),
            "full_schedule_completed": len(full), "pruned": sum(t.state == TrialState.PRUNED for t in run),
            "epoch_equivalents": round(compute, 1), "full_epochs": full_epochs,
            "pick": None if best is None else {"trial": best.number, "val_score": round(best.mean, 3),
                                               "val_se": round(best.se, 3), "seeds": best.n_seeds,
                                               "params": best.params, "config": dict(best.first.params)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--study", required=True)
    r.add_argument("--design", required=True, choices=sorted(DESIGNS))
    r.add_argument("--minutes", type=float, default=30)
    r.add_argument("--workers", type=int, default=2)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--out", required=True)
    s = sub.add_parser("summarize")
    s.add_argument("folders", nargs="+")
    s.add_argument("--json")
    args = parser.parse_args()
    if args.command == "run":
        run(args)
        return
    rows = [summary(Path(f)) for f in args.folders]
    for row in rows:
        pick = row["pick"] or {}
        print(f"{row.get('design', row['study']):<10} {row['configurations']:>4} configurations in "
              f"{row['search_hours'] * 60:5.1f} min = {row['configurations_per_hour']:6.1f}/h; "
              f"{row['full_schedule_completed']:>3} at the full schedule; pick val {pick.get('val_score')}% "
              f"± {pick.get('val_se')} ({pick.get('params')} params)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
