"""Screening (ASHA rungs), the study-wide stop and their study-file blocks: the fast tier.

Trials here are made with ``optuna.trial.create_trial`` on a real SQLite storage (unit-test
fixtures: scores are given, nothing trains) unless a test says it trains.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
import pytest

from conftest import cli, one_line_error
from mnistlab.core import trials as tr
from mnistlab.search import screen as sc
from mnistlab.search import stop as stop_mod
from mnistlab.search.objective import Objective, StudyFull, claim, claim_promotion
from mnistlab.search.study_file import Rung, Screen, Stop, load_study
from mnistlab.util.errors import UserError
from mnistlab.util.keys import STARTED_ATTR, STOP_ATTR

ROOT = Path(__file__).resolve().parents[1]
ONE = Screen((Rung(2, 1000),), promote=0.25)
TWO = Screen((Rung(1, 500), Rung(2, 1000)), promote=0.5)
DIST = {"x": optuna.distributions.IntDistribution(0, 10**6)}


def study(tmp_path: Path, name: str = "s", directions: tuple[str, ...] = ("maximize",)) -> optuna.Study:
    return optuna.create_study(storage=f"sqlite:///{tmp_path / 'o.db'}", study_name=name,
                               directions=list(directions))


def add(s: optuna.Study, x: int, score: float | None, rung: int | None = 0, params: int = 5000,
        state: optuna.trial.TrialState = optuna.trial.TrialState.COMPLETE, **attrs: object) -> None:
    """A finished trial of configuration ``x`` at ``rung`` (None: the full schedule)."""
    a = {"trained": True, "param_count": params, **attrs}
    if score is not None:
        a.update(val_score=score, val_se=0.1, val_total=10_000)
    if rung is not None:
        a[tr.SCREEN] = rung
    finished = state == optuna.trial.TrialState.COMPLETE
    values = None if not finished else ([score, float(params)] if len(s.directions) > 1 else [score])
    s.add_trial(optuna.trial.create_trial(state=state, values=values, params={"x": x}, distributions=DIST,
                                          user_attrs=a))


def due(s: optuna.Study, screen: Screen = ONE, multi: bool = False) -> list[tuple[int, int]]:
    return [(t.number, rung) for t, rung in sc.due(s.get_trials(deepcopy=False), screen, multi)]


# -- promotion arithmetic ---------------------------------------------------------------------------

def test_nothing_is_promoted_until_a_rung_holds_one_over_the_fraction(tmp_path: Path) -> None:
    s = study(tmp_path)
    for i, score in enumerate([90.0, 95.0, 91.0]):
        add(s, i, score)
    assert due(s) == []  # 3 finished screens, promote 1/4: floor(0.75) = 0
    add(s, 3, 92.0)
    assert due(s) == [(1, 1)]  # the 4th screen makes the best one (95.0) due
    for i, score in enumerate([89.0, 88.0, 97.0, 87.0], start=4):
        add(s, i, score)
    assert due(s) == [(6, 1), (1, 1)]  # 8 screens: the best two, best first


def test_a_rung_promotes_no_more_than_its_fraction_however_the_best_arrive(tmp_path: Path) -> None:
    """A sampler that learns sends ever better screens: each would rank first when it finishes, and
    plain ASHA promoted every one. The quota keeps the promotions at floor(n * promote)."""
    s = study(tmp_path)
    promoted = 0
    for i in range(16):  # each screen better than all before it
        add(s, i, 90.0 + i)
        promoted += sc.enqueue_due(s, ONE, False)
        assert promoted == math.floor((i + 1) * ONE.promote)
    queued = sorted(t.user_attrs[tr.PROMOTED_FROM] for t in s.get_trials() if tr.is_promoted(t))
    assert queued == [3, 8, 13, 18]  # the best of the rung each time a slot opened (queued promotions are trials too)


def test_ties_go_to_the_smaller_network_then_the_earlier_trial(tmp_path: Path) -> None:
    s = study(tmp_path)
    add(s, 0, 95.0, params=6000)
    add(s, 1, 95.0, params=5000)
    add(s, 2, 95.0, params=5000)
    add(s, 3, 80.0)
    assert due(s) == [(1, 1)]  # same score: fewer params, then the lower number


def test_a_promotion_queued_running_or_done_is_not_due_again_but_a_failed_one_is(tmp_path: Path) -> None:
    s = study(tmp_path)
    for i, score in enumerate([99.0, 90.0, 91.0, 92.0]):
        add(s, i, score)
    assert due(s) == [(0, 1)]
    assert sc.enqueue_due(s, ONE, False) == 1
    assert due(s) == []  # queued
    waiting = next(t for t in s.get_trials() if t.state == optuna.trial.TrialState.WAITING)
    assert waiting.user_attrs == {tr.PROMOTED_FROM: 0}  # no screen attribute: the full schedule
    (tmp_path / "b").mkdir()
    s2 = study(tmp_path / "b")
    for i, score in enumerate([99.0, 90.0, 91.0, 92.0]):
        add(s2, i, score)
    add(s2, 0, None, rung=None, state=optuna.trial.TrialState.FAIL, promoted_from=0)  # interrupted: retried
    assert due(s2) == [(0, 1)]
    add(s2, 0, None, rung=None, state=optuna.trial.TrialState.FAIL, promoted_from=0, diverged=True)
    assert due(s2) == []  # diverged at the full schedule: that is its outcome


def test_unfinished_pruned_and_unscored_screens_do_not_count(tmp_path: Path) -> None:
    s = study(tmp_path)
    add(s, 0, 99.0)
    add(s, 1, None, state=optuna.trial.TrialState.RUNNING)
    add(s, 2, 50.0, state=optuna.trial.TrialState.PRUNED)
    add(s, 3, None, state=optuna.trial.TrialState.FAIL, trained=False)  # declined before training: no score
    assert due(s) == []  # one finished, scored screen is not four


def test_two_rungs_promote_rung_by_rung(tmp_path: Path) -> None:
    s = study(tmp_path)
    add(s, 0, 90.0)
    add(s, 1, 80.0)
    assert due(s, TWO) == [(0, 1)]  # rung 0 -> rung 1 (the second screen)
    sc.enqueue_due(s, TWO, False)
    assert next(t for t in s.get_trials() if t.state.name == "WAITING").user_attrs == {
        tr.PROMOTED_FROM: 0, tr.SCREEN: 1}
    add(s, 0, 93.0, rung=1, promoted_from=0)  # trial 3 (trial 2 is the queued promotion)
    add(s, 9, 95.0, rung=1, promoted_from=7)  # trial 4
    assert [d for d in due(s, TWO) if d[1] == 2] == [(4, 2)]  # the best of rung 1 goes to the full schedule


def test_two_objectives_promote_within_each_band(tmp_path: Path) -> None:
    s = study(tmp_path, directions=("maximize", "minimize"))
    banded = Screen((Rung(2, 1000),), promote=0.5, bands=(4000, 8000))
    for i, (score, params) in enumerate([(97.0, 3000), (96.0, 3500), (99.0, 7000), (98.0, 7500), (99.5, 9000),
                                         (99.6, 9500)]):
        add(s, i, score, params=params)
    assert due(s, banded, multi=True) == [(0, 1), (2, 1)]  # the best of each band; over 8,000 never
    front = Screen((Rung(2, 1000),), promote=0.5)
    # 3 of 6 by non-dominated rank: the first front is 0, 2, 4 and 5 (1 and 3 are dominated), best score first
    assert sorted(n for n, _ in due(s, front, multi=True)) == [2, 4, 5]


def test_the_best_and_the_pareto_front_never_hold_a_screen(tmp_path: Path) -> None:
    s = study(tmp_path)
    add(s, 0, 99.9)  # a screen, however high
    add(s, 1, 98.0, rung=None, promoted_from=2)
    trials = s.get_trials()
    assert tr.best_trial(trials).number == 1
    assert [g.number for g in tr.pareto(tr.groups(trials))] == [1]
    assert not tr.search_trained(trials[1]) and tr.search_trained(trials[0])  # n_trials counts configurations


# -- several workers racing to promote -------------------------------------------------------------

def test_workers_racing_to_promote_train_each_promotion_once(tmp_path: Path) -> None:
    s = study(tmp_path)
    for i, score in enumerate([99.0, 90.0, 91.0, 92.0]):
        add(s, i, score)
    other = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'o.db'}")
    assert sc.enqueue_due(s, ONE, False) == 1 and sc.enqueue_due(other, ONE, False) == 0
    sc.enqueue_due(other, ONE, False)
    # both workers saw the promotion due before either enqueued it: two queued copies
    s.enqueue_trial({"x": 0}, user_attrs={tr.PROMOTED_FROM: 0}, skip_if_exists=False)
    first, second = s.ask(), other.ask()
    claim_promotion(first, None, ONE, wait=0.0)
    with pytest.raises(StudyFull):
        claim_promotion(second, None, ONE, wait=0.0)
    assert second.user_attrs[tr.REASON] == "not run: trial 0 is already promoted to rung 1"
    assert second.user_attrs[tr.TRAINED] is False


def test_a_promotion_is_not_taken_once_the_study_is_stopped(tmp_path: Path) -> None:
    s = study(tmp_path)
    s.set_user_attr(STOP_ATTR, {"reason": "test", "at": "now", "host": "h"})
    s.enqueue_trial({"x": 0}, user_attrs={tr.PROMOTED_FROM: 0})
    with pytest.raises(StudyFull):
        claim_promotion(s.ask(), None, ONE, wait=0.0)


# -- the study-wide stop ----------------------------------------------------------------------------

def test_the_stop_flag_set_by_one_worker_is_seen_by_another(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    mine = study(tmp_path)
    mine.set_user_attr(STARTED_ATTR, time.time())
    theirs = optuna.load_study(study_name="s", storage=url)
    assert stop_mod.check(theirs, Stop(val_score=99.0)) is None
    add(mine, 0, 99.2, rung=None)  # a full-schedule configuration reaches the target
    flag = stop_mod.check(mine, Stop(val_score=99.0))
    assert flag is not None and "trial 0 reached val_score 99.20%" in flag["reason"]
    assert stop_mod.stopped(theirs) == flag  # the other worker reads it from the storage
    theirs.enqueue_trial({"x": 1})
    with pytest.raises(StudyFull, match="stopped"):  # and takes no new configuration
        claim(theirs.ask(), None, None, wait=0.0, stop=Stop())
    later = stop_mod.check(theirs, Stop(minutes=0.001))
    assert later == flag  # the first reason stands


def test_a_screen_never_meets_the_score_target_and_minutes_count_from_creation(tmp_path: Path) -> None:
    s = study(tmp_path)
    add(s, 0, 99.9)  # a screen
    assert stop_mod.reason(Stop(val_score=99.0), s.get_trials(), started=None) is None
    assert stop_mod.reason(Stop(minutes=1), [], started=1000.0, now=1059.0) is None
    assert stop_mod.reason(Stop(minutes=1), [], started=1000.0, now=1060.0) == "1 minutes of wall clock reached"
    assert Stop(99.0, 5).merged(None, 2) == Stop(99.0, 2) and not Stop()


# -- study files -------------------------------------------------------------------------------------

BASE = f"""name: q
base: {ROOT / 'experiments' / 'eva4-s4.yaml'}
overrides: {{train.epochs: 4, data.limit_train: 2000}}
max_params: 20000
n_trials: 4
space:
  model.dropout: {{type: float, low: 0.0, high: 0.1}}
"""


def test_a_screen_block_is_read_in_either_spelling(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE + "screen: {epochs: 1, limit_train: 500, promote: 0.5}\n")
    assert load_study(tmp_path / "a.yaml").screen == Screen((Rung(1, 500),), 0.5)
    (tmp_path / "b.yaml").write_text(BASE + "screen: {rungs: [{epochs: 1, limit_train: 500}, {epochs: 2}]}\n"
                                     "stop: {val_score: 99.5, minutes: 30}\n")
    cfg = load_study(tmp_path / "b.yaml")
    assert cfg.screen == Screen((Rung(1, 500), Rung(2, None)), 0.25) and cfg.stop == Stop(99.5, 30.0)
    assert load_study(ROOT / "studies" / "smoke.yaml").screen is None


@pytest.mark.parametrize("block, message", [
    ("screen: {epochs: 4}", "screen rung 0 (4 epochs on 2,000 images) is not cheaper than the full schedule"),
    ("screen: {epochs: 5, limit_train: 100}", "is not cheaper than the full schedule (4 epochs"),
    ("screen: {rungs: [{epochs: 2}, {epochs: 1}]}", "screen rung 0 (2 epochs on 2,000 images) is not cheaper than "
                                                    "rung 1"),
    ("screen: {epochs: 1, promote: 1}", "screen.promote must be a fraction between 0 and 1"),
    ("screen: {epochs: 1, promote: 0}", "screen.promote must be a fraction between 0 and 1"),
    ("screen: {epochs: 1, promote: .nan}", "'.nan' is not a finite number"),
    ("screen: {epochs: 1, promote: 1.5}", "screen.promote must be a fraction between 0 and 1"),
    ("screen: {epochs: 1, promote: true}", "screen.promote must be a fraction between 0 and 1"),
    ("screen: {epochs: 0}", "screen.epochs must be > 0"),
    ("screen: {rungs: []}", "screen.rungs must be a list of 1 to 8 rungs"),
    ("screen: {epochs: 1, bands: [4000]}", "screen.bands applies to studies with the objectives val_acc and params"),
    ("screen: {epochs: 1, speed: 2}", "unknown key screen.'speed'"),
    ("screen: 3", "screen must be a mapping"),
    ("stop: {val_score: 100.5}", "stop.val_score must be a number above 0 and at most 100; got 100.5"),
    ("stop: {val_score: .inf}", "'.inf' is not a finite number"),
    ("stop: {val_score: 0}", "stop.val_score must be a number above 0 and at most 100"),
    ("stop: {minutes: -1}", "stop.minutes must be a number above 0"),
    ("stop: {when: 3}", "unknown key stop.'when'"),
    ("sampler: {name: tpe, multivariate: 1}", "sampler.multivariate must be bool"),
])
def test_bad_screen_and_stop_blocks_are_one_error_line(tmp_path: Path, block: str, message: str) -> None:
    (tmp_path / "q.yaml").write_text(BASE + block + "\n")
    with pytest.raises(UserError) as info:
        load_study(tmp_path / "q.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_stop_flags_exit_2_and_create_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for flag, value in [("--stop-val-score", "101"), ("--stop-val-score", "nan"), ("--stop-minutes", "0"),
                        ("--stop-minutes", "inf")]:
        code, _, err = cli(capsys, "study", "run", str(ROOT / "studies" / "smoke.yaml"), flag, value)
        one_line_error(code, err, f"study run: {flag} must be a number above 0")
    assert list(tmp_path.iterdir()) == []


def test_screen_configs_are_complete_short_schedules_capped_by_the_full_one(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE + "screen: {epochs: 2, limit_train: 5000}\n")
    cfg = load_study(tmp_path / "a.yaml")
    objective = Objective(cfg)
    s = study(tmp_path)
    trial = s.ask()
    config, n = objective.sample(trial)
    assert (config.train.epochs, config.data.limit_train) == (2, 2000)  # never more images than the full schedule
    assert trial.user_attrs[tr.SCREEN] == 0 and config.train.schedule == cfg.base.train.schedule
    assert s.get_trials()[0].constraints == {"params_over_budget": float(n - 20000)}  # Optuna's own feasibility
    assert math.isclose(config.model.dropout, trial.params["model.dropout"])


def test_every_trained_trial_s_run_has_its_rank_tag(tmp_path: Path, mlflow_db: str) -> None:
    """best / tied / behind for the candidates, pruned and screen for the runs that are not (a real MLflow store)."""
    from mlflow import MlflowClient

    from mnistlab.tracking.recorder import StudyRecorder
    from mnistlab.tracking.tracker import Tracker

    tracker = Tracker(mlflow_db)
    experiment = tracker.experiment("ranks")
    parent = tracker.start_run(experiment, "parent", {})
    recorder = StudyRecorder(tracker, "ranks", experiment, parent, tmp_path / "s.yaml")
    s = study(tmp_path)
    runs = [tracker.start_run(experiment, f"trial-{i}", {}, parent) for i in range(4)]
    add(s, 0, 97.0, mlflow_run_id=runs[0])  # a screen
    add(s, 1, 99.3, rung=None, mlflow_run_id=runs[1])  # the best
    add(s, 2, 98.0, rung=None, state=optuna.trial.TrialState.PRUNED, mlflow_run_id=runs[2])
    add(s, 3, 97.5, rung=None, mlflow_run_id=runs[3])  # far behind
    recorder.summary(s, s.get_trials())
    client = MlflowClient(mlflow_db)
    assert [client.get_run(r).data.tags.get("mnistlab.rank") for r in runs] == ["screen", "best", "pruned", "behind"]
