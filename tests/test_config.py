"""Configs: every shipped file parses; bad input names the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from mnistlab import config, space
from mnistlab.errors import UserError


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_experiment_parses(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.name == path.stem  # its MLflow experiment and run folders: named as the file, not the default
    logged = cfg.to_dict()
    written = yaml.safe_load(path.read_text())
    for section, values in written.items():  # every value the file sets arrives unchanged, none dropped
        shown = {k: logged[section][k] for k in values} if isinstance(values, dict) else logged[section]
        assert shown == values, section
    assert config.from_dict(logged) == cfg  # round trip through the logged form


@pytest.mark.parametrize("path", sorted((ROOT / "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_study_maps_onto_real_fields(path: Path) -> None:
    study = space.load_study(path)
    assert study.space
    for p in study.space:
        config.check_path(p.name)  # a real field, spelled canonically
        assert p.name == config.canonical(p.name)
    assert study.smallest_params() <= study.max_params


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("model: {widht: 3}", "unknown key 'model.widht'"),
    ("trian: {}", "unknown key 'trian'"),
    ("train: {epochs: two}", "train.epochs must be an integer"),
    ("train: {epochs: -1}", "train.epochs must be >= 1"),
    ("train: {lr: true}", "train.lr must be a number"),
    ("model: {widths: [8, 8]}", "model.paddings has 6 entries but model.widths has 2"),
    ("model: {widths: 16}", "model.widths must be a list"),
    ("model: {head: mlp}", "model.head must be one of conv_gap, gap_conv, gap_linear"),
    ("model: {dropout: 1.5}", "model.dropout must be in [0, 1)"),
    ("train: {device: tpu}", "train.device must be auto, cpu, cuda or cuda:N"),
    ("model: [1, 2", "malformed YAML"),
    ("- 1\n- 2", "expected a mapping"),
])
def test_bad_experiment_files_name_the_culprit(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(UserError) as err:
        config.load(path)
    assert message in str(err.value)
    assert str(path) in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_file() -> None:
    with pytest.raises(UserError, match="nope.yaml: no such file"):
        config.load("nope.yaml")


def test_overrides_use_the_dotted_names(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x")
    cfg = config.load(path, ["train.lr=0.02", "model.widths.3=20", "model.widths[0]=12", "data.augment=true"])
    assert cfg.train.lr == 0.02
    assert cfg.model.widths == (12, 32, 8, 20, 16, 16)
    assert cfg.data.augment is True
    with pytest.raises(UserError, match="unknown config name 'train.lrr'"):
        config.load(path, ["train.lrr=1"])
    with pytest.raises(UserError, match="index 9 out of range"):
        config.load(path, ["model.widths.9=1"])
    with pytest.raises(UserError, match="expected key=value"):
        config.load(path, ["train.lr"])


def test_one_spelling_for_indexed_names() -> None:
    assert config.canonical("model.widths[3]") == "model.widths.3"
    assert config.canonical("model.widths.3") == "model.widths.3"
    with pytest.raises(UserError):
        config.canonical("model.widths[x]")
