"""The trainer: learns, checkpoints atomically, resumes to the same weights on the CPU."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli
from mnistlab.core import checkpoint, config, data
from mnistlab.core.train import EpochMetrics, train
from mnistlab.util import interrupts
from mnistlab.util.errors import Interrupted, UserError

EXP = ROOT / "experiments" / "eva4-s4.yaml"


def small(*overrides: str) -> config.ExperimentConfig:
    return config.load(EXP, ["data.limit_train=3000", "data.limit_eval=1000", "train.batch_size=64",
                             "train.lr=0.05", *overrides])


def test_one_epoch_on_a_subset_learns(data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = small("train.epochs=1", "data.limit_train=2000")
    seen: list[EpochMetrics] = []
    result = train(cfg, data.load(cfg.data, "cpu", data_dir), seen.append, checkpoint_dir=tmp_path / "ck")
    assert [m.epoch for m in seen] == [1]
    assert result.best_val_acc > 50.0  # chance is 10%
    assert result.test_acc > 50.0 and result.test_total == 1000
    assert result.params == 12_400 and result.device == "cpu"
    out = capsys.readouterr().out
    assert f"Validation: Average loss: {seen[0].val_loss:.4f}, Accuracy: {seen[0].val_correct}/1000" in out
    assert "Test (best epoch 1): Average loss:" in out
    for name in ("last.pt", "last.pt.sha256", "best.safetensors", "best.json"):
        assert (tmp_path / "ck" / name).is_file()


def final_weights(directory: Path) -> dict[str, torch.Tensor]:
    return checkpoint.load_state(directory / "last.pt")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [["train.schedule=onecycle", "data.augment=true"],
                                    ["train.optimizer=adamw", "train.lr=0.003", "train.schedule=step",
                                     "train.step_epochs=1", "train.label_smoothing=0.1"]],
                         ids=["sgd-onecycle-augment", "adamw-step-smoothing"])
def test_resume_gives_the_same_final_weights(data_dir: Path, tmp_path: Path, recipe: list[str]) -> None:
    cfg = small("train.epochs=3", "data.limit_train=1200", *recipe)
    d = data.load(cfg.data, "cpu", data_dir)
    whole = train(cfg, d, checkpoint_dir=tmp_path / "whole", verbose=False)

    class Interrupt(Exception):
        pass

    def stop_after_two(m: EpochMetrics) -> None:
        if m.epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, d, stop_after_two, checkpoint_dir=tmp_path / "cut", verbose=False)
    resumed_epochs: list[int] = []
    again = train(cfg, d, lambda m: resumed_epochs.append(m.epoch), checkpoint_dir=tmp_path / "cut",
                  resume=True, verbose=False)
    assert resumed_epochs == [3]  # only the missing epoch ran
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m.val_acc for m in again.history] == [m.val_acc for m in whole.history]
    assert again.test_acc == whole.test_acc


def test_resume_refuses_a_checkpoint_of_another_config(data_dir: Path, tmp_path: Path) -> None:
    cfg = small("train.epochs=1", "data.limit_train=300")
    d = data.load(cfg.data, "cpu", data_dir)
    train(cfg, d, checkpoint_dir=tmp_path, verbose=False)
    other = config.replace(cfg, model={"dropout": 0.1}, train={"epochs": 2})
    with pytest.raises(UserError, match="checkpoint of a different config"):
        train(other, d, checkpoint_dir=tmp_path, resume=True, verbose=False)


def test_corrupt_checkpoints_are_detected_and_the_previous_one_used(data_dir: Path, tmp_path: Path) -> None:
    cfg = small("train.epochs=2", "data.limit_train=300")
    train(cfg, data.load(cfg.data, "cpu", data_dir), checkpoint_dir=tmp_path, verbose=False)
    last = tmp_path / "last.pt"
    raw = bytearray(last.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    last.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum does not match"):
        checkpoint.load_state(last)
    assert checkpoint.latest_good(tmp_path) == tmp_path / "prev.pt"
    assert checkpoint.load_state(tmp_path / "prev.pt")["epoch"] == 1


def test_full_train_reports_the_test_set_and_selects_nothing(data_dir: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = small("train.epochs=1", "data.full_train=true", "data.limit_train=500")
    result = train(cfg, data.load(cfg.data, "cpu", data_dir))
    assert result.history[0].eval_split == "test"
    assert result.best_epoch == 0  # no validation set, nothing chosen on test
    assert "Test: Average loss:" in capsys.readouterr().out


class _Killed(BaseException):
    """A process killed at this instant: nothing after it runs."""


def _checkpoints(directory: Path, epochs: range) -> None:
    for epoch in epochs:
        checkpoint.save_state(directory, {"epoch": epoch})


def test_a_kill_at_any_step_of_a_checkpoint_write_leaves_the_newest_whole_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Epoch 3's checkpoint is cut after each of its renames in turn (the sidecar's own write included):
    the folder then always holds a whole checkpoint, epoch 2's until epoch 3's file is in place."""
    real = os.replace
    for cut in range(6):
        folder = tmp_path / f"cut-{cut}"
        _checkpoints(folder, range(1, 3))
        calls: list[object] = []

        def replace(src: object, dst: object, cut: int = cut, calls: list[object] = calls) -> None:
            calls.append(dst)
            if len(calls) > cut:
                raise _Killed
            real(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        with contextlib.suppress(_Killed):
            checkpoint.save_state(folder, {"epoch": 3})
        monkeypatch.setattr(os, "replace", real)
        good = checkpoint.latest_good(folder)
        assert good is not None, (cut, sorted(p.name for p in folder.iterdir()))
        done = len(calls) <= cut  # not cut: epoch 3's file was renamed in, the last step (the commit)
        assert checkpoint.load_state(good)["epoch"] == (3 if done else 2), (cut, calls)
    assert len(calls) == 4  # the last cut came after every step: two sidecar/file moves, the sidecar, the file


def test_a_signal_inside_a_checkpoint_write_waits_until_it_is_in_place(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM landing between the renames of an epoch's checkpoint (found by a test that stopped a trial
    as soon as last.pt appeared, before its sidecar): raised once the checkpoint is whole."""
    _checkpoints(tmp_path, range(1, 3))
    real = os.replace

    def replace(src: object, dst: object) -> None:
        real(src, dst)
        if Path(str(dst)).name == "prev.pt":
            signal.raise_signal(signal.SIGTERM)  # handled (and held) before raise_signal returns

    previous = interrupts.stop_on_signals()
    try:
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Interrupted):
            checkpoint.save_state(tmp_path, {"epoch": 3})
    finally:
        monkeypatch.setattr(os, "replace", real)
        interrupts.restore(previous)
    assert checkpoint.latest_good(tmp_path) == tmp_path / "last.pt"
    assert checkpoint.load_state(tmp_path / "last.pt")["epoch"] == 3
    assert checkpoint.load_state(tmp_path / "prev.pt")["epoch"] == 2


class _Payload:
    """A pickle that runs code when loaded: what a tampered checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran"))


def test_a_malicious_pickle_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    last = tmp_path / "last.pt"
    torch.save({"epoch": 1, "evil": _Payload(marker)}, last)
    (tmp_path / "last.pt.sha256").write_text(data.sha256(last) + "\n")  # a tamperer rewrites the sidecar too
    with pytest.raises(UserError, match="unreadable checkpoint"):
        checkpoint.load_state(last)
    assert not marker.exists()


def test_train_refuses_an_existing_run_folder_without_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("an earlier run's config")
    (run / "checkpoints" / "last.pt").write_bytes(b"an earlier run's weights")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = cli(capsys, "train", str(EXP), "--epochs", "1", "--limit-train", "500", "--limit-eval", "200",
                       "--output", "run", "--no-track")
    assert code == 2 and err.startswith("error: run folder run: exists and is not empty (use --resume"), err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def rewrite(path: Path, content: bytes) -> None:
    """Replace a file and its SHA-256 sidecar together: the checksum matches, the content is bad."""
    path.write_bytes(content)
    (path.parent / (path.name + ".sha256")).write_text(data.sha256(path) + "\n")


@pytest.mark.slow
def test_a_zeroed_last_checkpoint_with_a_matching_sidecar_falls_back_to_prev(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = small("train.epochs=2", "data.limit_train=300")
    d = data.load(cfg.data, "cpu", data_dir)
    train(cfg, d, checkpoint_dir=tmp_path, verbose=False)
    rewrite(tmp_path / "last.pt", bytes((tmp_path / "last.pt").stat().st_size))
    epochs: list[int] = []
    train(cfg, d, lambda m: epochs.append(m.epoch), checkpoint_dir=tmp_path, resume=True)
    assert epochs == [2]  # resumed after epoch 1, from prev.pt
    out, err = capsys.readouterr()
    assert f"Resuming from {tmp_path / 'prev.pt'} after epoch 1" in out and err == ""


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["zeroed", "missing key"])
def test_no_usable_checkpoint_restarts_with_one_warning_line(data_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture, bad: str) -> None:
    cfg = small("train.epochs=2", "data.limit_train=300")
    d = data.load(cfg.data, "cpu", data_dir)
    train(cfg, d, checkpoint_dir=tmp_path, verbose=False)
    for name in ("last.pt", "prev.pt"):
        path = tmp_path / name
        if bad == "zeroed":
            rewrite(path, bytes(path.stat().st_size))
        else:  # checksum-valid, loads weights-only, lacks what a resume needs
            state = checkpoint.load_state(path)
            del state["optimizer"]
            torch.save(state, path)
            rewrite(path, path.read_bytes())
    capsys.readouterr()
    epochs: list[int] = []
    train(cfg, d, lambda m: epochs.append(m.epoch), checkpoint_dir=tmp_path, resume=True, verbose=False)
    assert epochs == [1, 2]  # from epoch 0, said so
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: no usable checkpoint (") and "epoch 0" in lines[0]
    assert "last.pt" in lines[0] and "prev.pt" in lines[0]


@pytest.mark.slow
def test_bad_best_weights_are_one_line(data_dir: Path, tmp_path: Path) -> None:
    cfg = small("train.epochs=1", "data.limit_train=300")
    train(cfg, data.load(cfg.data, "cpu", data_dir), checkpoint_dir=tmp_path, verbose=False)
    meta = tmp_path / "best.json"
    good = meta.read_text()
    meta.write_text("[1, 2]")
    with pytest.raises(UserError, match="best.json: expected a JSON object, got list"):
        checkpoint.load_best(tmp_path)
    weights = tmp_path / "best.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])  # a header length beyond the file
    meta.write_text(good.replace(json_sha(good), data.sha256(weights)))
    with pytest.raises(UserError, match="best.safetensors: unreadable safetensors file"):
        checkpoint.load_best(tmp_path)


@pytest.mark.slow
def test_non_finite_weights_or_garbage_figures_are_never_delivered(data_dir: Path, tmp_path: Path) -> None:
    """A checksum-valid best checkpoint with NaN weights, or a best.json whose epoch or val_acc is not a number,
    is refused by the weights an export takes (it once exported a 9.80% model and copied the garbage)."""
    import json

    import optuna
    from safetensors.torch import load_file, save_file

    from mnistlab.best import weights as weights_mod
    from mnistlab.core.model import count_params

    cfg = small("train.epochs=1", "data.limit_train=300")
    train(cfg, data.load(cfg.data, "cpu", data_dir), checkpoint_dir=tmp_path, verbose=False)
    trial = optuna.trial.create_trial(value=1.0, user_attrs={"checkpoint_dir": str(tmp_path),
                                                             "param_count": count_params(cfg.model)})
    weights_mod.trial_weights(trial, None, tmp_path)  # as trained: delivered
    meta_path, best = tmp_path / "best.json", tmp_path / "best.safetensors"
    good = json.loads(meta_path.read_text())
    for key, value in (("epoch", "1; rm -rf"), ("epoch", 1.5), ("val_acc", float("nan")), ("val_acc", 1e9)):
        meta_path.write_text(json.dumps({**good, key: value}))
        with pytest.raises(UserError, match=f"best.json: {key} is .*, not a valid"):
            weights_mod.trial_weights(trial, None, tmp_path)
    tensors = load_file(str(best))
    first = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, str(best))
    meta_path.write_text(json.dumps({**good, "sha256": data.sha256(best)}))  # the checksum matches
    with pytest.raises(UserError, match="weights hold NaN or infinite values"):
        weights_mod.trial_weights(trial, None, tmp_path)


def json_sha(text: str) -> str:
    import json

    return json.loads(text)["sha256"]


@pytest.mark.slow
def test_a_diverging_run_fails_with_its_reason_before_checkpointing(data_dir: Path, tmp_path: Path) -> None:
    from mnistlab.core.train import Diverged

    cfg = small("train.epochs=2", "data.limit_train=300", "train.lr=1.0e+30")
    with pytest.raises(Diverged, match="training diverged at epoch 1: the loss became nan"):
        train(cfg, data.load(cfg.data, "cpu", data_dir), checkpoint_dir=tmp_path, verbose=False)
    assert not (tmp_path / "last.pt").exists()  # no checkpoint of NaN weights


@pytest.fixture
def remote_copy(data_dir: Path, tmp_path: Path) -> tuple[config.ExperimentConfig, Path]:
    """A trial's checkpoint folder after 2 epochs, as a retry downloads it from MLflow."""
    cfg = small("train.epochs=2", "data.limit_train=300")
    train(cfg, data.load(cfg.data, "cpu", data_dir), checkpoint_dir=tmp_path / "remote", verbose=False)
    return cfg, tmp_path / "remote"


def test_a_retry_takes_a_newer_checkpoint_from_mlflow_into_an_empty_folder(
        remote_copy: tuple[config.ExperimentConfig, Path], tmp_path: Path) -> None:
    cfg, remote = remote_copy
    note = checkpoint.adopt(remote, tmp_path / "local", cfg.to_dict())
    assert note == "took the checkpoint after epoch 2 from MLflow"
    assert checkpoint.load_state(tmp_path / "local" / "last.pt")["epoch"] == 2
    weights, _ = checkpoint.load_best(tmp_path / "local")
    assert weights.keys() == checkpoint.load_best(remote)[0].keys()
    # taken again: the local folder is as new now, nothing changes and nothing is said
    assert checkpoint.adopt(remote, tmp_path / "local", cfg.to_dict()) == ""


def test_a_damaged_remote_last_checkpoint_falls_back_to_its_prev(
        remote_copy: tuple[config.ExperimentConfig, Path], tmp_path: Path) -> None:
    cfg, remote = remote_copy
    last = remote / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a send cut short
    note = checkpoint.adopt(remote, tmp_path / "local", cfg.to_dict())
    assert note.startswith("took the checkpoint after epoch 1 from MLflow (passed over: ")
    assert "checksum does not match" in note
    assert checkpoint.load_state(tmp_path / "local" / "last.pt")["epoch"] == 1


def test_remote_checkpoints_of_another_config_or_all_damaged_are_refused(
        remote_copy: tuple[config.ExperimentConfig, Path], tmp_path: Path) -> None:
    cfg, remote = remote_copy
    other = config.replace(cfg, model={"dropout": 0.1}).to_dict()
    note = checkpoint.adopt(remote, tmp_path / "local", other)
    assert note.startswith("no usable checkpoint in MLflow") and "checkpoint of a different config" in note
    assert not (tmp_path / "local").exists()  # nothing taken
    for name in ("last.pt", "prev.pt"):
        (remote / name).write_bytes(b"")
    note = checkpoint.adopt(remote, tmp_path / "local", cfg.to_dict())
    assert note.startswith("no usable checkpoint in MLflow") and not (tmp_path / "local").exists()


def test_a_remote_checkpoint_without_its_best_weights_is_not_taken(
        remote_copy: tuple[config.ExperimentConfig, Path], tmp_path: Path) -> None:
    cfg, remote = remote_copy
    (remote / "best.safetensors").write_bytes(b"not the weights")
    note = checkpoint.adopt(remote, tmp_path / "local", cfg.to_dict())
    assert note.startswith("MLflow's checkpoint (epoch 2) not taken") and not (tmp_path / "local").exists()


def test_a_local_checkpoint_as_new_as_the_remote_one_is_kept(
        remote_copy: tuple[config.ExperimentConfig, Path], tmp_path: Path, data_dir: Path) -> None:
    cfg, remote = remote_copy
    local = tmp_path / "local"
    train(cfg, data.load(cfg.data, "cpu", data_dir), checkpoint_dir=local, verbose=False)
    before = (local / "last.pt").read_bytes()
    assert checkpoint.adopt(remote, local, cfg.to_dict()) == ""
    assert (local / "last.pt").read_bytes() == before


def test_a_malicious_remote_checkpoint_is_never_unpickled(tmp_path: Path) -> None:
    marker, remote = tmp_path / "pwned", tmp_path / "remote"
    remote.mkdir()
    torch.save({"epoch": 9, "evil": _Payload(marker)}, remote / "last.pt")
    (remote / "last.pt.sha256").write_text(data.sha256(remote / "last.pt") + "\n")
    note = checkpoint.adopt(remote, tmp_path / "local", {})
    assert "unreadable checkpoint" in note and not marker.exists() and not (tmp_path / "local").exists()


@pytest.mark.slow
@pytest.mark.parametrize("lie", ["zeroed best claiming 99.99", "another config's best", "last.pt's figure"])
def test_a_checkpoint_whose_claims_its_weights_do_not_reproduce_is_set_aside(
        data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, lie: str) -> None:
    """Checksums pass (the liar writes them too); the re-measured validation accuracy does not."""
    import json

    from safetensors.torch import load_file, save_file

    from mnistlab.core.model import build_model
    from mnistlab.core.train import Restored, restore, unproven

    cfg = small("train.epochs=2", "data.limit_train=300", "data.limit_eval=500")
    d = data.load(cfg.data, "cpu", data_dir)
    train(cfg, d, checkpoint_dir=tmp_path, verbose=False)
    assert unproven(cfg, d, tmp_path) == ""  # as trained: believed
    meta_path, best = tmp_path / "best.json", tmp_path / "best.safetensors"
    meta = json.loads(meta_path.read_text())
    if lie == "zeroed best claiming 99.99":
        save_file({k: torch.zeros_like(v) for k, v in load_file(str(best)).items()}, str(best))
        meta["val_acc"] = 99.99
    elif lie == "another config's best":
        other = build_model(small("model.widths=[8,8,8,8,8,8]").model)
        save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(best))
    else:  # last.pt's history says epoch 2 scored what its weights do not
        state = checkpoint.load_state(tmp_path / "last.pt")
        state["history"][-1]["val_correct"] = 499
        state["history"][-1]["val_acc"] = 99.8
        torch.save(state, tmp_path / "last.pt")
        rewrite(tmp_path / "last.pt", (tmp_path / "last.pt").read_bytes())
    meta_path.write_text(json.dumps({**meta, "sha256": data.sha256(best)}))
    why = unproven(cfg, d, tmp_path)
    assert why and ("validation" in why or "does not fit" in why or "model weight" in why), why
    rng = torch.get_rng_state()
    capsys.readouterr()
    assert restore(cfg, d, tmp_path) == Restored()  # nothing is taken over: it starts from epoch 0
    assert torch.equal(rng, torch.get_rng_state())  # measuring drew nothing from the generator
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: checkpoint not believed (") and "epoch 0" in lines[0]
    assert not (tmp_path / "last.pt").exists() and (tmp_path / "refused" / "last.pt").is_file()
    epochs: list[int] = []
    train(cfg, d, lambda m: epochs.append(m.epoch), checkpoint_dir=tmp_path, resume=True, verbose=False)
    assert epochs == [1, 2]  # from the start
