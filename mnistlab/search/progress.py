"""The line printed after each trial of a study, and the checks that stop it (trial count, target,
the study-wide stop of search/stop.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import optuna
from optuna.trial import TrialState

from mnistlab.core import trials as tr
from mnistlab.core.trials import search_trained, state_label
from mnistlab.search import stop as stop_mod
from mnistlab.search.study_file import Stop, StudyConfig
from mnistlab.util import interrupts
from mnistlab.util.keys import STARTED_ATTR

if TYPE_CHECKING:
    from mnistlab.tracking.recorder import StudyRecorder

# Configurations refused before training (over budget or invalid), in a row, that stop a worker: they do not
# count toward n_trials, so a search space that hardly holds a valid network would be sampled forever.
REFUSED_IN_A_ROW = 500


class Progress:
    """After each trial: a line a terminal and a log file both read well, and stop checks."""

    def __init__(self, cfg: StudyConfig, n_trials: int | None, recorder: StudyRecorder | None = None,
                 stop: Stop | None = None) -> None:
        self.cfg, self.n_trials, self.recorder = cfg, n_trials, recorder
        self.stop = cfg.stop if stop is None else stop
        self.start = time.monotonic()
        self.done_here = 0
        self.refused = 0  # in a row, by this worker
        self.barren: str | None = None  # why this worker stopped on refused configurations (the last reason)
        self.said_stop = False
        self.started: float | None = None  # the study's creation time (Unix), read once

    def stopped(self, study: optuna.Study, trials: list[optuna.trial.FrozenTrial] | None = None) -> bool:
        """Whether the study is stopped (the flag set now if its stop is met); said once by each
        worker, and put on the parent run."""
        flag = stop_mod.check(study, self.stop, trials)
        if flag is None:
            return False
        if not self.said_stop:
            self.said_stop = True
            print(f"study {study.study_name!r} stopped at {flag.get('at')}: {flag.get('reason')}; no new work is "
                  "taken", flush=True)
            if self.recorder is not None:
                self.recorder.mark_stopped(str(flag.get("at")), str(flag.get("reason")))
        return True

    def __call__(self, study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
        interrupts.point("trial.told")
        trials = study.get_trials(deepcopy=False)
        if self.started is None:
            self.started = study.user_attrs.get(STARTED_ATTR)
        n_trained = sum(1 for t in trials if search_trained(t) and t.state != TrialState.RUNNING)
        n_busy = sum(1 for t in trials if search_trained(t) and t.state == TrialState.RUNNING)
        if search_trained(frozen):
            self.done_here += 1
        print(self.line(frozen, trials, n_trained), flush=True)
        if self.recorder is not None:
            self.recorder.summary(study, trials)
        self.refused = self.refused + 1 if state_label(frozen) in ("OVER_BUDGET", "SKIPPED") else 0
        if self.refused >= REFUSED_IN_A_ROW:
            self.barren = frozen.user_attrs.get(tr.REASON, "refused")
            study.stop()
        target = self.cfg.target
        if self.stopped(study, trials) or (self.n_trials is not None and n_trained + n_busy >= self.n_trials) or (
                target is not None and any(t.user_attrs.get(tr.BEST_VAL_ACC, 0) >= target for t in trials
                                           if t.state in (TrialState.COMPLETE, TrialState.PRUNED))):
            study.stop()

    def line(self, t: optuna.trial.FrozenTrial, trials: list[optuna.trial.FrozenTrial], n_trained: int) -> str:
        state = state_label(t)
        a = t.user_attrs
        acc = a.get(tr.VAL_SCORE, a.get(tr.BEST_VAL_ACC))
        parts = [f"trial {t.number:>3} {state:<11}", f"params {a.get(tr.PARAM_COUNT, 0):>6,}",
                 f"val {acc:6.2f}% ± {tr.se(t):.2f}" if acc is not None else "val    -          "]
        if tr.is_repeat(t):
            parts.append(f"seed {a.get(tr.SEED)} of trial {a.get(tr.REPEAT_OF)}")
        elif tr.is_promoted(t):
            rung = f"screen {a[tr.SCREEN]}" if tr.is_screen(t) else "full schedule"
            parts.append(f"{rung}, promoted from trial {a.get(tr.PROMOTED_FROM)}")
        else:
            total = f"/{self.n_trials}" if self.n_trials else ""
            parts.append(f"{'screened' if tr.is_screen(t) else 'trained'} {n_trained}{total}")
        best = tr.best_group(trials)
        if best is not None:
            parts.append(f"best {best.mean:.2f}% ± {best.se:.2f} (trial {best.number}"
                         + (f", {best.n_seeds} seeds)" if best.n_seeds > 1 else ")"))
        if self.n_trials and self.done_here:
            per = (time.monotonic() - self.start) / self.done_here
            eta = per * max(0, self.n_trials - n_trained)
            if self.stop.minutes is not None and self.started is not None:  # the stop comes first
                eta = min(eta, max(0.0, self.started + 60 * self.stop.minutes - time.time()))
            parts.append(f"ETA {_duration(eta)}")
        return " | ".join(parts)


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
