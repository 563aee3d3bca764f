"""Hostile or mistaken inputs: output files that are not ours, unsafe names, absent devices, checkpoints
whose contents do not fit, deeply nested JSON. Each is one `error:` line (or a fallback) and loses nothing."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import optuna
import pytest
import torch

from conftest import ROOT, cli, one_line_error


@pytest.fixture
def stored_study(tmp_path: Path) -> str:
    """A plain Optuna study ``fine`` with one finished trial in ./optuna.db."""
    study = optuna.create_study(study_name="fine", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, value=1.0))
    return "fine"


def test_status_csv_never_overwrites_a_store_a_link_or_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 stored_study: str) -> None:
    with sqlite3.connect(tmp_path / "mlflow.db") as db:  # another SQLite store, as MLflow's is
        db.execute("create table runs (id text)")
    (tmp_path / "notes.txt").write_text("a user's file\n")
    os.symlink("notes.txt", tmp_path / "link.csv")
    (tmp_path / "folder").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    for target, message in [("optuna.db", "exists and is not a trials CSV written by mnistlab"),
                            ("mlflow.db", "exists and is not a trials CSV written by mnistlab"),
                            ("notes.txt", "exists and is not a trials CSV written by mnistlab"),
                            ("link.csv", "is a symbolic link"), ("folder", "is a folder"),
                            ("nowhere/t.csv", "no folder nowhere")]:
        code, _, err = cli(capsys, "study", "status", "--name", stored_study, "--csv", target)
        one_line_error(code, err, f"--csv {target}: {message}")
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and not p.is_symlink()}
    assert after == before  # the study is still there, byte for byte
    assert optuna.load_study(study_name="fine", storage=f"sqlite:///{tmp_path / 'optuna.db'}").trials
    assert list((tmp_path / "folder").iterdir()) == []


def test_status_csv_replaces_its_own_csv_whole(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               stored_study: str) -> None:
    for _ in range(2):  # the second run replaces the file the first wrote
        code, out, err = cli(capsys, "study", "status", "--name", stored_study, "--csv", "t.csv")
        assert code == 0 and "wrote t.csv" in out, err
    rows = (tmp_path / "t.csv").read_text().splitlines()
    assert rows[0].startswith("number,state,") and len(rows) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optuna.db", "t.csv"]  # no temporary file left


UNSAFE_NAMES = ["../../../escaped", "/tmp/abs", "..", ".hidden", "", "a/b", "a b", "x\ny", "-x", "n" * 101]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=lambda n: repr(n[:12]) + f"/{len(n)}")
def test_unsafe_experiment_names_are_refused_before_anything_is_created(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                        name: str) -> None:
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    os.chdir(work)
    (work / "e.yaml").write_text(f"name: {name!r}\ntrain: {{epochs: 1}}\n")
    code, _, err = cli(capsys, "train", "e.yaml", "--no-track")
    one_line_error(code, err, "experiment name")
    (work / "ok.yaml").write_text("name: fine\n")  # the same rule for a name set on the command line
    code, _, err = cli(capsys, "train", "ok.yaml", "--no-track", f"name={name!r}")
    one_line_error(code, err, "is not allowed")
    assert sorted(p.name for p in work.iterdir()) == ["e.yaml", "ok.yaml"]  # no runs/ folder
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "c", "e.yaml", "ok.yaml"]


# These run for real on a machine without CUDA (and without Apple's MPS), as this test machine is.
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:7", "mps"])
def test_train_on_a_device_this_machine_lacks_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          device: str) -> None:
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    (tmp_path / "e.yaml").write_text("name: e\ntrain: {epochs: 1}\n")
    code, _, err = cli(capsys, "train", "e.yaml", "--device", device, "--output", "out")
    one_line_error(code, err, f"device {device}: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]  # no run folder, no MLflow store


@no_cuda
def test_a_study_on_a_device_this_machine_lacks_is_refused_before_it_exists(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "study", "run", "smoke", "--device", "cuda")
    one_line_error(code, err, "device cuda: ")
    smoke = (ROOT / "studies" / "smoke.yaml").read_text()
    (tmp_path / "s.yaml").write_text(smoke.replace("base: ../", f"base: {ROOT}/").replace(
        "overrides:", "overrides:\n  train.device: cuda:1", 1))  # the study file's own device
    code, _, err = cli(capsys, "study", "run", "s.yaml")
    one_line_error(code, err, "device cuda:1: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"]  # no storage, store or artifacts
