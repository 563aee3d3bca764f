"""A real study stopped at every named instant of a trial's life, then the same command at once.

The instants are the points a trial passes through (``mnistlab.util.interrupts.point``: started,
claimed, run made, each epoch, pruning, trained, recorded, told to Optuna); the test-only hook
``MNISTLAB_TEST_SIGNAL_AT`` makes the process send itself SIGINT, SIGTERM or SIGKILL as it passes
one, so every instant is hit, not the few a timer happens to land on. After each stop the same
command runs again at once, and then:

- `mnistlab study check` passes with no ``--repair`` and no waiting;
- the study's configuration ends trained exactly once (COMPLETE, or PRUNED in the pruned study),
  and every FAIL says why;
- every trained trial's figures are those of the uninterrupted study, to the last bit.

Each study trains one trial of one configuration (a one-choice space), so that whatever was
interrupted and resumed, its figures must be those of the uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from optuna.trial import TrialState

from conftest import ROOT, run_cli
from mnistlab.core import trials as tr
from mnistlab.search.storage import load, open_storage
from mnistlab.util.interrupts import TEST_HOOK

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("data_dir")]

STUDY = """name: instants
base: {base}
overrides: {{train.epochs: 2, train.batch_size: 64, train.lr: 0.05, data.limit_train: 600, data.limit_eval: 300}}
max_params: 20000
objectives: [val_acc]
sampler: {{name: random, seed: 1}}
pruner: {pruner}
n_trials: 1
enqueue_base: false
space:
  model.dropout: {{type: categorical, choices: [0.0]}}
"""
TEMPLATE: list[Path] = []
COMPLETE = "none"
PRUNED = "{name: threshold, lower: 99.9, n_warmup_steps: 0}"  # every trial is pruned after its first epoch

EXIT = {"INT": 130, "TERM": 143, "KILL": -9}
# (instant, signal, study): every instant with SIGINT and SIGKILL (SIGTERM takes SIGINT's path:
# the same handler raises the same Interrupted; the refit's case below sends it)
# The default run takes one signal at each instant, SIGINT and SIGKILL alternating; the other one is
# the `deep` tier's (`python3 -m pytest -m deep`), run before a change to a trial's lifecycle.
DEEP = pytest.mark.deep
INSTANTS = ("trial.start", "trial.claimed", "trial.run", "trial.epoch", "trial.trained", "trial.recorded",
            "trial.told")
CASES = [pytest.param(point, sig, COMPLETE, id=f"{point}-{sig}", marks=() if (i + (sig == "KILL")) % 2 == 0 else DEEP)
         for i, point in enumerate(INSTANTS) for sig in ("INT", "KILL")]
CASES += [pytest.param("trial.pruning", "INT", PRUNED, id="trial.pruning-INT", marks=DEEP),
          pytest.param("trial.pruning", "KILL", PRUNED, id="trial.pruning-KILL")]


def run_study(folder: Path, pruner: str, hook: str | None = None) -> tuple[int, str]:
    path = folder / "instants.yaml"
    if not path.exists():  # the embedded MLflow store, its schema migrated once for the session
        shutil.copy(TEMPLATE[0], folder / "mlflow.db")
    path.write_text(STUDY.format(base=ROOT / "experiments" / "eva4-s4.yaml", pruner=pruner))
    proc = run_cli("study", "run", str(path), "--threads", "1", cwd=folder, env={TEST_HOOK: hook or ""})
    return proc.returncode, proc.stdout + proc.stderr


def figures(folder: Path) -> list[dict[int, float]]:
    """Each trained trial's reported validation accuracy by epoch, in trial order."""
    s = load("instants", open_storage(f"sqlite:///{folder / 'optuna.db'}", heartbeat=None))
    return [dict(t.intermediate_values) for t in s.get_trials(deepcopy=False) if tr.trained(t)
            and t.state in tr.FINISHED]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, mnist_cache: Path,
                  _mlflow_template: Path) -> dict[str, dict[int, float]]:
    """The figures of each study run without a stop."""
    TEMPLATE[:] = [_mlflow_template]
    out = {}
    for pruner in (COMPLETE, PRUNED):
        folder = tmp_path_factory.mktemp("uninterrupted")
        mp = pytest.MonkeyPatch()
        mp.setenv("MNISTLAB_DATA_DIR", str(mnist_cache))
        try:
            code, text = run_study(folder, pruner)
        finally:
            mp.undo()
        assert code == 0, text
        (out[pruner],) = figures(folder)
    assert len(out[COMPLETE]) == 2 and len(out[PRUNED]) == 1  # 2 epochs; pruned after the first
    return out


@pytest.mark.parametrize(("point", "sig", "pruner"), CASES)
def test_a_stop_at_any_instant_then_the_same_command_leaves_a_whole_record(
        tmp_path: Path, uninterrupted: dict[str, dict[int, float]], point: str, sig: str, pruner: str) -> None:
    code, text = run_study(tmp_path, pruner, hook=f"{point}:{sig}")
    assert code == EXIT[sig], text
    if sig != "KILL":
        assert f"interrupted by SIG{sig}" in text, text
    again, text = run_study(tmp_path, pruner)  # the same command, at once
    assert again == 0, text
    checked = run_cli("study", "check", str(tmp_path / "instants.yaml"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    s = load("instants", open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=None))
    trials = s.get_trials(deepcopy=False)
    done = TrialState.COMPLETE if pruner == COMPLETE else TrialState.PRUNED
    trained = [t for t in trials if tr.trained(t) and t.state in tr.FINISHED]
    assert [t.state for t in trained] == [done], [(t.number, t.state, t.user_attrs) for t in trials]
    assert all(t.state in (TrialState.FAIL, done) or t.user_attrs.get(tr.TRAINED) is False for t in trials)
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get(tr.REASON), f"trial {t.number} failed without a reason"
    assert figures(tmp_path) == [uninterrupted[pruner]]  # bit for bit the uninterrupted figures


# -- refit and export ---------------------------------------------------------------------------------

REFIT_CASES = [("train.epoch", "KILL"), pytest.param("refit.run", "KILL", marks=DEEP), ("refit.trained", "TERM"),
               pytest.param("refit.saved", "KILL", marks=DEEP)]
EXPORT_CASES = [("export.written", "KILL"), ("export.moved", "INT")]


def finished_study(folder: Path) -> Path:
    code, text = run_study(folder, COMPLETE)
    assert code == 0, text
    return folder / "instants.yaml"


def refit_figures(folder: Path) -> dict[str, float]:
    """Each refit seed's test accuracy, from its result.json."""
    found = sorted(folder.glob("mnistlab-artifacts/instants-*/refit-0/seed-*/result.json"))
    return {p.parent.name: json.loads(p.read_text())["test_acc"] for p in found}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, mnist_cache: Path,
              uninterrupted: dict[str, dict[int, float]]) -> dict[str, object]:
    """An uninterrupted refit (2 seeds) and export of the finished study."""
    folder = tmp_path_factory.mktemp("reference")
    mp = pytest.MonkeyPatch()
    mp.setenv("MNISTLAB_DATA_DIR", str(mnist_cache))
    try:
        study = finished_study(folder)
        refit = run_cli("best", str(study), "--refit", "--seeds", "2", cwd=folder)
        assert refit.returncode == 0, refit.stdout + refit.stderr
        export = run_cli("best", str(study), "--export", "out", cwd=folder)
        assert export.returncode == 0, export.stdout + export.stderr
    finally:
        mp.undo()
    return {"refit": refit_figures(folder), "export": json.loads((folder / "out" / "config.json").read_text())}


@pytest.mark.parametrize(("point", "sig"), REFIT_CASES, ids=["train.epoch-KILL", "refit.run-KILL",
                                                              "refit.trained-TERM", "refit.saved-KILL"])
def test_a_refit_stopped_at_any_instant_resumes_to_the_same_figures(
        tmp_path: Path, reference: dict[str, object], point: str, sig: str) -> None:
    study = finished_study(tmp_path)
    args = ("best", str(study), "--refit", "--seeds", "2")
    stopped = run_cli(*args, cwd=tmp_path, env={TEST_HOOK: f"{point}:{sig}"})
    assert stopped.returncode == EXIT[sig], stopped.stdout + stopped.stderr
    again = run_cli(*args, cwd=tmp_path)  # the same command, at once
    assert again.returncode == 0, again.stdout + again.stderr
    checked = run_cli("study", "check", str(study), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr  # no refit run left RUNNING
    assert refit_figures(tmp_path) == reference["refit"]
    assert not list(tmp_path.rglob(".lock"))


@pytest.mark.parametrize(("point", "sig"), EXPORT_CASES, ids=[f"{p}-{s}" for p, s in EXPORT_CASES])
def test_an_export_stopped_at_any_instant_is_whole_after_the_same_command(
        tmp_path: Path, reference: dict[str, object], point: str, sig: str) -> None:
    study = finished_study(tmp_path)
    args = ("best", str(study), "--export", "out")
    stopped = run_cli(*args, cwd=tmp_path, env={TEST_HOOK: f"{point}:{sig}"})
    assert stopped.returncode == EXIT[sig], stopped.stdout + stopped.stderr
    if point == "export.moved":
        assert "exported to" in stopped.stderr and "not registered" in stopped.stderr, stopped.stderr
    elif sig != "KILL":
        assert "nothing exported" in stopped.stderr, stopped.stderr
    again = run_cli(*args, cwd=tmp_path)  # the same command, at once
    assert again.returncode == 0, again.stdout + again.stderr
    assert "registered models:/instants@best (version 1)" in again.stdout, again.stdout
    info = json.loads((tmp_path / "out" / "config.json").read_text())
    ref: dict = reference["export"]  # type: ignore[assignment]
    assert info["test_acc"] == ref["test_acc"]
    assert info["files"]["model.safetensors"] == ref["files"]["model.safetensors"]  # the same weights
    assert run_cli("evaluate", "out", cwd=tmp_path).returncode == 0
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("."))
    assert left == [], left  # no partial folder, no lock
    checked = run_cli("study", "check", str(study), cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- the shipped smoke study ----------------------------------------------------------------------

SMOKE_CASES = [("trial.epoch#3", "INT"), ("trial.recorded#1", "KILL")]


@pytest.mark.parametrize(("point", "sig"), SMOKE_CASES, ids=[f"{p}-{s}" for p, s in SMOKE_CASES])
def test_the_smoke_study_stopped_in_the_middle_then_run_again_checks_clean(
        tmp_path: Path, _mlflow_template: Path, point: str, sig: str) -> None:
    """`mnistlab study run studies/smoke.yaml` as shipped (3 trained trials, a median pruner, the
    embedded stores), stopped mid-study, then the same command at once: `study check` passes with
    no --repair, the study holds its 3 trained trials, and every FAIL says why."""
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    study = str(ROOT / "studies" / "smoke.yaml")
    stopped = run_cli("study", "run", study, "--threads", "1", cwd=tmp_path, env={TEST_HOOK: f"{point}:{sig}"})
    assert stopped.returncode == EXIT[sig], stopped.stdout + stopped.stderr
    again = run_cli("study", "run", study, "--threads", "1", cwd=tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    checked = run_cli("study", "check", study, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    s = load("smoke", open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat=None))
    trials = s.get_trials(deepcopy=False)
    assert len([t for t in trials if tr.trained(t) and t.state in tr.FINISHED]) == 3, \
        [(t.number, t.state, t.user_attrs.get(tr.REASON)) for t in trials]
    assert all(t.user_attrs.get(tr.REASON) for t in trials if t.state == TrialState.FAIL)
