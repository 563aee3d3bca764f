"""The `mnistlab` command as a user meets it: the in-process entry point, and a real process where that matters."""

from __future__ import annotations

import json
import subprocess
import sys
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
