"""Plots as PNG files: a study's history, importances, accuracy vs size, learning curves; one
trial's learning curves for its export."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from mnistlab.core import trials as tr
from mnistlab.core.checkpoint_files import LAST
from mnistlab.util.keys import MAX_PARAMS_ATTR

if TYPE_CHECKING:
    from mnistlab.tracking.recorder import StudyRecorder
    from mnistlab.tracking.tracker import Tracker


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write(study: optuna.Study, objectives: tuple[str, ...] | list[str], out: Path, recorder: StudyRecorder | None = None
          ) -> list[Path]:
    """Draw every plot the finished trials allow into ``out``; returns the files written."""
    finished = [t for t in study.get_trials(deepcopy=False)
                if t.state == TrialState.COMPLETE and tr.BEST_VAL_ACC in t.user_attrs]
    done = [t for t in finished if not tr.is_screen(t)]  # a screened study's plots are of its full schedule
    if not done:
        return []
    out.mkdir(parents=True, exist_ok=True)
    paths = [history(done, out / "optimization_history.png", [t for t in finished if tr.is_screen(t)]),
             accuracy_vs_params(study, done, len(objectives) > 1, out / "val_acc_vs_params.png")]
    if len(done) >= 3 and len(objectives) == 1:
        importance = importances(study, out / "param_importances.png", done)
        if importance is not None:
            paths.append(importance)
    if recorder is not None:
        paths.append(learning_curves(done, recorder, out / "learning_curves.png"))
    return paths


def history(done: list[optuna.trial.FrozenTrial], path: Path, screens: list[optuna.trial.FrozenTrial] | None = None
            ) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    if screens:  # what ranked the configurations, on its own cheaper schedule: never a candidate
        ax.plot([t.number for t in screens], [tr.score(t) for t in screens], ".", color="0.7", ms=4,
                label="screen (its own short schedule)")
    numbers = [t.number for t in done]
    accs = [tr.score(t) for t in done]
    best, running = [], 0.0
    for a in accs:
        running = max(running, a)
        best.append(running)
    ax.errorbar(numbers, accs, yerr=[tr.se(t) for t in done], fmt="o", ms=4, capsize=2,
                label="trial (± 1 standard error)")
    ax.step(numbers, best, where="post", color="C3", label="best so far")
    ax.set(xlabel="trial", ylabel="validation score (%)", title="Optimisation history")
    _integer_x(ax)
    ax.legend()
    return _save(fig, path)


def accuracy_vs_params(study: optuna.Study, done: list[optuna.trial.FrozenTrial], multi: bool, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    groups = tr.groups(done)
    ax.errorbar([g.params for g in groups], [g.mean for g in groups], yerr=[g.se for g in groups], fmt="o", ms=4,
                capsize=2, label="configuration (seed mean ± 1 standard error)")
    if multi:
        front = tr.pareto(groups)
        ax.plot([g.params for g in front], [g.mean for g in front], "o-", color="C3", label="Pareto front")
    budget = study.user_attrs.get(MAX_PARAMS_ATTR)
    if budget:
        ax.axvline(budget, color="grey", linestyle="--", label=f"budget {budget:,}")
    ax.set(xlabel="parameters", ylabel="validation score (%)", title="Accuracy against size")
    ax.legend()
    return _save(fig, path)


def importances(study: optuna.Study, path: Path, done: list[optuna.trial.FrozenTrial]) -> Path | None:
    """fANOVA importances over ``done`` alone (a screened study's screens score another schedule)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verbosity = optuna.logging.get_verbosity()
            optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created in memory"
            try:
                only = optuna.create_study(directions=study.directions)
            finally:
                optuna.logging.set_verbosity(verbosity)
            only.add_trials(done)
            imp = optuna.importance.get_param_importances(only)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None  # too few distinct trials for the evaluator
    if not imp:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(imp) + 1.5))
    names = list(imp)[::-1]
    ax.barh(names, [imp[n] for n in names])
    ax.set(xlabel="importance", title="Parameter importances")
    return _save(fig, path)


def learning_curves(done: list[optuna.trial.FrozenTrial], recorder: StudyRecorder | None, path: Path,
                    top: int = 5) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    best = sorted(done, key=lambda t: -tr.score(t))[:top]
    for t in best:
        run_id = t.user_attrs.get(tr.MLFLOW_RUN_ID)
        points = recorder.metric_history(run_id, "val_acc") if run_id else sorted(t.intermediate_values.items())
        if points:
            steps, values = zip(*sorted(points), strict=True)
            line = ax.plot(steps, values, marker=".", label=f"trial {t.number}")[0]
            n = int(t.user_attrs.get(tr.VAL_TOTAL, 10_000))
            band = [tr.binomial_se(v, n) for v in values]  # ± one standard error of each epoch's accuracy
            ax.fill_between(steps, [v - b for v, b in zip(values, band, strict=True)],
                            [v + b for v, b in zip(values, band, strict=True)], color=line.get_color(), alpha=0.15)
    ax.set(xlabel="epoch", ylabel="validation accuracy (%, ± 1 s.e.)",
           title=f"Learning curves of the top {len(best)}")
    _integer_x(ax)
    ax.legend()
    return _save(fig, path)


def trial_curves(trial: optuna.trial.FrozenTrial, tracker: Tracker, path: Path) -> bool:
    """The trial's per-epoch accuracy from MLflow (or its checkpoint); False when neither has it."""
    from mnistlab.core import checkpoint  # torch: only where a checkpoint may be read

    series: dict[str, list[tuple[int, float]]] = {}
    run_id = trial.user_attrs.get(tr.MLFLOW_RUN_ID)
    if tracker is not None and run_id:
        try:
            series = {k: tracker.metric_history(run_id, k) for k in ("train_acc", "val_acc")}
        except Exception:  # an unreachable server: fall back to the checkpoint
            series = {}
    if not any(series.values()):
        last = Path(trial.user_attrs.get(tr.CHECKPOINT_DIR, "")) / LAST
        if checkpoint.verified(last):
            history = checkpoint.load_state(last)["history"]
            series = {k: [(m["epoch"], m[k]) for m in history] for k in ("train_acc", "val_acc")}
    if not any(series.values()):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("train_acc", "train"), ("val_acc", "validation")):
        if series.get(key):
            steps, values = zip(*sorted(series[key]), strict=True)
            ax.plot(steps, values, marker=".", label=label)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"Trial {trial.number}")
    ax.legend()
    _save(fig, path)
    return True


def _integer_x(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs and trial numbers are whole


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path
