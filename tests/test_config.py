"""Configs: every shipped file parses; bad input names the culprit."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from mnistlab.core import config
from mnistlab.search import study_file
from mnistlab.util.errors import UserError


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
    study = study_file.load_study(path)  # refuses a name that is no config field
    written = list(config.read_yaml(path)["space"])
    assert written == [p.name for p in study.space]  # the file itself spells every name canonically
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
    ("train: {device: tpu}", "train.device must be auto, cpu, cuda, cuda:N or mps"),
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


BOMB = "".join(f"{name}: &{name} [{', '.join([f'*{prev}' if prev else 'x'] * 9)}]\n"
               for prev, name in zip(["", "a", "b", "c", "d"], ["a", "b", "c", "d", "e"], strict=True))


@pytest.mark.parametrize(("text", "message"), [
    (b"name: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 6)"),
    (b"train: {lr: 0.1}\ntrain: {lr: 0.2}\n", "key 'train' appears twice in one mapping"),
    (b"train: {lr: 0.1, lr: 0.2}\n", "key 'lr' appears twice"),
    (b"train: {lr: .inf}\n", "'.inf' is not a finite number"),
    (b"train: {weight_decay: .nan}\n", "'.nan' is not a finite number"),
    (b"data: {rotate_deg: -.Inf}\n", "is not a finite number"),
    (b"train: {lr: 1" + b"0" * 400 + b"}\n", "train.lr must be a finite number"),
    (b"train: {seed: 1" + b"0" * 5000 + b"}\n", "Exceeds the limit"),
    ((BOMB + "model: {widths: *e}\n").encode(), "alias bomb"),
    (b"a: " + b"[" * 3000 + b"]" * 3000, "nested more than 50 levels deep"),
    (b"model: {width_mult: 1.0e+300}\n", "model.width_mult must be in (0, 4096]"),
    (b"model: {widths: [16, 32, 8, 16, 16, 4000], width_mult: 2.0}\n", "times model.width_mult must stay <= 4096"),
    (b"train: {threads: 1000000000}\n", "train.threads must be 0..1024"),
    (b"train: {seed: 1180591620717411303424}\n", "train.seed must be 0..2**63-1"),
    (b"model: {paddings: [0, 0, 0, 0, 0, 100000000]}\n", "model.paddings must be 0..64"),
], ids=lambda v: v[:40].decode("utf-8", "replace") if isinstance(v, bytes) else None)
def test_hostile_experiment_files_are_refused_in_bounded_lines(tmp_path: Path, text: bytes, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_bytes(text)
    with pytest.raises(UserError) as err:
        config.load(path)
    assert message in str(err.value), str(err.value)[:500]
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert len(str(err.value)) < len(str(path)) + 400  # a value is echoed in at most 200 characters


def test_an_alias_bomb_echoed_in_a_type_error_stays_short(tmp_path: Path) -> None:
    """Under the node limit an alias still expands; the error repeats at most 200 characters of it."""
    path = tmp_path / "exp.yaml"
    path.write_text("a: &a [" + ", ".join(["xxxxxxxxxx"] * 9) + "]\nb: &b [" + ", ".join(["*a"] * 9) + "]\n"
                    "name: [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n")  # 729 strings: under the limit
    with pytest.raises(UserError, match="unknown key 'a'"):
        config.load(path)
    path.write_text("a: &a [" + ", ".join(["xxxxxxxxxx"] * 9) + "]\nb: &b [" + ", ".join(["*a"] * 9) + "]\n")
    raw = config.read_yaml(path)
    with pytest.raises(UserError) as err:
        config.from_dict({"name": raw["b"]}, "exp.yaml")
    assert "name must be a string" in str(err.value) and len(str(err.value)) < 300


def test_an_oversized_file_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("name: x\n" + "# padding\n" * 200_000)
    with pytest.raises(UserError, match="larger than 1,000,000 bytes"):
        config.load(path)


def test_anchors_and_merge_keys_within_the_limits_still_work(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("train: &t {lr: 0.02, epochs: 2}\nname: exp\n")
    assert config.load(path).train.lr == 0.02
    raw = config.parse_yaml("base: &b {lr: 0.1, epochs: 2}\ntrain: {<<: *b, lr: 0.3}\n")
    assert raw["train"] == {"lr": 0.3, "epochs": 2}  # a merge key may be overridden: not a duplicate


def test_an_override_value_is_parsed_with_the_same_limits(tmp_path: Path) -> None:
    path = write(tmp_path, "name: x")
    with pytest.raises(UserError, match="override 'train.lr=.inf': refused.*not a finite number"):
        config.load(path, ["train.lr=.inf"])


def test_the_cli_flags_set_real_config_fields(tmp_path: Path) -> None:
    """config.FLAGS is the one map from a CLI flag to the dotted name it sets (`train`, `study run`)."""
    from mnistlab.cli import train_cmd
    from mnistlab.search import runner

    for name, dotted in config.FLAGS.items():
        config.check_path(dotted)
        assert name in train_cmd.__code__.co_varnames  # `mnistlab train --epochs ...` takes every one
    path = write(tmp_path, "name: x")
    cfg = config.resolve(path, ["train.epochs=5"], epochs=2, device="cpu", seed=None, limit_eval=7)
    assert (cfg.train.epochs, cfg.train.device, cfg.train.seed, cfg.data.limit_eval) == (2, "cpu", 1, 7)
    opts = runner.RunOptions(epochs=3, limit_train=64)
    assert opts.extra() == {"train.epochs": 3, "data.limit_train": 64}


@pytest.mark.parametrize(("text", "value"), [("1e-3", 0.001), ("5E-4", 0.0005), ("2e0", 2.0), ("+2.5e-2", 0.025),
                                             ("3.0e-1", 0.3)])
def test_numbers_in_exponent_notation_are_numbers_everywhere(tmp_path: Path, text: str, value: float) -> None:
    """YAML 1.1 reads 1e-3 as a string; mnistlab reads it as people write it, in files and overrides."""
    exp = tmp_path / "e.yaml"
    exp.write_text(f"name: e\ntrain: {{lr: {text}}}\n")
    assert config.load(exp).train.lr == value
    assert config.load(ROOT / "experiments" / "eva4-s4.yaml", [f"train.lr={text}"]).train.lr == value
    study = tmp_path / "s.yaml"
    study.write_text(f"name: s\nbase: {ROOT / 'experiments' / 'eva4-s4.yaml'}\nmax_params: 20000\n"
                     f"space:\n  train.lr: {{type: float, low: {text}, high: 10.0, log: true}}\n")
    assert study_file.load_study(study).space[0].low == value
    assert config.parse_yaml("-1e-3") == -0.001 and config.parse_yaml("1e") == "1e"  # a sign; not a number
