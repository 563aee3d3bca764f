"""`mnistlab best` and `--export`: the pick rules, every format re-measured, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from conftest import ROOT, cli, one_line_error, run_cli, wait_until
from mnistlab.best import export, picks
from mnistlab.core import data
from mnistlab.search.storage import load, open_storage
from mnistlab.util.errors import Interrupted, UserError

SMOKE = ROOT / "studies" / "smoke.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, mnist_cache: Path) -> dict[str, Path | str]:
    """A short real study (2 trained trials of 1 epoch) with its stores, exported once."""
    root = tmp_path_factory.mktemp("finished")
    env = {"MNISTLAB_DATA_DIR": str(mnist_cache), "MNISTLAB_STORAGE": f"sqlite:///{root / 'optuna.db'}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    common = ["--artifacts", str(root / "artifacts")]
    proc = run_cli("study", "run", str(SMOKE), "--n-trials", "2", "--epochs", "1", "--limit-train", "1000",
                   "--limit-eval", "500", *common, env=env, cwd=root)  # MLflow's artifacts go to root/mlruns
    assert proc.returncode == 0, proc.stderr
    out = root / "export"
    proc = run_cli("best", str(SMOKE), "--export", str(out), env=env)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "export": out, "stdout": proc.stdout, **env}


def env_of(finished: dict) -> dict[str, str]:
    return {k: str(v) for k, v in finished.items() if k.isupper()}


@pytest.mark.slow
def test_export_writes_every_format_verified(finished: dict) -> None:
    out = finished["export"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model.safetensors", "model.torchscript.pt", "model.onnx", "config.json", "MODEL_CARD.md",
         "learning_curves.png"])
    info = json.loads((out / "config.json").read_text())
    s = load("smoke", open_storage(finished["MNISTLAB_STORAGE"], heartbeat=None))
    best = max((t for t in s.trials if t.state == TrialState.COMPLETE), key=lambda t: t.user_attrs["best_val_acc"])
    assert info["trial"] == best.number and info["study"] == "smoke"
    assert info["mlflow_run_id"] == best.user_attrs["mlflow_run_id"]
    assert info["params"] == best.user_attrs["param_count"] and info["val_acc"] == best.user_attrs["best_val_acc"]
    assert info["test_images"] == 10_000 and 20.0 < info["test_acc"] <= 100.0
    assert info["versions"]["onnxruntime"] and info["config"]["model"]["widths"]
    card = (out / "MODEL_CARD.md").read_text()
    assert f"{info['test_acc']:.2f}%" in card and "learning_curves.png" in card and "Conv2d-1" in card
    assert f"test accuracy {info['test_acc']:.2f}%" in finished["stdout"]
    assert "registered models:/smoke@best" in finished["stdout"]
    assert f"widths:          {info['config']['model']['widths']}" in finished["stdout"]
    assert f"MLflow run:      {info['mlflow_run_id']}" in finished["stdout"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".export.")]  # no temporary left


@pytest.mark.slow
def test_an_export_gets_ordinary_permissions_from_the_umask(finished: dict) -> None:
    out = finished["export"]
    umask = os.umask(0)
    os.umask(umask)  # the one the export subprocess inherited
    modes = {p.name: p.stat().st_mode & 0o777 for p in [out, *out.iterdir()]}
    assert modes == {out.name: 0o777 & ~umask, **{p.name: 0o666 & ~umask for p in out.iterdir()}}


LOADER = r"""
import json, sys
import numpy as np
folder, cache = sys.argv[1], sys.argv[2]
with np.load(cache) as z:
    x = z["test_x"].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    y = z["test_y"]
acc = {}
import onnxruntime as ort
session = ort.InferenceSession(f"{folder}/model.onnx")
acc["onnx"] = float((session.run(None, {"images": x})[0].argmax(1) == y).mean())
import torch
script = torch.jit.load(f"{folder}/model.torchscript.pt").eval()
with torch.inference_mode():
    acc["torchscript"] = float((script(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
from safetensors.torch import load_file
from mnistlab.core.config import from_dict
from mnistlab.core.model import build_model
net = build_model(from_dict(json.load(open(f"{folder}/config.json"))["config"]).model)
net.load_state_dict(load_file(f"{folder}/model.safetensors"))
with torch.inference_mode():
    acc["safetensors"] = float((net.eval()((torch.from_numpy(x) - 0.1307) / 0.3081).argmax(1).numpy() == y).mean())
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("mnistlab", "optuna", "mlflow"))
print(json.dumps({"acc": acc, "loaded": loaded}))
"""


@pytest.mark.slow
def test_each_file_loads_in_a_fresh_process_without_the_training_code(finished: dict, data_dir: Path) -> None:
    out = finished["export"]
    proc = subprocess.run([sys.executable, "-c", LOADER, str(out), str(data_dir / "mnist-uint8.npz")],
                          capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    recorded = json.loads((out / "config.json").read_text())["test_acc"]
    assert {k: round(100 * v, 4) for k, v in result["acc"].items()} == {
        "onnx": recorded, "torchscript": recorded, "safetensors": recorded}
    training = ("mnistlab.core.train", "mnistlab.search.runner", "mnistlab.search.objective")
    assert not [m for m in result["loaded"] if m in training]
    assert not [m for m in result["loaded"] if m.startswith(("optuna", "mlflow"))]


@pytest.mark.slow
def test_the_registry_alias_resolves_and_predicts_digits(finished: dict, data_dir: Path) -> None:
    script = r"""
import json, sys
import mlflow, numpy as np
model = mlflow.pyfunc.load_model("models:/smoke@best")
with np.load(sys.argv[1]) as z:
    x = z["test_x"][:300].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
digits = model.predict(x)
print(json.dumps({"digits": digits.tolist(), "mnistlab": [m for m in sys.modules if m.startswith("mnistlab")]}))
"""
    proc = subprocess.run([sys.executable, "-c", script, str(data_dir / "mnist-uint8.npz")], capture_output=True,
                          text=True, env={**os.environ, **env_of(finished)})
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import numpy as np
    import onnxruntime as ort

    with np.load(data_dir / "mnist-uint8.npz") as z:
        x = z["test_x"][:300].reshape(-1, 1, 28, 28).astype(np.float32) / 255.0
    session = ort.InferenceSession(str(finished["export"] / "model.onnx"))
    assert result["digits"] == session.run(None, {"images": x})[0].argmax(1).tolist()
    assert set(result["digits"]) <= set(range(10)) and result["mnistlab"] == []  # serving needs no mnistlab


@pytest.mark.slow
def test_evaluate_re_measures_and_refuses_an_altered_export(finished: dict, tmp_path: Path) -> None:
    proc = run_cli("evaluate", str(finished["export"]), env=env_of(finished))
    recorded = json.loads((finished["export"] / "config.json").read_text())["test_acc"]
    assert proc.returncode == 0, proc.stderr
    assert f"onnx: {recorded:.2f}%" in proc.stdout and f"matches the recorded {recorded:.2f}%" in proc.stdout
    copy = tmp_path / "copy"
    shutil.copytree(finished["export"], copy)
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0x01  # one flipped bit in the last tensor
    weights.write_bytes(bytes(raw))
    proc = run_cli("evaluate", str(copy), env=env_of(finished))
    assert proc.returncode == 2 and "checksum does not match config.json" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_evaluate_loads_torchscript_only_from_a_trusted_folder(finished: dict, tmp_path: Path) -> None:
    """A TorchScript file is code: a folder from elsewhere is measured from its weights and its ONNX graph."""
    copy = tmp_path / "copy"
    shutil.copytree(finished["export"], copy)
    script = copy / "model.torchscript.pt"
    script.write_bytes(b"PK\x03\x04 not what it claims to be")  # its checksum recorded, as a crafted file's would be
    info = json.loads((copy / "config.json").read_text())
    info["files"]["model.torchscript.pt"] = data.sha256(script)
    (copy / "config.json").write_text(json.dumps(info))
    proc = run_cli("evaluate", str(copy), env=env_of(finished))
    assert proc.returncode == 0, proc.stderr
    assert "torchscript:" not in proc.stdout and "safetensors:" in proc.stdout and "onnx:" in proc.stdout
    assert "model.torchscript.pt not loaded" in proc.stdout and "--trusted" in proc.stdout
    proc = run_cli("evaluate", str(copy), "--trusted", env=env_of(finished))
    assert proc.returncode == 2 and "cannot load the model" in proc.stderr, proc.stdout + proc.stderr
    proc = run_cli("evaluate", str(finished["export"]), "--trusted", env=env_of(finished))
    assert proc.returncode == 0 and "torchscript:" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_evaluate_checks_every_model_file_and_only_the_exports_own(finished: dict, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("not part of the export")
    copy = tmp_path / "copy"
    shutil.copytree(finished["export"], copy)
    info = json.loads((copy / "config.json").read_text())
    own = info["files"]
    digest = data.sha256(outside)
    no_acc = {k: v for k, v in info.items() if k != "test_acc"}
    cases = [({**info, "files": {**own, "../outside.txt": digest}}, "files lists '../outside.txt', not a file of"),
             ({**info, "files": {**own, str(outside): digest}}, "not a file of an export"),
             ({**info, "files": {}}, "files lacks model.safetensors"),
             ({**info, "files": {k: v for k, v in own.items() if k != "model.onnx"}}, "files lacks model.onnx"),
             (no_acc, "test_acc must be a number; got None"), ({**info, "test_acc": "99"}, "got '99'")]
    for content, message in cases:
        (copy / "config.json").write_text(json.dumps(content))
        proc = run_cli("evaluate", str(copy), env=env_of(finished))
        assert proc.returncode == 2 and message in proc.stderr, proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    (copy / "config.json").write_text(json.dumps(info))
    (copy / "model.onnx").unlink()
    (copy / "model.onnx").symlink_to(finished["export"] / "model.onnx")
    proc = run_cli("evaluate", str(copy), env=env_of(finished))
    assert proc.returncode == 2 and "model.onnx: is a symbolic link" in proc.stderr, proc.stderr


@pytest.mark.parametrize(("content", "message"), [
    ([1, 2], "expected a JSON object"),
    ({"format": "mnistlab-export/1", "test_acc": 99.0, "files": ["model.onnx"]}, "files must map each model file"),
    ({"format": "mnistlab-export/1", "files": {}}, "test_acc must be a number; got None"),
    ({"format": "mnistlab-export/1", "test_acc": "99", "files": {}}, "test_acc must be a number; got '99'"),
    ({"format": "mnistlab-export/1", "test_acc": float("nan"), "files": {}}, "test_acc must be a number"),
    ({"format": ["x" * 10_000], "test_acc": 1, "files": {}}, "format ['xxx"),
])
def test_evaluate_on_a_malformed_config_json_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                         content: object, message: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps(content))
    code, _, err = cli(capsys, "evaluate", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and len(err) < 600


@pytest.mark.slow
def test_export_refuses_a_non_empty_folder_and_an_unwritable_one(finished: dict, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    proc = run_cli("best", str(SMOKE), "--export", str(taken), "--no-register", env=env_of(finished))
    assert proc.returncode == 2 and "not empty (use --force" in proc.stderr
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    proc = run_cli("best", str(SMOKE), "--export", "/proc/mnistlab-export", "--no-register", env=env_of(finished))
    assert proc.returncode == 2 and "/proc/mnistlab-export" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_an_export_to_register_in_a_store_without_the_study_writes_nothing(finished: dict, tmp_path: Path,
                                                                          mlflow_db: str) -> None:
    """The store is checked before the export is written (it once was written, then the command failed)."""
    out = tmp_path / "out"
    proc = run_cli("best", str(SMOKE), "--export", str(out), env={**env_of(finished), "MLFLOW_TRACKING_URI": mlflow_db})
    assert proc.returncode == 2 and "has no run of study 'smoke'" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()


def files_under(root: Path) -> set[str]:
    """Every file and folder under ``root`` (SQLite's transient -wal/-shm files aside)."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.name.endswith(("-wal", "-shm"))}


@pytest.mark.slow
@pytest.mark.usefixtures("data_dir")
def test_force_replaces_an_earlier_export_and_nothing_else(finished: dict, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    env = copy_study(finished, tmp_path)
    root = Path(env["root"])
    earlier = tmp_path / "earlier"
    shutil.copytree(finished["export"], earlier)
    (tmp_path / "link").symlink_to(earlier, target_is_directory=True)
    mixed = tmp_path / "mixed"  # an export with a file of the user's beside it
    shutil.copytree(finished["export"], mixed)
    (mixed / "notes.txt").write_text("mine")
    before = files_under(tmp_path)
    s = load("smoke", open_storage(env["MNISTLAB_STORAGE"], heartbeat=None))
    choice = picks.pick(s, ("val_acc",))
    monkeypatch.chdir(root)
    for target in (root, Path("."), tmp_path, root / "artifacts", root / "mlruns", tmp_path / "link", mixed):
        with pytest.raises(UserError, match="^export folder .*(--force replaces only|symbolic link)"):
            export.export(choice, s, target, force=True)
    assert files_under(tmp_path) == before
    for target in (".", "artifacts", str(tmp_path / "link")):
        proc = run_cli("best", str(SMOKE), "--export", target, "--force", "--no-register", env=env, cwd=root)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.startswith("error: export folder") and len(proc.stderr.strip().splitlines()) == 1
    assert files_under(tmp_path) == before
    proc = run_cli("best", str(SMOKE), "--export", str(earlier), "--force", "--no-register", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((earlier / "config.json").read_text())["exported_at"] != json.loads(
        (finished["export"] / "config.json").read_text())["exported_at"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".earlier.")]  # no temporary left


@pytest.mark.slow
def test_a_stop_inside_torchs_exporter_ends_the_export_as_a_stop(finished: dict, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGTERM delivered while torch's ONNX exporter traces the network (a global forward
    pre-hook sends it once torch says it is exporting): the export ends as the user's stop, its
    temporary folder removed, the target untouched; not as an export error with a traceback."""
    import torch

    env = copy_study(finished, tmp_path)
    monkeypatch.setenv("MNISTLAB_DATA_DIR", env["MNISTLAB_DATA_DIR"])
    s = load("smoke", open_storage(env["MNISTLAB_STORAGE"], heartbeat=None))
    choice = picks.pick(s, ("val_acc",))
    out = tmp_path / "out"
    sent: list[str] = []

    def inside_the_exporter(module: torch.nn.Module, args: tuple) -> None:
        if torch.compiler.is_exporting() and not sent:
            sent.append(type(module).__name__)
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(inside_the_exporter)
    try:
        with pytest.raises(Interrupted) as stopped:
            export.export(choice, s, out)
    finally:
        hook.remove()
    assert sent and stopped.value.signame == "SIGTERM"
    assert not getattr(stopped.value, "exported", None)
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())  # no temporary folder left
    assert signal.getsignal(signal.SIGTERM) is before  # the export's handler is gone again


def copy_study(finished: dict, tmp_path: Path) -> dict[str, str]:
    """The finished study's stores and checkpoints, copied so a test may damage them."""
    root = tmp_path / "stores"
    shutil.copytree(finished["root"], root, ignore=shutil.ignore_patterns("export"))
    import sqlite3

    # Point each trial's checkpoint_dir at the copy (Optuna does not edit finished trials).
    with sqlite3.connect(root / "optuna.db") as con:
        rows = con.execute("SELECT trial_id, value_json FROM trial_user_attributes WHERE key = 'checkpoint_dir'")
        for trial_id, value in rows.fetchall():
            moved = json.loads(value).replace(str(finished["root"]), str(root))
            con.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = "
                        "'checkpoint_dir'", (json.dumps(moved), trial_id))
    with sqlite3.connect(root / "mlflow.db") as con:  # and MLflow's artifact locations
        for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri")):
            con.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (str(finished["root"]), str(root)))
    return {"MNISTLAB_STORAGE": f"sqlite:///{root / 'optuna.db'}",
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "MNISTLAB_DATA_DIR": str(finished["MNISTLAB_DATA_DIR"]), "root": str(root)}


def best_checkpoint(env: dict[str, str]) -> tuple[Path, str]:
    s = load("smoke", open_storage(env["MNISTLAB_STORAGE"], heartbeat=None))
    best = max((t for t in s.trials if t.state == TrialState.COMPLETE), key=lambda t: t.user_attrs["best_val_acc"])
    return Path(best.user_attrs["checkpoint_dir"]), best.user_attrs["mlflow_run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["bitflip", "truncate", "zero"])
def test_a_corrupt_checkpoint_is_refused_and_nothing_is_written(finished: dict, tmp_path: Path, damage: str) -> None:
    env = copy_study(finished, tmp_path)
    folder, _ = best_checkpoint(env)
    weights = folder / "best.safetensors"
    raw = bytearray(weights.read_bytes())
    if damage == "bitflip":
        raw[len(raw) // 2] ^= 0x10
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(len(raw))
    weights.write_bytes(bytes(raw))
    out = tmp_path / "out"
    proc = run_cli("best", str(SMOKE), "--export", str(out), "--no-register", env=env)
    assert proc.returncode == 2 and "best.safetensors" in proc.stderr and "checksum" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.slow
def test_weights_that_do_not_fit_their_config_are_refused(finished: dict, tmp_path: Path) -> None:
    env = copy_study(finished, tmp_path)
    folder, _ = best_checkpoint(env)
    meta = json.loads((folder / "best.json").read_text())
    meta["config"]["model"]["widths"][5] += 2  # the recorded checksum still matches the weights
    (folder / "best.json").write_text(json.dumps(meta))
    proc = run_cli("best", str(SMOKE), "--export", str(tmp_path / "out"), "--no-register", env=env)
    assert proc.returncode == 2 and "best.json: its config has" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_missing_local_checkpoint_comes_from_mlflow_and_a_missing_one_everywhere_is_refused(
        finished: dict, tmp_path: Path) -> None:
    env = copy_study(finished, tmp_path)
    folder, run_id = best_checkpoint(env)
    shutil.rmtree(folder)  # as on another machine
    proc = run_cli("best", str(SMOKE), "--export", str(tmp_path / "out"), "--no-register", env=env)
    assert proc.returncode == 0, proc.stderr
    recorded = json.loads((finished["export"] / "config.json").read_text())["test_acc"]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["test_acc"] == recorded
    stored = list(Path(env["root"]).rglob(f"{run_id}/artifacts/checkpoints"))
    assert stored
    for artifact in stored:
        shutil.rmtree(artifact)
    proc = run_cli("best", str(SMOKE), "--export", str(tmp_path / "out2"), "--no-register", env=env)
    assert proc.returncode == 2 and "checkpoint missing" in proc.stderr, proc.stderr
    assert not (tmp_path / "out2").exists()


@pytest.mark.slow
def test_a_failing_export_leaves_no_folder(finished: dict, tmp_path: Path) -> None:
    """The test set cannot be read half-way through the export: no folder, no temporary."""
    bad_cache = tmp_path / "bad-cache"
    bad_cache.mkdir()
    shutil.copy(Path(finished["MNISTLAB_DATA_DIR"]) / "manifest.json", bad_cache / "manifest.json")
    (bad_cache / "mnist-uint8.npz").write_bytes(b"not an archive")
    proc = run_cli("best", str(SMOKE), "--export", str(tmp_path / "out"), "--no-register",
                   env={**env_of(finished), "MNISTLAB_DATA_DIR": str(bad_cache)})
    assert proc.returncode == 2 and "checksum mismatch" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-cache"]


def start_export(finished: dict, out: Path) -> tuple[subprocess.Popen, Path]:
    """`mnistlab best --export OUT` in a process of its own, once its temporary folder exists."""
    proc = subprocess.Popen([sys.executable, "-m", "mnistlab", "best", str(SMOKE), "--export", str(out),
                             "--no-register"], env={**os.environ, **env_of(finished)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = wait_until("the export's temporary folder", lambda: sorted(out.parent.glob(f".{out.name}.*.partial")),
                         120, proc)
    return proc, partial[0]


@pytest.mark.slow
def test_an_interrupted_export_leaves_no_temporary_folder(finished: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, partial = start_export(finished, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [f"interrupted by SIGTERM: nothing exported, {out} is as it was"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no DIR, no .out.*.partial
    proc, partial = start_export(finished, out)
    proc.kill()  # SIGKILL: nothing can clean up; the next export into the same folder does
    proc.wait()
    assert partial.is_dir()
    live = Path(tempfile.mkdtemp(prefix=export._partial_prefix(out), suffix=".partial", dir=tmp_path))
    others = [tmp_path / ".out.old-style.partial", tmp_path / f".other.{partial.name[len('.out.'):]}"]
    for folder in others:
        folder.mkdir()
    done = run_cli("best", str(SMOKE), "--export", str(out), "--no-register", env=env_of(finished))
    assert done.returncode == 0, done.stderr
    assert not partial.exists()  # its process is dead
    assert live.is_dir() and all(f.is_dir() for f in others)  # a running export's, another DIR's, older names
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", live.name, *(f.name for f in others)])


def recorded_study(tmp_path: Path, records: list[tuple[float, int]], objectives: int = 2) -> optuna.Study:
    """A study holding finished trials with given (validation accuracy, params): a unit-test fixture."""
    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="r",
                            directions=["maximize", "minimize"][:objectives])
    s.set_user_attr("max_params", 20_000)
    for acc, size in records:
        s.add_trial(optuna.trial.create_trial(
            values=[acc, size][:objectives], user_attrs={"best_val_acc": acc, "param_count": size, "trained": True}))
    return s


def test_pick_rules_for_two_objectives(tmp_path: Path) -> None:
    s = recorded_study(tmp_path, [(99.45, 12_400), (99.41, 7_800), (99.30, 5_000), (99.20, 6_000), (99.50, 19_000)])
    both = ("val_acc", "params")
    assert picks.pick(s, both, min_accuracy=99.4).trial.number == 1  # fewest params at >= 99.4
    assert picks.pick(s, both, max_params=13_000).trial.number == 0  # most accurate under 13k
    plain = picks.pick(s, both)
    assert plain.trial.number == 4 and [t.number for t in plain.front] == [2, 1, 0, 4]  # trial 3 is dominated
    assert "Pareto front" in picks.describe(plain)
    with pytest.raises(UserError, match=r"no completed trial reaches 99.6% .* \(the best is 99.50%\)"):
        picks.pick(s, both, min_accuracy=99.6)
    with pytest.raises(UserError, match="at most 4,000 params"):
        picks.pick(s, both, max_params=4_000)


def test_pick_one_objective_and_no_completed_trials(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    s = recorded_study(tmp_path, [(99.1, 9_000), (99.3, 15_000), (99.3, 11_000)], objectives=1)
    assert picks.pick(s, ("val_acc",)).trial.number == 2  # a tie goes to the smaller network
    empty = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}", study_name="e")
    with pytest.raises(UserError, match="no completed trials"):
        picks.pick(empty, ("val_acc",))
    code, _, err = cli(capsys, "best", "--name", "e", "--storage", f"sqlite:///{tmp_path / 'e.db'}")
    one_line_error(code, err, "study 'e' has no completed trials")
    code, _, err = cli(capsys, "best", "--name", "missing", "--storage", f"sqlite:///{tmp_path / 'e.db'}")
    one_line_error(code, err, "no study named 'missing'")


def test_the_model_card_names_the_score_that_picked_the_model() -> None:
    """The card says what the validation score is: the last epoch's accuracy (trials.trial_score),
    a seed mean when the configuration was repeated."""
    from mnistlab.best import card
    from mnistlab.core import config

    cfg = config.load(ROOT / "experiments" / "eva4-s4.yaml")
    info = {"study": "s", "trial": 3, "params": 12_400, "picked_by": "highest validation score",
            "val_score": 99.41, "val_score_se": 0.08, "val_seeds": 2, "test_acc": 99.4, "test_images": 10_000,
            "trial_test_acc": 99.4, "trial_test_images": 10_000, "git_commit": "abc", "mlflow_run_id": "r"}
    text = card.model_card(info, cfg, {"safetensors": 99.4}, curves=False)
    assert ("| validation score | 99.41% ± 0.08 (the last epoch's accuracy on 10,000 images, mean of 2 seeds; "
            "what picked it) |") in text
    assert "mean of the last epochs" not in text


def _card_info(cfg_search, refit_cfg, refit: bool) -> dict:
    """An export's config.json fields that MODEL_CARD.md reads, with the image counts of ``cfg_search``."""
    from mnistlab.core.model import count_params

    return {
        "study": "cards", "trial": 7, "params": count_params(cfg_search.model), "picked_by": "the best score",
        "val_score": 99.1, "val_score_se": 0.09, "val_seeds": 1, "test_acc": 99.2, "test_images": 10_000,
        "trial_test_acc": 98.9, "trial_test_images": data.image_counts(cfg_search.data)["test"],
        "mlflow_run_id": "r", "git_commit": "c",
        "refit": {"seeds": [7, 8], "test_acc": {"7": 99.0, "8": 99.1}, "test_acc_mean": 99.05, "test_acc_std": 0.07,
                  "test_acc_min": 99.0, "exported_seed": 7} if refit else None,
        "images": {"search": data.image_counts(cfg_search.data),
                   "refit": data.image_counts(refit_cfg.data) if refit else None},
    }


@pytest.mark.parametrize("limited", [True, False], ids=["limited-data", "full-data"])
def test_the_model_card_states_the_images_each_figure_counts(limited: bool) -> None:
    """MODEL_CARD.md for a study that limits its data (as smoke.yaml: 2,000 / 1,000) and one that does
    not: every count it states is the config's, and two test figures on different sets say why."""
    from mnistlab.best.card import model_card
    from mnistlab.best.refit import refit_config
    from mnistlab.core.config import load as load_experiment

    limits = ["data.limit_train=2000", "data.limit_eval=1000"] if limited else []
    search = load_experiment(ROOT / "experiments" / "eva4-s4.yaml", limits)
    refit = refit_config(search, 7)
    card = model_card(_card_info(search, refit, True), refit, {"safetensors": 99.2}, curves=False)
    text = " ".join(card.split())
    if limited:
        assert "validation on the first 1,000 of the 10,000 validation images" in text
        assert "had trained on the first 2,000 of the 50,000 training images" in text
        assert ("trained again on the first 2,000 of the 60,000 training images (training and validation "
                "together)") in text
        assert "each refit read the first 1,000 of the 10,000 test images once" in text
        assert "The refit's figures count 1,000 test images" in text and "on 10,000: the two differ" in text
        assert "(seed 7: 99.00%, seed 8: 99.10%), on 1,000 images |" in text
    else:
        assert "validation on all 10,000 validation images" in text
        assert "had trained on all 50,000 training images" in text
        assert "trained again on all 60,000 training images (training and validation together)" in text
        assert "each refit read all 10,000 test images once" in text and "differ by" not in text
    assert "all training images" not in text and "the last 10,000 training images)" not in text
    trial_card = " ".join(model_card(_card_info(search, refit, False), search, {"safetensors": 99.2}, False).split())
    counted = "1,000" if limited else "10,000"
    assert f"| test accuracy recorded by the trial | 98.9% on {counted} images |" in trial_card
    assert ("The trial's own test figure counts 1,000 test images" in trial_card) == limited
