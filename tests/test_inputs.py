"""Hostile or mistaken inputs: output files that are not ours, unsafe names, absent devices, checkpoints
whose contents do not fit, deeply nested JSON. Each is one `error:` line (or a fallback) and loses nothing."""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path

import optuna
import pytest
import torch

from conftest import PG_ADMIN, ROOT, cli, one_line_error
from mnistlab.core import checkpoint, data
from mnistlab.core.checkpoint_files import BEST_META
from mnistlab.util.errors import UserError


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


def test_a_user_csv_with_the_status_header_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              stored_study: str) -> None:
    """The header alone does not make a file mnistlab's: the file mnistlab wrote carries its mark."""
    mine = tmp_path / "capitals.csv"
    mine.write_text("number,state,capital\n1,Texas,Austin\n")
    mine.chmod(0o444)
    code, _, err = cli(capsys, "study", "status", "--name", stored_study, "--csv", "capitals.csv")
    one_line_error(code, err, "--csv capitals.csv: exists and is not a trials CSV written by mnistlab")
    assert mine.read_text() == "number,state,capital\n1,Texas,Austin\n" and mine.stat().st_mode & 0o777 == 0o444
    code, _, err = cli(capsys, "study", "status", "--name", stored_study, "--csv", "t.csv")
    assert code == 0, err
    assert os.getxattr(tmp_path / "t.csv", "user.mnistlab") == b"study-status-csv"
    shutil.copyfile(tmp_path / "t.csv", tmp_path / "copy.csv")  # a copy is the user's file: its mark is gone
    code, _, err = cli(capsys, "study", "status", "--name", stored_study, "--csv", "copy.csv")
    one_line_error(code, err, "--csv copy.csv: exists and is not a trials CSV written by mnistlab")


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


def rewrite_state(path: Path, damage: str) -> None:
    """Change one thing in a checkpoint and write its SHA-256 sidecar anew: the checksum matches, the contents
    do not fit the model."""
    state = checkpoint.load_state(path)
    if damage == "a weight missing":
        del state["model"][next(iter(state["model"]))]
    elif damage == "a weight of another shape":
        name = next(iter(state["model"]))
        state["model"][name] = torch.zeros(3, 3)
    elif damage == "history not a list":
        state["history"] = 7
    elif damage == "history of other records":
        state["history"] = [{"x": 1}] * state["epoch"]
    elif damage == "an optimizer of another model":
        state["optimizer"]["param_groups"][0]["params"].pop()
    path.write_bytes(b"")
    torch.save(state, path)
    (path.parent / (path.name + ".sha256")).write_text(data.sha256(path) + "\n")


DAMAGES = ["a weight missing", "a weight of another shape", "history not a list", "history of other records",
           "an optimizer of another model"]


@pytest.mark.usefixtures("data_dir")
def test_a_checkpoint_that_does_not_fit_falls_back_to_prev_then_restarts(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "e.yaml").write_text("name: e\ntrain: {epochs: 2, batch_size: 64}\n"
                                     "data: {limit_train: 128, limit_eval: 64}\n")
    train = ("train", "e.yaml", "--no-track", "--output", "run")
    code, _, err = cli(capsys, *train)
    assert code == 0, err
    ckpt = tmp_path / "run" / "checkpoints"
    pristine = {name: (ckpt / name).read_bytes() for name in ("last.pt", "last.pt.sha256", "prev.pt", "prev.pt.sha256")}
    for damage in DAMAGES:  # last.pt unusable: resumed from prev.pt
        for name, content in pristine.items():
            (ckpt / name).write_bytes(content)
        rewrite_state(ckpt / "last.pt", damage)
        code, out, err = cli(capsys, *train, "--resume")
        assert code == 0 and "Resuming from run/checkpoints/prev.pt after epoch 1" in out, (damage, err)
    for name, content in pristine.items():  # neither usable: one warning line, trained again from epoch 0
        (ckpt / name).write_bytes(content)
    rewrite_state(ckpt / "last.pt", "a weight missing")
    rewrite_state(ckpt / "prev.pt", "history not a list")
    code, out, err = cli(capsys, *train, "--resume")
    lines = err.strip().splitlines()
    assert code == 0 and "Resuming" not in out, err
    assert len(lines) == 1 and lines[0].startswith("warning: no usable checkpoint (") and "epoch 0" in lines[0], err
    assert "last.pt: its model weights do not fit its config" in lines[0] and "prev.pt: its history" in lines[0]


DEEP = "[" * 100_000  # deeper than Python's JSON parser goes: RecursionError, not ValueError


@pytest.mark.parametrize("content", ["malformed", "deeply nested", "oversize"])
def test_evaluate_on_a_bad_config_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   content: str) -> None:
    path = tmp_path / "export" / "config.json"
    path.parent.mkdir()
    if content == "oversize":
        with open(path, "wb") as fh:  # sparse: 17 MB of zeros, on disk in no time
            fh.truncate(17 << 20)
    else:
        path.write_text(DEEP if content == "deeply nested" else '{"format":')
    code, _, err = cli(capsys, "evaluate", str(path.parent))
    one_line_error(code, err, f"{path}: unreadable (")
    assert len(err) < 400


def test_every_json_file_read_back_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text(DEEP)
    (tmp_path / data.CACHE_FILE).write_bytes(b"")
    with pytest.raises(UserError, match="manifest.json: missing or unreadable"):
        data.load_arrays(tmp_path)
    (tmp_path / BEST_META).write_text(DEEP)
    with pytest.raises(UserError, match="best.json: missing or unreadable"):
        checkpoint.load_best(tmp_path)


def test_resume_into_a_folder_that_is_no_run_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "e.yaml").write_text("name: e\ntrain: {epochs: 1}\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file\n")
    code, _, err = cli(capsys, "train", "e.yaml", "--no-track", "--resume", "--output", "mine")
    one_line_error(code, err, "run folder mine: holds files but no config.yaml")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_an_empty_experiment_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture, text: str) -> None:
    (tmp_path / "e.yaml").write_text(text)
    code, _, err = cli(capsys, "train", "e.yaml", "--no-track")
    one_line_error(code, err, "e.yaml: empty file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.yaml"]


def test_an_unreadable_outage_note_is_set_aside_and_the_new_metrics_kept(tmp_path: Path, mlflow_db: str) -> None:
    """A note of metrics MLflow did not take, cut short by a kill or a full disk, once made the next end of a
    run fail and lose the metrics it was saving. It is set aside; the new one is written whole."""
    import json

    from mlflow.entities import Metric

    from mnistlab.tracking.tracker import Tracker

    tracker = Tracker(mlflow_db)
    note = tmp_path / "mlflow-pending.json"
    note.write_text('[{"run_id": "r", "key": "val_acc", "value": 1')  # half a file
    tracker.pending.append(("no-such-run", [Metric("val_acc", 99.0, 0, 3)]))  # MLflow refuses it
    with pytest.warns(UserWarning, match="unreadable .* set aside as mlflow-pending.json.unreadable-"):
        assert tracker.save_pending(note) == note
    assert [(r["key"], r["step"]) for r in json.loads(note.read_text())] == [("val_acc", 3)]
    (aside,) = tmp_path.glob("mlflow-pending.json.unreadable-*")
    assert aside.read_text().startswith('[{"run_id": "r"')  # kept for a person to read
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the write left no temporary file


def test_read_only_commands_create_nothing_in_an_empty_or_foreign_postgresql_database(
        pg_url: str, capsys: pytest.CaptureFixture) -> None:
    """`study list`/`status`/`check`/`report` and `best` add no Optuna table to a database that has none."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg_url)
    tables = lambda: set(sqlalchemy.inspect(engine).get_table_names())  # noqa: E731
    for foreign in (False, True):
        if foreign:  # another program's database (an MLflow store's table, say)
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text("create table runs (run_uuid text)"))
        before = tables()
        for args in (["study", "list"], ["study", "status", "--name", "x"], ["study", "check", "--name", "x"],
                     ["study", "report", "--name", "x"], ["best", "--name", "x"]):
            code, _, err = cli(capsys, *args, "--storage", pg_url)
            one_line_error(code, err, "holds no Optuna studies")
            assert tables() == before, args
    engine.dispose()


def test_a_stored_study_of_another_search_space_is_refused_unless_asked(tmp_path: Path, mlflow_db: str,
                                                                        capsys: pytest.CaptureFixture) -> None:
    """A plain Optuna study of the same name, sampled from other ranges, is not joined silently."""
    from mnistlab.search.storage import check_space
    from mnistlab.search.study_file import load_study

    path = tmp_path / "smoke.yaml"
    path.write_text((ROOT / "studies" / "smoke.yaml").read_text().replace("../experiments", str(ROOT / "experiments")))
    cfg = load_study(path)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = optuna.create_study(study_name="smoke", storage=url, direction="maximize")
    ours = {p.name: p.distribution() for p in cfg.space}
    s.add_trial(optuna.trial.create_trial(value=1.0, params={n: d.low for n, d in ours.items()}, distributions=ours))
    check_space(cfg, s)  # the same space: continued
    other = {**ours, "train.lr": optuna.distributions.FloatDistribution(0.001, 0.2, log=True)}
    s.add_trial(optuna.trial.create_trial(value=1.0, params={n: d.low for n, d in other.items()}, distributions=other))
    code, _, err = cli(capsys, "study", "run", str(path), "--storage", url, "--tracking-uri", mlflow_db,
                       "--n-trials", "1")
    one_line_error(code, err, "study 'smoke' exists in this storage with another search space (trial 1: 'train.lr' was")
    assert "--change-space" in err
    assert len(optuna.load_study(study_name="smoke", storage=url).trials) == 2  # nothing trained, nothing added


def test_crash_inputs_are_one_line_before_anything_exists(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--threads beyond the cores (or beyond any bound), a device index past 64 bits, ui --auth without its secrets."""
    smoke = str(ROOT / "studies" / "smoke.yaml")
    cores = len(os.sched_getaffinity(0))
    code, _, err = cli(capsys, "study", "run", smoke, "--threads", str(cores + 1), "--n-trials", "1")
    one_line_error(code, err, f"--threads {cores + 1}: 1 worker(s) x {cores + 1} threads is more than this machine's")
    code, _, err = cli(capsys, "study", "run", smoke, "--threads", "100000")
    assert code == 2 and "less than or equal to 1024" in err
    code, _, err = cli(capsys, "train", str(ROOT / "experiments" / "eva4-s4.yaml"), "--device",
                       "cuda:99999999999999999999", "--no-track")
    one_line_error(code, err, "device 'cuda:99999999999999999999': not a device name")
    for name in ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    code, _, err = cli(capsys, "ui", "--auth", "--port", "1")
    one_line_error(code, err, "ui --auth: set MLFLOW_FLASK_SERVER_SECRET_KEY and MLFLOW_AUTH_ADMIN_PASSWORD")
    missing_db = PG_ADMIN.rsplit("/", 1)[0] + "/mnistlab_no_such_database"
    started = time.monotonic()
    code, _, err = cli(capsys, "study", "run", smoke, "--tracking-uri", missing_db, "--n-trials", "1")
    one_line_error(code, err, "tracking store postgresql://")
    assert 'database "mnistlab_no_such_database" does not exist' in err
    print(f"a missing tracking database refused in {time.monotonic() - started:.1f} s")  # MLflow alone retried ~108 s
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no study, no store, no run folder


def test_names_from_the_store_reach_the_terminal_escaped() -> None:
    from mnistlab.tracking.server import printable

    assert printable("under8k") == "under8k"
    for hostile in ("\x1b]0;owned\x07", "a\nhttp://evil.example/#/experiments/1", "\x1b[2J"):
        shown = printable(hostile)
        assert shown.isprintable() and "\x1b" not in shown and "\n" not in shown
