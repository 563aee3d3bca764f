"""Screening: every configuration first trains on a cheap complete schedule, and only the best
of them go on to the study's full schedule (asynchronous successive halving, ASHA).

A study file's ``screen:`` block lists rungs, cheapest first. Each rung is a whole training of
its own (its own epochs and one-cycle schedule, on the first ``limit_train`` training images),
never the first epochs of a longer run: a one-cycle schedule's early epochs say little about
where it ends. The study's own schedule is the last rung. A new configuration trains at rung 0.
After every finished trial, any worker promotes the best configurations of each rung not yet
promoted, as long as the rung has promoted fewer than ``promote`` times its finished trials
(a quota: see ``due``), so no worker ever waits for a rung to fill. A promotion is an ordinary
trial, enqueued with the same parameters and the user attributes ``screen`` (its rung; absent at the full schedule) and
``promoted_from`` (the trial one rung below); ``objective.claim_promotion`` makes sure each trains once
however many workers enqueued it. Screens never count as picks (``trials.scored``); n_trials
counts configurations, so promotions do not count toward it (``trials.search_trained``).

Multi-objective studies (accuracy and size) promote by accuracy within each parameter band of
``bands`` (e.g. 4,000 / 8,000 / 20,000, the sizes that carry goals), or by non-dominated rank
without bands.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from optuna.trial import FrozenTrial, TrialState

from mnistlab.core import trials as tr
from mnistlab.search.study_file import Screen

if TYPE_CHECKING:
    import optuna


def rung_of(t: FrozenTrial, screen: Screen) -> int:
    """The rung a trial trained at: its screen index, else the full schedule."""
    return int(t.user_attrs[tr.SCREEN]) if tr.is_screen(t) else screen.full


def promotion_key(t: FrozenTrial, screen: Screen) -> tuple[int, int]:
    """A promotion's identity: (the trial it was promoted from, its rung)."""
    return int(t.user_attrs[tr.PROMOTED_FROM]), rung_of(t, screen)


def finished_at(trials: Iterable[FrozenTrial], rung: int, screen: Screen) -> list[FrozenTrial]:
    """The trials of ``rung`` that trained to the end and have a score (repeats aside)."""
    return [t for t in trials if t.state == TrialState.COMPLETE and t.user_attrs.get(tr.TRAINED)
            and tr.VAL_SCORE in t.user_attrs and not tr.is_repeat(t) and rung_of(t, screen) == rung]


def _order(ts: list[FrozenTrial]) -> list[FrozenTrial]:
    """Best first: higher score, then fewer params, then the earlier trial (a total order: ties are
    broken the same way by every worker)."""
    return sorted(ts, key=lambda t: (-tr.score(t), int(t.user_attrs.get(tr.PARAM_COUNT, 0)), t.number))


def _top(ts: list[FrozenTrial], fraction: float) -> list[FrozenTrial]:
    """The best ``floor(len(ts) * fraction)`` of ``ts`` (none until the rung holds 1 / fraction)."""
    return _order(ts)[:math.floor(len(ts) * fraction + 1e-9)]


def _fronts(ts: list[FrozenTrial]) -> list[FrozenTrial]:
    """``ts`` by non-dominated rank on (score up, params down), each front best score first."""
    left, out = list(ts), []
    while left:
        front = [t for t in left if not any(
            tr.score(o) >= tr.score(t) and o.user_attrs.get(tr.PARAM_COUNT, 0) <= t.user_attrs.get(tr.PARAM_COUNT, 0)
            and (tr.score(o), o.user_attrs.get(tr.PARAM_COUNT, 0)) != (tr.score(t), t.user_attrs.get(tr.PARAM_COUNT, 0))
            for o in left)]
        out += _order(front)
        left = [t for t in left if t not in front]
    return out


def _pools(done: list[FrozenTrial], screen: Screen, multi: bool) -> list[list[FrozenTrial]]:
    """The finished trials of one rung in the pools that promote apart, each best first: the whole
    rung by score (one objective) or by non-dominated rank (two), or each parameter band by score."""
    if not multi:
        return [_order(done)]
    if screen.bands:
        out, low = [], 0
        for high in screen.bands:
            out.append(_order([t for t in done if low < t.user_attrs.get(tr.PARAM_COUNT, 0) <= high]))
            low = high
        return out
    return [_fronts(done)]


def winners(done: list[FrozenTrial], screen: Screen, multi: bool) -> list[FrozenTrial]:
    """The trials of one rung that rank within its ``promote`` fraction, given every finished trial of it."""
    return [t for pool in _pools(done, screen, multi) for t in pool[:math.floor(len(pool) * screen.promote + 1e-9)]]


def due(trials: list[FrozenTrial], screen: Screen, multi: bool) -> list[tuple[FrozenTrial, int]]:
    """Every (trial, rung above it) promotion earned so far that is neither queued, training nor done.

    A pool of ``n`` finished trials promotes at most ``floor(n * promote)`` in all, the best not yet
    promoted first. Plain ASHA promotes whatever ranks in the top fraction at the moment it is
    looked at; with a sampler that learns, each new best configuration ranks there, and a study on
    this project's machine promoted 18 of 70 screens at ``promote: 0.1`` (benchmarks/screening.py,
    docs/benchmarks.md). The quota holds the full trainings to the fraction the study file states.
    """
    have = {promotion_key(t, screen) for t in trials if tr.is_promoted(t) and tr.accounted(t)}
    out = []
    for rung in range(screen.full):
        for pool in _pools(finished_at(trials, rung, screen), screen, multi):
            slots = math.floor(len(pool) * screen.promote + 1e-9) - sum((t.number, rung + 1) in have for t in pool)
            for t in pool:
                if slots <= 0:
                    break
                if (t.number, rung + 1) not in have:
                    out.append((t, rung + 1))
                    slots -= 1
    return out


def enqueue_due(study: optuna.Study, screen: Screen, multi: bool) -> int:
    """Enqueue the promotions that are due (see ``due``); returns how many. Several workers may
    enqueue the same one at once: ``objective.claim_promotion`` lets the first trial of it train."""
    added = 0
    for t, rung in due(study.get_trials(deepcopy=False), screen, multi):
        attrs: dict[str, Any] = {tr.PROMOTED_FROM: t.number}
        if rung < screen.full:
            attrs[tr.SCREEN] = rung
        study.enqueue_trial(dict(t.params), user_attrs=attrs, skip_if_exists=False)
        added += 1
    return added


def busy(trials: list[FrozenTrial]) -> bool:
    """A trained trial of the search is still running: it may yet earn a promotion."""
    return any(t.state == TrialState.RUNNING and t.user_attrs.get(tr.TRAINED, True) and not tr.is_repeat(t)
               for t in trials)


def run_stage(study: optuna.Study, screen: Screen, multi: bool, run_one: Callable[[], None],
              stopped: Callable[[], bool], stale: Callable[[], None] | None = None, poll: float = 2.0) -> int:
    """The end of a screened search for one worker: train the promotions that are due until none
    is left and no trial that could still earn one is running; returns the trials this worker ran.

    ``run_one`` runs one trial of the study (Optuna pops the queue first); ``stopped`` says the
    study was stopped (then nothing new is taken); ``stale`` fails dead workers' trials, whose
    retries are queued.
    """
    ran = 0
    while not stopped():
        if stale is not None:
            stale()
        enqueue_due(study, screen, multi)
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            run_one()
            ran += 1
        elif busy(trials):
            time.sleep(poll)
        else:
            break
    return ran
