"""Trial records: what a trial's user attributes say (trained or not, its state), and scores a
study can trust: each trial's score with its uncertainty, seed groups, ties, the Pareto front.

A validation accuracy measured on n images has a binomial standard error of
sqrt(p (1 - p) / n): about 0.07% at 99.5% on 10,000 images, as large as the gaps between a
study's best trials. So every score here carries its standard error, trials within noise of
the best are marked as tied, and a configuration repeated with other seeds (a *seed group*:
the original trial and its repeats) is ranked by its seed-mean score.

The trial score is the validation accuracy of the run's last epoch, the weights a run ends
with. Measured on real runs (benchmarks/selection.py, docs/picks.md): with the one-cycle recipes
the last epoch is also the best one, so the best-epoch rule of old adds nothing there and, where
accuracy still fluctuates, it is a maximum over noisy epochs, biased upward; a mean over the
last epochs is biased downward by how much a configuration was still improving, which favours
the ones that converge early.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

if TYPE_CHECKING:
    import optuna

# Trial user attributes (trial.user_attrs): their keys are spelled here only.
# Scores and seed groups, read by the pick rules:
VAL_SCORE = "val_score"  # the ranking score: validation accuracy of the last epoch (%)
VAL_SE = "val_se"  # its binomial standard error (%), on VAL_TOTAL images
VAL_TOTAL = "val_total"  # validation images the score was measured on
REPEAT_OF = "repeat_of"  # a seed repeat: the number of the trial whose configuration it repeats
SEED = "seed"  # the train.seed a seed repeat trains with
SCREEN = "screen"  # a screening trial: the index of its rung (0 = the cheapest); absent at the full schedule
PROMOTED_FROM = "promoted_from"  # a promotion: the number of the trial one rung below with the same configuration
BEST_VAL_ACC = "best_val_acc"  # the best single epoch (kept for reference; not a ranking score)
PARAM_COUNT = "param_count"  # the exact parameter count of the trial's model
# What the training measured:
BEST_EPOCH = "best_epoch"  # the epoch of BEST_VAL_ACC
EPOCHS_RUN = "epochs_run"  # epochs trained (a pruned trial's included)
PRUNED_AT_EPOCH = "pruned_at_epoch"  # the epoch after which a pruned trial stopped
TEST_ACC = "test_acc"  # test accuracy of the best-epoch weights (reported, never used to choose)
DEVICE = "device"  # the device the trial trained on
SECONDS_PER_EPOCH = "seconds_per_epoch"
# The trial's life: whether it trains, why not, where its files and its MLflow run are.
TRAINED = "trained"  # True once it took a training slot; False when it declined one (REASON says why)
REASON = "reason"  # why a trial did not train or failed: over budget, invalid config, interrupted...
DIVERGED = "diverged"  # the trial failed because its loss became NaN or infinite
WORKER = "worker"  # the process training it: host|boot id|PID namespace|PID|start time (search/workers.py)
CHECKPOINT_DIR = "checkpoint_dir"  # its checkpoint folder (a retry keeps its original's)
MLFLOW_RUN_ID = "mlflow_run_id"  # its MLflow run; on a queued retry, the run of the attempt that died
MLFLOW_MISSING = "mlflow_missing"  # MLflow was unreachable when it started: it trained without its run
ROOT_TRIAL = "root_trial"  # the trial whose checkpoint folder a retry resumes (its own number otherwise)
RETRY_OF_TRIAL = "retry_of_trial"  # a retry: the number of the failed trial it repeats
RETRIED = "retried"  # the failed trial was queued again for a retry
BASE = "base"  # the study's first trial: the base config's own values, a yardstick
WARM_FROM = "warm_from"  # a warm-started configuration: where it came from (search/warm.py)

Z = 1.96  # two scores closer than Z standard errors of their difference are tied (95%)
MEAN_DIGITS = 6  # scores are hundredths of a percent; a mean of a few seeds is exact far above 1e-6
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def binomial_se(acc: float, n: int) -> float:
    """Standard error (%) of an accuracy ``acc`` (%) measured on ``n`` images."""
    if n <= 0:
        return float("nan")
    p = min(max(acc / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / n)


def trial_score(val_accs: Sequence[float]) -> float:
    """A run's score from its per-epoch validation accuracies: the last epoch's."""
    accs = list(val_accs)
    return float(accs[-1]) if accs else float("nan")


def score(t: FrozenTrial) -> float:
    """A trial's ranking score; trials recorded before scores existed use their best epoch."""
    a = t.user_attrs
    return float(a[VAL_SCORE] if VAL_SCORE in a else a[BEST_VAL_ACC])


def se(t: FrozenTrial) -> float:
    a = t.user_attrs
    if VAL_SE in a:
        return float(a[VAL_SE])
    return binomial_se(score(t), int(a.get(VAL_TOTAL, 10_000)))


def is_repeat(t: FrozenTrial) -> bool:
    return REPEAT_OF in t.user_attrs


def is_screen(t: FrozenTrial) -> bool:
    """A screening trial: a cheap complete schedule that ranks configurations, never a pick."""
    return SCREEN in t.user_attrs


def is_promoted(t: FrozenTrial) -> bool:
    """A configuration trained again one rung up (its first training was a screen)."""
    return PROMOTED_FROM in t.user_attrs


def trained(t: FrozenTrial) -> bool:
    """A trial that trained (or is training): not over budget, not skipped, not failed, unless it
    failed by diverging: that is an outcome of its config, and it used its slot (else a study whose
    configs all diverge would never reach its n_trials)."""
    states = (*FINISHED, TrialState.RUNNING) + ((TrialState.FAIL,) if t.user_attrs.get(DIVERGED) else ())
    return bool(t.user_attrs.get(TRAINED)) and t.state in states


def accounted(t: FrozenTrial) -> bool:
    """A seed repeat or promotion that needs no other copy: queued, training, or with an outcome,
    trained (complete or pruned) or diverged (deterministic for its seed: trained again, it would
    diverge again). A declined one, or one that failed otherwise (its retry, if any, is a trial of
    its own), is not: the stage that wants it queues it again."""
    if t.state == TrialState.WAITING:
        return True
    if t.state == TrialState.FAIL:
        return bool(t.user_attrs.get(DIVERGED))
    return t.state in (TrialState.RUNNING, *FINISHED) and bool(t.user_attrs.get(TRAINED, 1))


def search_trained(t: FrozenTrial) -> bool:
    """A trained trial of a new configuration: what n_trials counts. Seed repeats and promotions
    (a screened configuration trained again one rung up) do not count."""
    return trained(t) and not is_repeat(t) and not is_promoted(t)


def state_label(t: FrozenTrial) -> str:
    """The trial's state, with OVER_BUDGET and SKIPPED for pruned trials that never trained."""
    if t.state == TrialState.PRUNED and not t.user_attrs.get(TRAINED):
        return "OVER_BUDGET" if "over budget" in t.user_attrs.get(REASON, "") else "SKIPPED"
    return t.state.name


def scored(t: FrozenTrial) -> bool:
    """A finished training at the study's full schedule with a score: COMPLETE, trained and
    measured, not a screen (screens rank configurations for promotion; they are never picked)."""
    a = t.user_attrs
    return (t.state == TrialState.COMPLETE and bool(a.get(TRAINED)) and (VAL_SCORE in a or BEST_VAL_ACC in a)
            and not is_screen(t))


@dataclass
class Group:
    """One configuration: the search trial that found it and its completed seed repeats."""

    first: FrozenTrial
    members: list[FrozenTrial] = field(default_factory=list)

    @property
    def number(self) -> int:
        return self.first.number

    @property
    def params(self) -> int:
        return int(self.first.user_attrs.get(PARAM_COUNT, 0))

    @property
    def n_seeds(self) -> int:
        return len(self.members)

    @property
    def mean(self) -> float:
        return statistics.fmean(score(t) for t in self.members)

    @property
    def std(self) -> float:
        """Spread over seeds (sample standard deviation; 0 for one seed)."""
        return statistics.stdev(score(t) for t in self.members) if self.n_seeds > 1 else 0.0

    @property
    def se(self) -> float:
        """Standard error of the seed mean as an estimate of the configuration's accuracy.

        The validation images are the same for every seed, so their binomial error does not
        shrink with more seeds; the seed spread does, by sqrt(n_seeds).
        """
        binomial = statistics.fmean(se(t) for t in self.members)
        return math.sqrt(binomial ** 2 + self.std ** 2 / self.n_seeds)

    def describe(self) -> str:
        seeds = f", mean of {self.n_seeds} seeds (std {self.std:.2f})" if self.n_seeds > 1 else ", 1 seed"
        return f"{self.mean:.2f}% ± {self.se:.2f}{seeds}"


def groups(trials: Iterable[FrozenTrial]) -> list[Group]:
    """Scored trials grouped by configuration; a repeat joins the trial it repeats."""
    done = [t for t in trials if scored(t)]
    by_number = {t.number: Group(t, [t]) for t in done if not is_repeat(t)}
    for t in done:
        if is_repeat(t):
            original = int(t.user_attrs[REPEAT_OF])
            if original in by_number:
                by_number[original].members.append(t)
    return list(by_number.values())


def rank_key(g: Group) -> tuple[float, int, int]:
    """Higher score first; ties go to the smaller network, then the earlier trial. The mean is
    rounded to MEAN_DIGITS first: means equal to every figure they can hold (two seeds of
    99.40 and 99.37 against 99.47 and 99.30) differ in floating point only, and must tie."""
    return (-round(g.mean, MEAN_DIGITS), g.params, g.number)


def tied(g: Group, best: Group) -> bool:
    """``g`` is within noise of ``best``: their difference is under Z standard errors."""
    return g.number == best.number or best.mean - g.mean <= Z * math.hypot(g.se, best.se)


def best_of(gs: list[Group]) -> Group | None:
    """The group a study ranks first: confirmed ones (most seeds) before single seeds."""
    if not gs:
        return None
    most = max(g.n_seeds for g in gs)
    return min((g for g in gs if g.n_seeds == most), key=rank_key)


def best_group(trials: Iterable[FrozenTrial]) -> Group | None:
    """The configuration a study ranks first (see best_of)."""
    return best_of(groups(trials))


def best_trial(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The search trial of the best configuration (see best_group): highest score, seed-averaged
    where it was repeated; fewest params, then the earlier trial, break ties."""
    group = best_group(trials)
    return group.first if group is not None else None


def tied_numbers(gs: list[Group], best: Group | None) -> set[int]:
    """Trial numbers of the groups tied with ``best`` (``best`` included)."""
    return {g.number for g in gs if tied(g, best)} if best is not None else set()


def pareto(gs: list[Group]) -> list[Group]:
    """Configurations no other beats on both (seed-mean) validation score and size, smallest first."""
    front = [g for g in gs if not any(
        o.mean >= g.mean and o.params <= g.params and (o.mean, o.params) != (g.mean, g.params) for o in gs)]
    return sorted(front, key=lambda g: (g.params, -g.mean, g.number))


def record_score(trial: optuna.Trial, val_accs: Sequence[float], val_total: int) -> float:
    """Set the score attributes of a trial from its per-epoch validation accuracies."""
    value = trial_score(val_accs)
    trial.set_user_attr(VAL_SCORE, round(value, 4))
    trial.set_user_attr(VAL_SE, round(binomial_se(value, val_total), 4))
    trial.set_user_attr(VAL_TOTAL, int(val_total))
    return value
