"""Seed repeats of a study's finalists: which configurations, which seeds, each trained once.

After the search, the best ``confirm.top_k`` configurations (by score, among completed search
trials within ``confirm.max_params``) are trained again with ``confirm.seeds - 1`` further
seeds on the same split. The repeats are ordinary trials in the same storage, enqueued with
the original's parameters and user attributes ``repeat_of`` (the original trial) and
``seed``; any worker runs them, and ``objective.claim_repeat`` makes sure each
(configuration, seed) trains once even when several workers enqueue it at the same time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnistlab.core import trials as tr
from mnistlab.search.study_file import Confirm
from mnistlab.util.errors import UserError


def search_over(trials: list[FrozenTrial]) -> bool:
    """No search trial is running or waiting: the finalists can no longer change."""
    return not any(not tr.is_repeat(t) and (t.state == TrialState.WAITING or
                                            (t.state == TrialState.RUNNING and t.user_attrs.get(tr.TRAINED, True)))
                   for t in trials)


def finalists(trials: list[FrozenTrial], confirm: Confirm) -> list[tr.Group]:
    """The ``top_k`` best configurations of the search, each once (a retry is one configuration)."""
    pool = [g for g in tr.groups(trials)
            if confirm.max_params is None or g.params <= confirm.max_params]
    seen: set[tuple[tuple[str, Any], ...]] = set()
    out = []
    for g in sorted(pool, key=lambda g: (-tr.score(g.first), g.params, g.number)):
        key = tuple(sorted(g.first.params.items()))
        if key in seen:
            continue
        seen.add(key)
        out.append(g)
        if len(out) == confirm.top_k:
            break
    return out


def seeds_for(first: FrozenTrial, base_seed: int, confirm: Confirm) -> list[int]:
    """The further seeds of a finalist: the ones after its own, without gaps."""
    own = int(first.params.get("train.seed", base_seed))
    return [own + i for i in range(1, confirm.seeds)]


def planned(trials: list[FrozenTrial], confirm: Confirm, base_seed: int) -> list[tuple[FrozenTrial, int]]:
    """Every (finalist, seed) repeat the confirmation stage needs."""
    return [(g.first, seed) for g in finalists(trials, confirm) for seed in seeds_for(g.first, base_seed, confirm)]


def enqueue_missing(study: optuna.Study, confirm: Confirm, base_seed: int) -> int:
    """Enqueue the repeats that are neither queued, running nor done; returns how many."""
    trials = study.get_trials(deepcopy=False)
    have = {(t.user_attrs[tr.REPEAT_OF], t.user_attrs[tr.SEED]) for t in trials
            if tr.is_repeat(t) and tr.accounted(t)}
    added = 0
    for first, seed in planned(trials, confirm, base_seed):
        if (first.number, seed) in have:
            continue
        study.enqueue_trial(dict(first.params), user_attrs={tr.REPEAT_OF: first.number, tr.SEED: seed},
                            skip_if_exists=False)
        added += 1
    return added


def check_possible(trials: list[FrozenTrial], confirm: Confirm) -> None:
    """Refuse a confirmation that asks for more finalists than the search has."""
    n = len(finalists(trials, Confirm(top_k=10**9, seeds=confirm.seeds, max_params=confirm.max_params)))
    if n < confirm.top_k:
        within = f" with at most {confirm.max_params:,} params" if confirm.max_params else ""
        raise UserError(f"confirm.top_k is {confirm.top_k} but the search has {n} completed configurations"
                        f"{within}; lower top_k or run more trials")


def run_stage(study: optuna.Study, confirm: Confirm, base_seed: int, run_one: Callable[[], None],
              poll: float = 2.0, stale: Callable[[], None] | None = None) -> int:
    """The confirmation stage of one worker: wait for the search to end, enqueue what is missing,
    train queued repeats one at a time until none is left; returns the repeats this worker ran.

    ``run_one`` runs one trial of the study (Optuna pops the queue first); ``stale`` fails the
    trials of dead workers so that their retries are queued.
    """
    ran = 0
    while True:
        if stale is not None:
            stale()
        trials = study.get_trials(deepcopy=False)
        waiting = [t for t in trials if t.state == TrialState.WAITING]
        if not search_over(trials):
            if waiting:  # a queued search trial (a dead worker's retry): it belongs to the search
                run_one()
            else:
                time.sleep(poll)
            continue
        if not waiting:
            if not any(tr.is_repeat(t) for t in trials):
                check_possible(trials, confirm)
            if enqueue_missing(study, confirm, base_seed) == 0:
                if any(tr.is_repeat(t) and t.state == TrialState.RUNNING for t in trials):
                    time.sleep(poll)  # another worker trains the last ones; a dead one is retried
                    continue
                return ran
        run_one()
        ran += 1
