"""Warm starts (search/warm.py): sources checked, configurations re-checked against this study.

Source studies here are made with ``optuna.trial.create_trial`` (unit-test fixtures: scores are
given, nothing trains); export records are written by hand, hostile ones included.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from conftest import ROOT, cli, one_line_error
from mnistlab.core import trials as tr
from mnistlab.core.trials import WARM_FROM
from mnistlab.search.study_file import load_study
from mnistlab.search.warm import configurations
from mnistlab.util.errors import UserError

SPACE = """
space:
  model.dropout: {type: float, low: 0.0, high: 0.1}
  model.widths.1: {type: int, low: 8, high: 32, step: 4}
"""


def study_file(tmp_path: Path, warm: str, name: str = "w", max_params: int = 20000) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"name: {name}\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\nmax_params: {max_params}\n"
                    f"n_trials: 3\noverrides: {{train.epochs: 1, data.limit_train: 200}}\n{SPACE}warm_start: {warm}\n")
    return path


def source(tmp_path: Path, rows: list[tuple[float, dict]], name: str = "old") -> str:
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = optuna.create_study(storage=url, study_name=name, direction="maximize")
    dists = {"model.dropout": optuna.distributions.FloatDistribution(0.0, 0.5),
             "model.widths.1": optuna.distributions.IntDistribution(4, 64, step=2)}
    for score, params in rows:
        s.add_trial(optuna.trial.create_trial(
            value=score, params=params, distributions={k: dists[k] for k in params},
            user_attrs={tr.VAL_SCORE: score, tr.VAL_SE: 0.1, tr.VAL_TOTAL: 10_000, tr.TRAINED: True,
                        tr.PARAM_COUNT: 10_000}))
    return url


def test_a_study_source_gives_its_best_configurations_rechecked(tmp_path: Path) -> None:
    url = source(tmp_path, [(99.0, {"model.dropout": 0.05, "model.widths.1": 16}),   # fits
                            (99.3, {"model.dropout": 0.3, "model.widths.1": 16}),    # dropout out of range
                            (99.2, {"model.dropout": 0.02, "model.widths.1": 18}),   # widths.1 not on the step
                            (98.0, {"model.dropout": 0.05, "model.widths.1": 16}),   # the same as the first
                            (97.0, {"model.widths.1": 28})])                         # dropout from the base
    cfg = load_study(study_file(tmp_path, f"[{{study: old, storage: '{url}', top: 5}}]"))
    said: list[str] = []
    got = configurations(cfg, None, said.append)
    assert [label for label, _ in got] == ["study old trial 0", "study old trial 4"]
    assert got[1][1] == {"model.dropout": 0.05, "model.widths.1": 28}  # the base's dropout (eva4-s4: 0.05)
    assert said == [
        "warm start: skipped study old trial 1: model.dropout 0.3 is outside this study's range 0..0.1",
        "warm start: skipped study old trial 2: model.widths.1 18 is not on this study's step 4 from 8",
        "warm start: skipped study old trial 3: the same configuration is already taken"]


def test_over_budget_and_the_base_itself_are_skipped(tmp_path: Path) -> None:
    url = source(tmp_path, [(99.0, {"model.dropout": 0.05, "model.widths.1": 32}),    # the base (eva4-s4)
                            (98.0, {"model.dropout": 0.01, "model.widths.1": 32})])
    cfg = load_study(study_file(tmp_path, f"[{{study: old, storage: '{url}'}}]", max_params=12_400))
    said: list[str] = []
    assert configurations(cfg, None, said.append) == [("study old trial 1", {"model.dropout": 0.01,
                                                                              "model.widths.1": 32})]
    assert said == ["warm start: skipped study old trial 0: the same configuration is already taken"]
    tight = load_study(study_file(tmp_path, f"[{{study: old, storage: '{url}'}}]", max_params=10_000, name="t"))
    said.clear()
    assert configurations(tight, None, said.append) == []
    assert all("over budget: 12,400 > 10,000 params" in line for line in said) and len(said) == 2


def test_an_export_record_is_read_as_values_of_this_space(tmp_path: Path) -> None:
    record = tmp_path / "config.json"
    from mnistlab.core.config import from_dict

    config = from_dict({"model": {"widths": [16, 24, 8, 16, 16, 16], "dropout": 0.07}}).to_dict()
    record.write_text(json.dumps({"format": "mnistlab-export/1", "config": config}))
    cfg = load_study(study_file(tmp_path, "[{export: config.json}]"))
    assert configurations(cfg, None, lambda line: None) == [
        (f"export {record}", {"model.dropout": 0.07, "model.widths.1": 24})]


@pytest.mark.parametrize("content, message", [
    ("not json", "not an export's config.json"),
    ("[1, 2]", "not an export's config.json (no config object)"),
    ('{"config": 3}', "not an export's config.json (no config object)"),
    ("[" * 100_000, "not an export's config.json"),
    ('{"config": {"model": {"widht": 3}}}', "unknown key 'model.widht'"),
    ('{"config": {"model": {"dropout": 7}}}', "model.dropout"),
])
def test_a_malformed_or_hostile_record_is_one_error(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "config.json").write_text(content)
    cfg = load_study(study_file(tmp_path, "[{export: config.json}]"))
    with pytest.raises(UserError) as info:
        configurations(cfg, None, lambda line: None)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("warm, message", [
    ("3", "warm_start must be a list of 1 to 20 sources"),
    ("[]", "warm_start must be a list of 1 to 20 sources"),
    ("[{study: a, export: b}]", "warm_start[0]: expected {study: NAME} or {export: PATH}"),
    ("[{study: ../x}]", "study name '../x' is not allowed"),
    ("[{study: a, top: 0}]", "warm_start[0]: top must be an integer from 1 to 100"),
    ("[{study: a, when: 1}]", "warm_start[0]: unknown key 'when'"),
    ("[{export: ''}]", "warm_start[0]: export must be the path of an export's config.json"),
])
def test_bad_warm_start_blocks_are_one_error_line(tmp_path: Path, warm: str, message: str) -> None:
    with pytest.raises(UserError) as info:
        load_study(study_file(tmp_path, warm))
    assert message in str(info.value)


def test_a_missing_source_is_refused_before_anything_is_made(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = study_file(tmp_path, "[{export: nowhere/config.json}]")
    code, _, err = cli(capsys, "study", "run", str(path))
    one_line_error(code, err, "nowhere/config.json: no such export file")
    path = study_file(tmp_path, "[{study: old}]")  # this study's own storage does not exist yet
    code, _, err = cli(capsys, "study", "run", str(path))
    assert code == 2 and "optuna.db" in err, err
    (tmp_path / "elsewhere").mkdir()
    source(tmp_path / "elsewhere", [])  # a study with no completed trial
    path = study_file(tmp_path, f"[{{study: old, storage: 'sqlite:///{tmp_path / 'elsewhere' / 'optuna.db'}'}}]")
    code, _, err = cli(capsys, "study", "run", str(path))
    one_line_error(code, err, "study 'old' has no completed configuration to start from")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "w.yaml"]


def test_the_warm_configurations_are_enqueued_after_the_base_when_the_study_is_created(tmp_path: Path) -> None:
    from mnistlab.search.storage import create, open_storage

    url = source(tmp_path, [(99.0, {"model.dropout": 0.01, "model.widths.1": 12})])
    cfg = load_study(study_file(tmp_path, f"[{{study: old, storage: '{url}'}}]"))
    storage = open_storage(f"sqlite:///{tmp_path / 'new.db'}", heartbeat=None)
    made = create(cfg, storage, configurations(cfg, None, lambda line: None))
    base, warm = made.get_trials()
    assert base.user_attrs == {tr.BASE: True} and warm.user_attrs == {WARM_FROM: "study old trial 0"}
    assert warm.system_attrs["fixed_params"] == {"model.dropout": 0.01, "model.widths.1": 12}
    again = create(cfg, storage, configurations(cfg, None, lambda line: None))
    assert len(again.get_trials()) == 2  # a continued study enqueues nothing again
