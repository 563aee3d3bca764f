"""The `mnistlab` command as a user meets it: the in-process entry point, and a real process where that matters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, cli, one_line_error, run_cli
from mnistlab.cli import main
from mnistlab.errors import UserError
from test_model import REFERENCE

EXP = str(ROOT / "experiments" / "eva4-s4.yaml")


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
    assert "params 12,400 | best validation" in out and "s/epoch" in out
    figures = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert figures["epochs_run"] == 1 and figures["best_val_acc"] > 50
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc") and len(rows) == 2
    assert "batch_size: 64" in (tmp_path / "run" / "config.yaml").read_text()


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
])
def test_mask_hides_every_credential_form(url: str) -> None:
    from mnistlab.tracking import mask

    assert "S3cr" not in mask(url) and "***" in mask(url)
    assert "S3cr" not in mask(f"error: cannot open {url} (details)")


def test_mask_hides_secrets_from_the_environment_and_pieces_of_a_password(monkeypatch: pytest.MonkeyPatch) -> None:
    from mnistlab.tracking import mask

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
    ("--storage", "postgresql://u@db:port/optuna", "not a valid URL (Port could not be cast"),
    ("--tracking-uri", "http://[::1:5000", "tracking URI 'http://[::1:5000': not a valid URL"),
])
def test_a_malformed_url_is_one_line(capsys: pytest.CaptureFixture, tmp_path: Path, flag: str, url: str,
                                     message: str) -> None:
    code, _, err = cli(capsys, "study", "run", str(ROOT / "studies" / "smoke.yaml"), flag, url)
    one_line_error(code, err, message)
    assert list(tmp_path.iterdir()) == []


def test_ui_warns_only_beyond_loopback_without_a_login() -> None:
    from mnistlab.tracking import exposure_warning

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
