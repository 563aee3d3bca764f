"""The `mnistlab` command as a user meets it: the in-process entry point, and a real process where that matters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli, one_line_error, run_cli
from mnistlab.cli import main
from mnistlab.util.errors import UserError
from test_model import REFERENCE

EXP = str(ROOT / "experiments" / "eva4-s4.yaml")
EXP_STUDY = ROOT / "studies" / "smoke.yaml"


def test_model_summary_prints_the_reference_table(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = cli(capsys, "model", "summary", EXP)
    assert code == 0 and out.strip() == REFERENCE


def test_data_prepare_and_info(capsys: pytest.CaptureFixture, data_dir: Path) -> None:
    code, out, _ = cli(capsys, "data", "prepare")
    assert code == 0
    assert "train: 50,000 images" in out and "val: 10,000 images" in out and "test: 10,000 images" in out
    code, out, _ = cli(capsys, "data", "info", "--data-dir", str(data_dir))
    assert code == 0 and "sha256: " in out and str(data_dir) in out


@pytest.mark.slow
def test_train_prints_a_summary_and_writes_the_run_folder(capsys: pytest.CaptureFixture, tmp_path: Path,
                                                          data_dir: Path) -> None:
    code, out, _ = cli(capsys, "train", EXP, "--epochs", "1", "--limit-train", "2000", "--limit-eval", "500",
                       "--output", "run", "train.batch_size=64", "train.lr=0.05")
    assert code == 0, out
    assert ("params 12,400 | trained on 2,000 images | best validation " in out and " on 500 images at epoch 1 | "
            "test " in out and " on 500 images, best epoch's weights | " in out), out
    figures = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert figures["epochs_run"] == 1 and figures["best_val_acc"] > 50
    assert figures["images"] == {"train": 2000, "val": 500, "test": 500} and figures["test_total"] == 500
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc") and len(rows) == 2
    assert "batch_size: 64" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.slow
def test_a_full_train_run_names_its_held_out_figure_test_and_prints_it_once(
        capsys: pytest.CaptureFixture, tmp_path: Path, data_dir: Path, mlflow_db: str) -> None:
    """data.full_train: no validation split. Each epoch reads the test set, for comparison only: the
    summary, summary.json and the MLflow run call it test, never validation, and it is printed once."""
    from mlflow import MlflowClient

    code, out, _ = cli(capsys, "train", EXP, "--epochs", "2", "--limit-train", "1000", "--limit-eval", "300",
                       "--output", "run", "data.full_train=true", "train.batch_size=64", "train.lr=0.05",
                       "--tracking-uri", mlflow_db)
    assert code == 0, out
    epochs = [line for line in out.splitlines() if line.startswith("Test")]
    assert len(epochs) == 2 and all(line.startswith("Test: ") for line in epochs), out  # no "Test (last epoch)"
    last = epochs[-1].rsplit("(", 1)[1].rstrip("%)")
    assert f"| trained on 1,000 images (no validation split) | test {last}% on 300 images, last epoch |" in out, out
    assert "best validation" not in out
    figures = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert figures["best_val_acc"] is None and figures["best_epoch"] is None
    assert figures["images"] == {"train": 1000, "val": None, "test": 300}
    client = MlflowClient(mlflow_db)
    (run,) = client.search_runs([client.get_experiment_by_name("eva4-s4").experiment_id])
    assert "val_acc" not in run.data.metrics and "val_loss" not in run.data.metrics
    history = client.get_metric_history(run.info.run_id, "test_acc")
    assert sorted({m.step for m in history}) == [1, 2] and run.data.metrics["test_acc"] == float(last)


@pytest.mark.parametrize(("args", "message"), [
    (["frobnicate"], "No such command 'frobnicate'"),
    (["train", EXP, "--epochs", "-1"], "train.epochs must be >= 1"),
    (["train", EXP, "--epochs", "x"], "Invalid value for '--epochs'"),
    (["train", EXP, "model.widht=3"], "unknown config name 'model.widht'"),
    (["train", "missing.yaml"], "missing.yaml: no such file"),
    (["train", EXP, "model.widths=[8,8,8]"], "model.paddings has 6 entries but model.widths has 3"),
    (["data", "info", "--data-dir", "nowhere"], "no data cache"),
])
def test_bad_input_is_one_line_and_exit_2(capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    code, _, err = cli(capsys, *args)
    one_line_error(code, err, message)
    assert not Path("runs").exists()


def test_debug_raises_instead_of_one_line() -> None:
    with pytest.raises(UserError, match="missing.yaml: no such file"):
        main(["--debug", "train", "missing.yaml"])


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["frobnicate"], "No such command 'frobnicate'"),
    (["train", "missing.yaml"], "missing.yaml: no such file"),
])
def test_a_real_process_prints_one_line_and_exits_2(args: list[str], message: str) -> None:
    """What a shell sees: nothing else on stderr (no warnings at import, no traceback)."""
    proc = run_cli(*args)
    one_line_error(proc.returncode, proc.stderr, message)


@pytest.mark.slow
def test_debug_shows_the_traceback() -> None:
    proc = run_cli("--debug", "train", "missing.yaml")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_help_shows_where_defaults_come_from(capsys: pytest.CaptureFixture) -> None:
    # The help renders with rich markup: square brackets in a help text would vanish as a tag.
    code, out, _ = cli(capsys, "study", "run", "--help")
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    for shown in ("MNISTLAB_STORAGE", "sqlite:///optuna.db", "MLFLOW_TRACKING_URI", "MNISTLAB_DATA_DIR"):
        assert shown in text, shown


@pytest.mark.parametrize("url", [
    "postgresql://user:S3cretPw@db:5432/optuna",
    "postgresql://user:S3cr@tPw@db:5432/optuna",  # an '@' in the password
    "postgresql://user@db/optuna?password=S3cretPw&sslmode=require",
    "postgresql+psycopg2://db/optuna?sslmode=require&PASSWORD=S3cretPw",
    "mysql://db/optuna?passwd=S3cretPw;charset=utf8",
    "mysql://db/optuna?pwd=S3cretPw",
    "https://server/?token=S3cretPw",
    "https://server/?api_key=S3cretPw&x=1",
    "azure://acct/c?sig=S3cretPw",
    "postgresql://user:S3cretPw@[::1/optuna",  # not even a valid URL
    "postgresql+psycopg2://postgres:ab/S3cretPw@127.0.0.1/db",  # unencoded '/', '?', '#' cut the URL short
    "postgresql://u:ab?S3cretPw@h/db",
    "postgresql://u:ab#S3cretPw@h/db",
    "postgresql://u@h/db?pass%77ord=S3cretPw",  # a percent-encoded parameter name
])
def test_mask_hides_every_credential_form(url: str) -> None:
    from mnistlab.tracking.uri import mask

    assert "S3cr" not in mask(url) and "***" in mask(url)
    assert "S3cr" not in mask(f"error: cannot open {url} (details)")


def test_mask_hides_secrets_from_the_environment_and_pieces_of_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from mnistlab.tracking.uri import mask

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "EnvS3cret")
    assert mask("401: bad credentials admin:EnvS3cret") == "401: bad credentials admin:***"
    # a driver that splits user:hunter@rose@host at the first '@' reports the host "rose@host"
    assert mask('could not translate host name "rose1@host"', "postgresql://u:hunter2@rose1@host/db") \
        == 'could not translate host name "***@host"'


@pytest.mark.parametrize("storage", [
    "postgresql://nobody@127.0.0.1:1/x?password=S3cretPw",
    "postgresql://nobody:S3cr@tPw@127.0.0.1:1/x",  # the driver connects to 127.0.0.1, not to "tPw@127.0.0.1"
])
def test_a_storage_password_never_reaches_the_error_line(capsys: pytest.CaptureFixture, storage: str) -> None:
    code, out, err = cli(capsys, "study", "run", str(ROOT / "studies" / "smoke.yaml"), "--storage", storage)
    one_line_error(code, err, "cannot open (connection")
    assert "S3cr" not in err + out and "tPw" not in err + out


@pytest.mark.parametrize(("flag", "url", "message"), [
    ("--storage", "postgresql://u:S3cretPw@[::1/optuna", "storage URL 'postgresql://u:***@[::1/optuna': not a valid"),
    ("--storage", "postgresql://u@db:port/optuna", "not a valid URL (its port is not a number"),
    ("--storage", "postgresql://u:ab/S3cretPw@db/optuna", "not a valid URL (its port is not a number"),
    ("--tracking-uri", "http://[::1:5000", "tracking URI 'http://[::1:5000': not a valid URL"),
])
def test_a_malformed_url_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, flag: str, url: str,
                                     message: str) -> None:
    code, _, err = cli(capsys, "study", "run", str(ROOT / "studies" / "smoke.yaml"), flag, url)
    one_line_error(code, err, message)
    assert "S3cr" not in err and "'ab'" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_tracking_uri_with_a_login_passes_the_health_check() -> None:
    """urllib cannot send user:password@ (MLflow's client can): the health check asks without it."""
    import http.server
    import threading

    from conftest import HealthHandler
    from mnistlab.tracking.uri import check_reachable

    server = http.server.HTTPServer(("127.0.0.1", 0), HealthHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://admin:S3cret@127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()


def test_the_storage_and_the_tracking_uri_in_one_file_are_refused(capsys: pytest.CaptureFixture,
                                                                 tmp_path: Path) -> None:
    same = f"sqlite:///{tmp_path / 'one.db'}"
    code, _, err = cli(capsys, "study", "run", str(ROOT / "studies" / "smoke.yaml"), "--storage", same,
                       "--tracking-uri", same)
    one_line_error(code, err, "are one file")
    assert list(tmp_path.iterdir()) == []


def test_a_storage_that_is_not_optuna_s_is_refused_and_left_as_it_was(capsys: pytest.CaptureFixture,
                                                                       tmp_path: Path, mlflow_db: str) -> None:
    """An MLflow store, an empty file or a file of other bytes given as the storage: read-only commands and
    study run refuse in one line, and Optuna adds no tables to the file."""
    store = Path(mlflow_db.split("sqlite:///", 1)[1])
    before = store.read_bytes()
    other = ["--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for command in (["study", "list"], ["study", "status", "--name", "x"], ["study", "run", str(EXP_STUDY), *other]):
        code, _, err = cli(capsys, *command, "--storage", mlflow_db)
        one_line_error(code, err, "an MLflow store, not an Optuna storage")
    assert store.read_bytes() == before and not (tmp_path / "m.db").exists()
    (tmp_path / "empty.db").write_bytes(b"")
    code, _, err = cli(capsys, "study", "list", "--storage", f"sqlite:///{tmp_path / 'empty.db'}")
    one_line_error(code, err, "holds no Optuna studies")
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    code, _, err = cli(capsys, "study", "list", "--storage", f"sqlite:///{tmp_path / 'junk.db'}")
    one_line_error(code, err, "not an SQLite database")
    assert (tmp_path / "empty.db").stat().st_size == 0


def test_ui_warns_only_beyond_loopback_without_a_login() -> None:
    from mnistlab.tracking.server import exposure_warning

    assert exposure_warning("127.0.0.1", auth=False) is None and exposure_warning("::1", auth=False) is None
    assert exposure_warning("0.0.0.0", auth=True) is None
    for host in ("0.0.0.0", "::", "10.0.0.5"):
        assert "has no login" in exposure_warning(host, auth=False) and "--auth" in exposure_warning(host, auth=False)


TINY = ["--epochs", "1", "--limit-train", "300", "--limit-eval", "100", "--no-track"]


@pytest.mark.slow
def test_train_that_diverges_is_one_line(capsys: pytest.CaptureFixture, data_dir: Path) -> None:
    code, _, err = cli(capsys, "train", EXP, *TINY, "--output", "run", "train.lr=1.0e+30")
    one_line_error(code, err, "run: training diverged at epoch 1: the loss became nan")
    assert not (Path("run") / "summary.json").exists()


@pytest.mark.slow
def test_train_on_a_full_disk_is_one_line(data_dir: Path, tmp_path: Path) -> None:
    """A file-size limit below a checkpoint's size stands in for a full disk (EFBIG instead of ENOSPC)."""
    import resource
    import signal
    import subprocess
    import sys

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_384, resource.RLIM_INFINITY))

    proc = subprocess.run([sys.executable, "-m", "mnistlab", "train", EXP, *TINY, "--output", "run"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=300)
    one_line_error(proc.returncode, proc.stderr, "run: cannot write the run's files (File too large)")
    assert "--resume" in proc.stderr
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def _malformed_studies() -> list[tuple[str, bytes]]:
    """Study files broken in every way a hostile or careless hand breaks them, generated from a valid one."""
    import random

    import yaml

    base = {"name": "prop", "base": EXP, "max_params": 20000, "n_trials": 2,
            "space": {"train.lr": {"type": "float", "low": 0.01, "high": 0.1}}}
    long = "x" * 20_000
    wrong = {  # key -> values that key must refuse
        "name": [3, [1, 2], {"a": 1}, None, True],
        "base": [3, [EXP], "missing.yaml", long],
        "max_params": ["many", 1.5, -1, 0, True, 10**30 * -1],
        "n_trials": ["x", 0, -3, 1.5, float("inf")],
        "timeout": ["x", -1, float("nan"), float("-inf")],
        "target": ["x", -5, float("inf")],
        "objectives": [3, [["val_acc"]], {"a": 1}, "nope", [1], [], ["val_acc", "val_acc"], [long]],
        "sampler": [1, ["tpe"], {"name": 3}, {"seed": -1}, {"seed": 2**70}, {"name": long}, {"n_startup_trials": -1}],
        "pruner": [{"name": "hyperband", "reduction_factor": r} for r in (0, 1, -2, "x", 2**70)]
        + [{"name": "hyperband", "min_resource": 0}, {"name": "median", "n_warmup_steps": -1}, 7],
        "enqueue_base": ["yes", 1, None],
        "confirm": ["x", {"top_k": 0}, {"seeds": 1}, {"seeds": 10**6}, {"max_params": -1}, {"bogus": 1}],
        "space": [{}, [], 3, long, {"train.lr": 3}, {"train.lr": {"type": "float", "low": float("nan"), "high": 1}},
                  {"train.lr": {"type": "float", "low": 0, "high": float("inf")}},
                  {"train.lr": {"type": "float", "low": 0.1, "high": 10**400}},
                  {"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "step": float("inf")}},
                  {"train.lr": {"type": "int", "low": 1.5, "high": 3}},
                  {"model.widths.1": {"type": "int", "low": 2**40, "high": 2**41}},
                  {"train.lr": {"type": "categorical", "choices": []}},
                  {"model.head": {"type": "categorical", "choices": [[1], {"a": 1}]}},
                  {long: {"type": "float", "low": 0.1, "high": 0.2}}],
        "overrides": [3, {"train.lr": -1}, {"train.lr": "x"}, {"train.lr": float("inf")},
                      {"train.weight_decay": float("nan")}, {"data.rotate_deg": float("inf")},
                      {"model.width_mult": float("inf")}, {"model.width_mult": 1e6}, {"model.widths": "x"},
                      {"model.widths": [0, 1, 1, 1, 1, 1]}, {"model.widths": [2**40] * 6},
                      {"train.threads": 10**9}, {"train.seed": 2**70}, {"train.seed": -1},
                      {"model.paddings": [0, 0, 0, 0, 0, 10**8]}, {"train.epochs": 10**30 * -1},
                      {"model.widths": list(range(1, 200))}, {long: 1}, {"train.device": long}],
    }
    cases = []
    for key, values in wrong.items():
        for i, value in enumerate(values):
            cases.append((f"{key}-{i}", yaml.safe_dump({**base, key: value}, width=10**6).encode()))
    valid = yaml.safe_dump(base).encode()
    rng = random.Random(14)
    bomb = b"".join(b"%s: &%s [%s]\n" % (n, n, b", ".join([b"*" + p if p else b"lol"] * 9))
                    for p, n in zip([b"", b"a", b"b", b"c", b"d", b"e"], [b"a", b"b", b"c", b"d", b"e", b"f"],
                                    strict=True))
    for key in ("name", "base", "objectives", "space", "overrides", "sampler"):
        cases.append((f"bomb-{key}", bomb.replace(b"a: &a", b"x-a: &a", 0) + valid.replace(
            key.encode() + b":", b"old-" + key.encode() + b":") + key.encode() + b": *f\n"))
    cases += [
        ("latin-1", valid.replace(b"prop", "pröp".encode("latin-1"))),
        ("utf-16", valid.decode().encode("utf-16")),
        ("nul", valid + b"\x00\n"),
        ("binary", bytes(rng.randrange(256) for _ in range(2000))),
        ("empty", b""),
        ("list", b"- 1\n- 2\n"),
        ("deep", b"space: " + b"[" * 500 + b"]" * 500 + b"\n"),
        ("huge", valid + b"#" + b"x" * 2_000_000 + b"\n"),
        ("dup-top", valid + b"name: again\n"),
        ("dup-nested", valid.replace(b"type: float", b"type: float\n    type: int")),
        ("inf-text", valid.replace(b"0.1", b".inf")),
        ("nan-text", valid.replace(b"0.01", b".NaN")),
        ("big-int-text", valid.replace(b"20000", b"9" * 5000)),
        ("unclosed", valid + b"overrides: {train.lr: [1, 2\n"),
        ("tab", valid + b"\tmax_params: 3\n"),
        ("python-tag", valid + b"evil: !!python/object/apply:os.system ['true']\n"),
    ]
    for i in range(20):  # random byte flips of the valid file, kept only where they break it
        raw = bytearray(valid)
        for _ in range(3):
            raw[rng.randrange(len(raw))] = rng.choice(b"{}[]:&*!%@`\"'\xff\x00-?|>#,")
        cases.append((f"flip-{i}", bytes(raw)))
    return cases


def test_malformed_study_files_are_one_bounded_error_and_create_nothing(capsys: pytest.CaptureFixture,
                                                                       tmp_path: Path) -> None:
    """Property: whatever is wrong with a study file, `study run` answers exit 2 and one `error:` line
    of bounded length, in bounded time and memory, with no traceback and nothing created."""
    import resource
    import time

    folder = tmp_path / "in"
    folder.mkdir()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases = _malformed_studies()
    assert len(cases) > 120
    for name, text in cases:
        path = folder / f"{name}.yaml"
        path.write_bytes(text)
        start = time.monotonic()
        code, out, err = cli(capsys, "study", "run", str(path))
        seconds = time.monotonic() - start
        if code == 0 and name.startswith("flip-"):  # a flip that left a valid file: not a malformed case
            continue
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (name, code, err[:500])
        assert "Traceback" not in err + out, name
        assert len(lines[0]) <= 2000 + len("error: "), (name, len(lines[0]))
        assert seconds < 3, (name, seconds)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in"], (name, list(tmp_path.iterdir()))
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024  # ru_maxrss is KiB
    assert grown_mb < 300, grown_mb


@pytest.mark.parametrize("text", ["x" * 20_000, "a?" + "password" * 3000, "http://" + "u" * 20_000 + ":" + "p" * 20_000,
                                  "a:" * 20_000 + "@"])
def test_mask_is_fast_on_hostile_text(text: str) -> None:
    """Every error line passes through mask: it must not take quadratic time on a long echoed value."""
    import time

    from mnistlab.tracking.uri import mask

    start = time.monotonic()
    mask(text, text)
    assert time.monotonic() - start < 0.5


@pytest.mark.parametrize("path", [[], ["study"], ["study", "run"], ["study", "check"], ["train"], ["best"]])
def test_help_gives_flags_no_value_label(capsys: pytest.CaptureFixture, path: list[str]) -> None:
    """A plain flag (--help, --debug, --verbose/--no-verbose) takes no value: its type column stays empty."""
    code, out, _ = cli(capsys, *path, "--help")
    assert code == 0 and "--help" in out
    assert "<bool>" not in out
    if path == ["study", "run"]:
        assert "<str>" in out  # options that take a value keep their type


HEAVY = ("torch", "optuna", "mlflow", "pandas", "matplotlib", "onnx")
IMPORTS = r"""
import json, sys
from mnistlab.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)))
"""


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["study", "run", "missing.yaml"], ["study", "create", "missing.yaml"], ["study", "check", "missing.yaml"],
    ["study", "status", "missing.yaml"], ["study", "report", "missing.yaml"], ["best", "missing.yaml"],
    ["train", "missing.yaml"], ["model", "summary", "missing.yaml"],
])
def test_a_missing_file_is_answered_before_any_heavy_import(args: list[str]) -> None:
    """Bad input is answered at once: no seconds spent importing torch, Optuna, MLflow or pandas first."""
    code = f"HEAVY = {HEAVY!r}\n{IMPORTS}"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    one_line_error(2, proc.stderr, "missing.yaml: no such file")
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_commands_that_read_records_do_not_import_torch(tmp_path: Path) -> None:
    """`study check`, `best` (the pick alone), `study status` and `studies` read a trained study's
    records without the trainer: names come from util/keys.py and core/checkpoint_files.py."""
    env = {"MNISTLAB_STORAGE": f"sqlite:///{tmp_path / 'optuna.db'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    ran = run_cli("study", "run", "smoke", "--n-trials", "2", "--epochs", "1", "--limit-train", "300",
                  "--limit-eval", "100", "--threads", "1", env=env, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    code = f"HEAVY = {('torch',)!r}\n{IMPORTS}"
    said = {}
    for args in (["study", "check", "smoke"], ["best", "smoke"], ["study", "status", "smoke"], ["studies"]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env={**os.environ, **env})
        *said[" ".join(args)], imported = proc.stdout.strip().splitlines() or [""]
        assert proc.returncode == 0 and json.loads(imported) == [], (args, proc.stdout, proc.stderr)
    assert "'smoke': consistent (2 trials" in said["study check smoke"][-1]  # the records were read
    assert said["best smoke"][0].startswith("best trial: "), said["best smoke"]


def test_shipped_studies_and_experiments_are_found_by_name_from_any_folder(capsys: pytest.CaptureFixture,
                                                                          tmp_path: Path) -> None:
    code, out, _ = cli(capsys, "model", "summary", "eva4-s4")
    assert code == 0 and out.strip() == REFERENCE
    code, _, err = cli(capsys, "study", "status", "smoke")
    one_line_error(code, err, "optuna.db: no such database")  # studies/smoke.yaml was read
    code, _, err = cli(capsys, "study", "status", "nosuch")
    one_line_error(code, err, "nosuch: no such file, nor a shipped one (shipped studies: smallest, smoke, under20k, "
                              "under4k, under8k)")
    (tmp_path / "smoke").write_text("name: mine\n")  # a file of that name here comes first
    code, _, err = cli(capsys, "study", "status", "smoke")
    one_line_error(code, err, "smoke: missing key 'base'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smoke"]


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_the_readme_shows_what_the_first_study_prints(tmp_path: Path) -> None:
    """The README's sample output is the smoke study as it runs today (the ETA aside; validation
    figures within a point, as thread counts may change the last digits)."""
    import re

    block = (ROOT / "README.md").read_text().split("mnistlab study run studies/smoke.yaml", 1)[1]
    shown = [line for line in block.split("```", 3)[2].splitlines() if line.startswith("trial ")]
    proc = run_cli("study", "run", "smoke")
    assert proc.returncode == 0, proc.stderr
    printed = [line for line in proc.stdout.splitlines() if line.startswith("trial ")]
    pattern = re.compile(r"trial +(\d+) (\w+) +\| params +([\d,]+) \| val +([\d.]+)% ± ([\d.]+) \| trained (\d+/\d+)")
    assert len(shown) == len(printed) == 3, (shown, printed)
    for doc, real in zip(shown, printed, strict=True):
        d, r = pattern.match(doc), pattern.match(real)
        assert d and r, (doc, real)
        assert (d[1], d[2], d[3], d[6]) == (r[1], r[2], r[3], r[6]), (doc, real)
        assert abs(float(d[4]) - float(r[4])) <= 1.0 and abs(float(d[5]) - float(r[5])) <= 0.2, (doc, real)
