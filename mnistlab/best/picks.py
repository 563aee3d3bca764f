"""Which configuration `mnistlab best` delivers: the pick rules over a study's seed groups, by
validation scores only, and what `mnistlab best` prints about the pick."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from mnistlab.core import trials as trials_mod
from mnistlab.core.checkpoint_files import BEST_META, read_meta
from mnistlab.core.config import SIZES, ExperimentConfig, from_dict
from mnistlab.util.errors import UserError
from mnistlab.util.keys import MAX_PARAMS_ATTR


@dataclass
class Choice:
    """The picked configuration, the rule that picked it, the Pareto front (two objectives) and
    the configurations within noise of it."""

    group: trials_mod.Group
    rule: str
    front: list[trials_mod.Group] = field(default_factory=list)
    tied: list[trials_mod.Group] = field(default_factory=list)

    @property
    def trial(self) -> optuna.trial.FrozenTrial:
        """The search trial of the configuration (its weights are the export's without --refit)."""
        return self.group.first


def candidates(study: optuna.Study) -> list[trials_mod.Group]:
    """Configurations of completed, trained trials within the study's budget, seed repeats grouped."""
    budget = study.user_attrs.get(MAX_PARAMS_ATTR)
    return [g for g in trials_mod.groups(study.get_trials(deepcopy=False))
            if trials_mod.PARAM_COUNT in g.first.user_attrs and (budget is None or g.params <= budget)]


def pick(study: optuna.Study, objectives: tuple[str, ...] | list[str], min_accuracy: float | None = None,
         max_params: int | None = None) -> Choice:
    """The configuration to export, by validation scores only.

    Where some configurations were confirmed with seed repeats, only those with the most seeds
    compete (a single seed's score is not comparable with a seed mean). With ``min_accuracy``:
    the fewest parameters among those whose score is at or above it. Otherwise the highest
    score (among those with at most ``max_params`` when given). Ties go to the smaller
    network, then to the earlier trial.
    """
    pool = candidates(study)
    name = study.study_name
    if not pool:
        raise UserError(f"study {name!r} has no completed trials to pick from")
    front = trials_mod.pareto(pool) if len(objectives) > 1 else []
    if max_params is not None:
        best_size = min(g.params for g in pool)
        pool = [g for g in pool if g.params <= max_params]
        if not pool:
            raise UserError(f"study {name!r}: no completed trial has at most {max_params:,} params "
                            f"(the smallest has {best_size:,})")
    most = max(g.n_seeds for g in pool)
    pool = [g for g in pool if g.n_seeds == most]
    seeds = f", mean of {most} seeds" if most > 1 else ""
    if min_accuracy is not None:
        best_acc = max(g.mean for g in pool)
        passing = [g for g in pool if g.mean >= min_accuracy]
        if not passing:
            raise UserError(f"study {name!r}: no completed trial reaches {min_accuracy}% validation accuracy"
                            + (f" with at most {max_params:,} params" if max_params is not None else "")
                            + f" (the best is {best_acc:.2f}%)")
        chosen = min(passing, key=lambda g: (g.params, -g.mean, g.number))
        rule = f"fewest params at >= {min_accuracy}% validation score{seeds}"
    else:
        chosen = min(pool, key=trials_mod.rank_key)
        rule = "highest validation score" + seeds + (f" with <= {max_params:,} params" if max_params else "")
    best = min(pool, key=trials_mod.rank_key)
    tied = [g for g in sorted(pool, key=trials_mod.rank_key)
            if g.number != chosen.number and trials_mod.tied(g, best)]
    return Choice(chosen, rule, front, tied)


def _measured(t: optuna.trial.FrozenTrial) -> str:
    """What a trial's own test figure was measured on (a limited run reads fewer images)."""
    cfg = _recorded_config(t)
    n = (cfg.data.limit_eval if cfg is not None and cfg.data.limit_eval else None) or SIZES["test"]
    return f"{n:,} test images"


def describe(choice: Choice) -> str:
    """What `mnistlab best` prints: the front (two objectives), the pick, the ones tied with it."""
    lines = []
    if choice.front:
        lines.append("Pareto front (validation score against params):")
        for g in choice.front:
            mark = "*" if g.number == choice.group.number else " "
            lines.append(f" {mark} trial {g.number:>4}  {g.params:>7,} params  val {g.describe()}")
        lines.append("")
    g, t = choice.group, choice.trial
    a = t.user_attrs
    total = int(a.get(trials_mod.VAL_TOTAL, SIZES["val"]))
    lines.append(f"best trial: {t.number} ({choice.rule})")
    lines.append(f"  params:          {g.params:,}")
    lines.append(f"  validation:      {g.describe()} (score: the last epoch's accuracy on "
                 f"{total:,} validation images; ± one standard error)")
    if g.n_seeds > 1:
        per_seed = ", ".join(f"seed {m.user_attrs.get(trials_mod.SEED, _seed(m))} {trials_mod.score(m):.2f}%"
                             for m in g.members)
        lines.append(f"  per seed:        {per_seed}")
    epoch, epochs = a.get(trials_mod.BEST_EPOCH), a.get(trials_mod.EPOCHS_RUN)
    lines.append(f"  best epoch:      {_acc(t):.2f}% validation (epoch {epoch} of {epochs})")
    test_acc = a.get(trials_mod.TEST_ACC, float("nan"))
    lines.append(f"  test acc:        {test_acc:.2f}% on {_measured(t)} (trial {t.number}'s "
                 "best-epoch weights; reported, never used to choose)")
    cfg = _recorded_config(t)
    if cfg is not None:
        lines.append(f"  widths:          {list(cfg.model.widths)}")
        lines.append(f"  dropout:         {cfg.model.dropout:g}")
        lines.append(f"  lr:              {cfg.train.lr:g} ({cfg.train.schedule}, {cfg.train.optimizer})")
    for key in sorted(t.params):
        lines.append(f"  {key + ':':<17}{t.params[key]}")
    lines.append(f"  MLflow run:      {a.get(trials_mod.MLFLOW_RUN_ID, '-')}")
    lines.append(f"  checkpoint:      {a.get(trials_mod.CHECKPOINT_DIR, '-')}")
    if choice.tied:
        lines.append("")
        lines.append(f"within noise of the best (difference under {trials_mod.Z} standard errors):")
        for o in choice.tied:
            lines.append(f"  ~ trial {o.number:>4}  {o.params:>7,} params  val {o.describe()}")
    return "\n".join(lines)


def _seed(t: optuna.trial.FrozenTrial) -> Any:
    cfg = _recorded_config(t)
    return cfg.train.seed if cfg is not None else "?"


def _acc(t: optuna.trial.FrozenTrial) -> float:
    return float(t.user_attrs[trials_mod.BEST_VAL_ACC])


def _recorded_config(t: optuna.trial.FrozenTrial) -> ExperimentConfig | None:
    """The full config a trial trained, from its checkpoint folder's best.json (None if not here)."""
    meta = Path(t.user_attrs.get(trials_mod.CHECKPOINT_DIR, "")) / BEST_META
    try:
        return from_dict(read_meta(meta).get("config"), str(meta))
    except UserError:
        return None
