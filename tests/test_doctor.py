"""`mnistlab doctor` and `mnistlab --version`: what the tool sees, told truthfully, nothing created."""

from __future__ import annotations

import shutil
from pathlib import Path

import optuna
import pytest
import torch

from conftest import cli, free_port
from mnistlab.core import data


def lines(out: str) -> dict[str, tuple[str, str]]:
    """topic -> (verdict, text) of doctor's findings."""
    found = {}
    for line in out.splitlines():
        if line[:4].strip() in ("ok", "--", "FAIL") and line[4:6] == "  ":
            topic, _, text = line[6:].partition(" ")
            found[topic] = (line[:4].strip(), text.strip())
    return found


def build() -> str:
    return f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"


def test_version_names_the_torch_build(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = cli(capsys, "--version")
    assert code == 0
    assert out.startswith("mnistlab ") and f"torch {torch.__version__}, {build()}" in out
    assert f"optuna {optuna.__version__}" in out and "mlflow " in out


def test_doctor_in_a_new_folder_reports_and_creates_nothing(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, _ = cli(capsys, "doctor")
    assert code == 0, out
    found = lines(out)
    assert found["torch"][1] == f"{torch.__version__}, {build()}"
    assert found["device"] == ("ok", "auto trains on " + ("cuda" if torch.cuda.is_available() else "cpu"))
    assert "starts at most" in found["workers"][1]
    assert found["data"][0] == "--" and "the shipped MNIST files verify" in found["data"][1]
    for topic, file in (("storage", "optuna.db"), ("tracking", "mlflow.db")):
        assert found[topic] == ("--", f"sqlite:///{tmp_path / file} (default): not created yet; the first study "
                                      "makes it"), found[topic]
    assert out.rstrip().endswith("everything asked for is usable")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no cache made


def test_doctor_counts_what_existing_stores_hold_and_verifies_the_cache(
        capsys: pytest.CaptureFixture, tmp_path: Path, data_dir: Path, _mlflow_template: Path) -> None:
    optuna.create_study(study_name="a", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    optuna.create_study(study_name="b", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    shutil.copy(_mlflow_template, tmp_path / "mlflow.db")
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    code, out, _ = cli(capsys, "doctor")
    assert code == 0, out
    found = lines(out)
    assert found["storage"] == ("ok", f"sqlite:///{tmp_path / 'optuna.db'} (default): opens, 2 studies")
    assert found["tracking"] == ("ok", f"sqlite:///{tmp_path / 'mlflow.db'} (default): opens, 1 experiments")
    assert found["data"] == ("ok", f"cache {data_dir / data.CACHE_FILE} verifies (train 50,000, val 10,000, "
                                   "test 10,000)")
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before  # opened read-only


def test_doctor_fails_on_what_was_asked_for_and_masks_passwords(
        capsys: pytest.CaptureFixture, tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "hunter2-doctor-secret"
    user, _, rest = pg_url.partition("@")  # postgresql://postgres@HOST/DB: the local server trusts any password
    good = f"{user}:{secret}@{rest}"
    monkeypatch.setenv("MNISTLAB_STORAGE", good)
    code, out, _ = cli(capsys, "doctor", "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    found = lines(out)
    assert code == 1, out
    assert found["storage"][0] == "ok" and "answers; no studies table yet" in found["storage"][1], found["storage"]
    assert found["tracking"][0] == "FAIL" and "unreachable" in found["tracking"][1]
    assert out.rstrip().endswith("FAIL: tracking cannot be used")
    missing = good.rsplit("/", 1)[0] + "/mnistlab_no_such_database"
    code, out, err = cli(capsys, "doctor", "--storage", missing, "--device", "cuda:7")
    found = lines(out)
    assert code == 1
    assert found["storage"][0] == "FAIL"
    assert 'database "mnistlab_no_such_database" does not exist' in found["storage"][1]
    if not torch.cuda.is_available():
        assert found["device"][0] == "FAIL"
    assert secret not in out + err


def test_doctor_fails_on_a_corrupt_cache(capsys: pytest.CaptureFixture, tmp_path: Path, data_dir: Path) -> None:
    copy = tmp_path / "cache"
    shutil.copytree(data_dir, copy)
    with open(copy / data.CACHE_FILE, "r+b") as fh:
        fh.seek(5000)
        fh.write(b"\x00\x01\x02")
    code, out, _ = cli(capsys, "doctor", "--data-dir", str(copy))
    assert code == 1
    assert lines(out)["data"] == ("FAIL", f"{copy / data.CACHE_FILE}: checksum mismatch (corrupt cache); delete it "
                                          "and run `mnistlab data prepare`")


def test_doctor_escapes_and_bounds_what_the_user_gave(capsys: pytest.CaptureFixture) -> None:
    """A URL with a non-UTF-8 byte, an escape sequence or 5,000 characters is shown escaped and cut
    short, its password masked, never echoed whole onto the terminal."""
    code, out, _ = cli(capsys, "doctor", "--storage", "postgresql://u:pw-secret@h/\udcff\x1b]0;title\x07",
                       "--tracking-uri", "http://x:" + "9" * 5000)
    assert code == 1
    found = lines(out)
    assert found["storage"][0] == "FAIL" and found["tracking"][0] == "FAIL"
    assert all(line.isprintable() and len(line) < 600 for line in out.splitlines()), out
    assert "pw-secret" not in out
