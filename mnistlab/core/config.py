"""Typed, frozen experiment configs and their loading from YAML.

One name per hyperparameter everywhere: the YAML key, the dataclass field, the Optuna
parameter and the MLflow param are the same dotted string (``model.dropout``,
``train.lr``, ``model.widths[3]``).

Over 350 lines on purpose: every field of the three config types sits beside its bounds and
its check, so a new hyperparameter is one field, one bound and one line of validation here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mnistlab.util.errors import UserError

Head = Literal["conv_gap", "gap_conv", "gap_linear"]


@dataclass(frozen=True)
class ModelConfig:
    """The network family: 3x3 conv blocks, one 1x1 transition + MaxPool(2), a head."""

    # Output channels of every body conv, in order; the 1x1 transition conv is one of them.
    widths: tuple[int, ...] = (16, 32, 8, 16, 16, 16)
    # Zero padding of each body conv (same length as widths); the reference pads conv 6 only.
    paddings: tuple[int, ...] = (0, 0, 0, 0, 0, 1)
    # 1-based index of the 1x1 transition conv; MaxPool(2) follows it. 0: no transition, no pool.
    pool_after: int = 3
    # Dropout2d probability after every conv block.
    dropout: float = 0.05
    # conv_gap: Conv(c->10, 3) then global average pool (the reference);
    # gap_conv: global average pool then Conv(c->10, 1); gap_linear: pool then Linear(c, 10).
    head: Head = "conv_gap"
    # Multiplies every width (rounded, at least 1): one knob for a study to scale the network.
    width_mult: float = 1.0
    # Conv biases; off because BatchNorm follows every trained conv.
    bias: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser, schedule and loop settings."""

    epochs: int = 19
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.01  # peak learning rate for onecycle
    momentum: float = 0.9  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0
    schedule: Literal["constant", "step", "onecycle"] = "constant"
    step_epochs: int = 6  # step schedule: epochs between decays
    gamma: float = 0.1  # step schedule: decay factor
    pct_start: float = 0.25  # onecycle: fraction of steps spent warming up
    label_smoothing: float = 0.0
    seed: int = 1
    device: str = "auto"  # auto (CUDA when present, else CPU), cpu, cuda, cuda:N
    amp: bool = True  # bfloat16 autocast; CUDA only
    compile: bool = False  # torch.compile the model (pays off over long runs; CPU needs a C++ compiler)
    channels_last: bool = True  # NHWC memory format: faster convolutions on CPU (oneDNN) and GPU
    eval_batch_size: int = 2000  # evaluation has no backward pass, so larger batches are cheap
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default


TRAIN_IMAGES = 50_000  # the training split; the last 10,000 of MNIST's 60,000 training images validate
SIZES = {"train": TRAIN_IMAGES, "val": 10_000, "test": 10_000}  # images in each split


@dataclass(frozen=True)
class DataConfig:
    """Which images train, which select, and how they are augmented."""

    # Train on the first N of the 50,000 training images (tests, smoke studies); null: all.
    limit_train: int | None = None
    # Evaluate on the first N validation/test images; null: all 10,000.
    limit_eval: int | None = None
    # Train on all 60,000 (train + validation) like the reference; epochs then report the
    # test set, for comparison only: there is no validation set to select on.
    full_train: bool = False
    augment: bool = False  # random rotation/translation of whole batches on the device
    rotate_deg: float = 7.0  # augmentation: max rotation, degrees
    translate: float = 0.1  # augmentation: max shift, fraction of the image side


@dataclass(frozen=True)
class ExperimentConfig:
    """One training run: everything needed to rebuild the model and repeat the run."""

    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), the form written to YAML, JSON and checkpoints."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def from_dict(data: Any, where: str = "config") -> ExperimentConfig:
    """Build and validate a config; unknown keys and wrong types raise UserError naming them."""
    cfg = _build(ExperimentConfig, data, "", where)
    validate(cfg, where)
    return cfg


# The shipped study and experiment files, beside the package in the repository it is installed from.
SHIPPED = {"studies": Path(__file__).resolve().parents[2] / "studies",
           "experiments": Path(__file__).resolve().parents[2] / "experiments"}


def shipped(path: str | Path, kind: str) -> Path:
    """``path`` itself, or for a bare name that is no file here (``smoke``), the shipped file of that
    name (``studies/smoke.yaml``), so the shipped files work from any folder."""
    p = Path(path)
    if p.exists() or p.suffix or len(p.parts) != 1 or p.name.startswith("."):
        return p
    found = SHIPPED[kind] / f"{p.name}.yaml"
    if found.is_file():
        return found
    names = sorted(f.stem for f in SHIPPED[kind].glob("*.yaml")) if SHIPPED[kind].is_dir() else []
    known = f", nor a shipped one (shipped {kind}: {', '.join(names)})" if names else ""
    raise UserError(f"{p}: no such file{known}")


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML file and apply ``key=value`` overrides (dotted keys)."""
    path = shipped(path, "experiments")
    raw = read_yaml(path)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {shown(item)}: expected key=value, e.g. train.lr=0.02")
        raw = set_path(raw, key.strip(), _override_value(item, text), where=str(path))
    cfg = from_dict(raw, str(path))
    check_experiment_name(cfg.name, str(path))
    return cfg


# A study's or an experiment's name becomes a folder (under the artifacts folder, or runs/NAME-TIME),
# an MLflow experiment and a registry model: only characters that are plain in all three, never a path
# ("/", "..", a leading dot), and short enough that NAME-<id8> fits every file system and MLflow's limits.
NAME_RULE = "1 to 100 ASCII letters, digits, '-', '_' or '.', starting with a letter or a digit"
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def safe_name(name: Any) -> bool:
    """Whether ``name`` follows the name rule (NAME_RULE) of studies and experiments."""
    return isinstance(name, str) and _SAFE_NAME.fullmatch(name) is not None


def check_experiment_name(name: str, where: str) -> None:
    """UserError unless ``name`` follows the name rule: an experiment's name becomes its run folder
    (runs/NAME-TIME) and its MLflow experiment, so "../x" or "/tmp/x" must never reach a path."""
    if not safe_name(name):
        raise UserError(f"{where}: experiment name {shown(name)} is not allowed; an experiment name is {NAME_RULE}")


# The CLI flags that set one config value (`mnistlab train`, `mnistlab study run`), by option name,
# and the dotted name each sets: the one place the pairs are spelled.
FLAGS = {
    "epochs": "train.epochs", "device": "train.device", "seed": "train.seed",
    "limit_train": "data.limit_train", "limit_eval": "data.limit_eval",
}


def flag_values(**flags: Any) -> dict[str, Any]:
    """The dotted config values that CLI flags set (``epochs=3`` -> ``{"train.epochs": 3}``); a flag
    left unset (None) sets nothing."""
    return {FLAGS[k]: v for k, v in flags.items() if v is not None}


def resolve(path: str | Path, overrides: typing.Sequence[str], **flags: Any) -> ExperimentConfig:
    """The experiment file with ``key=value`` overrides, then the CLI's flags (``epochs=3``...) on top."""
    extra = [f"{k}={v}" for k, v in flag_values(**flags).items()]
    return load(path, [*overrides, *extra])


def _override_value(item: str, text: str) -> Any:
    try:
        return parse_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"override {shown(item)}: {_yaml_problem(exc)}") from None


# Study and experiment files are a few hundred bytes: these bounds only stop hostile or broken
# input (a huge file, an alias bomb that expands a 1 KB file to millions of nodes) from eating
# memory and time before anything is checked.
MAX_YAML_BYTES = 1_000_000
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 50  # nesting; PyYAML composes recursively and would hit Python's recursion limit
SHOWN_CHARS = 200  # the most of a value an error message repeats


def shown(value: Any) -> str:
    """A value's repr for an error message, at most SHOWN_CHARS characters (bounded work too)."""
    text = _SHORT.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = _SHORT.maxlong = SHOWN_CHARS
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 20
_SHORT.maxlevel = 4


class _Refused(yaml.YAMLError):
    """A YAML document mnistlab will not read (too big, a duplicate key, a non-finite number)."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: a key twice in one mapping, .inf/.nan, and documents that
    expand (through aliases) to more than MAX_YAML_NODES nodes or nest deeper than MAX_YAML_DEPTH
    are refused."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable):
                if key in seen:
                    raise _Refused(f"key {shown(key)} appears twice in one mapping", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise _Refused(f"{shown(node.value)} is not a finite number", node.start_mark)
        return value


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_yaml_map)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
# YAML 1.1 (PyYAML) reads 1e-3 as a string: its floats need a dot. Every ML config in the wild
# writes learning rates so (YAML 1.2 reads them as numbers), and so does mnistlab: 1e-3, 5E-4, 1e3.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Nodes the document has once every alias is expanded; memoised, so an alias bomb costs
    time linear in its text, not in its expansion."""
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_YAML_NODES + 1)  # saturate: big integers are work too
    return memo[id(node)]


def parse_yaml(text: str) -> Any:
    """One YAML document with _Loader's limits; raises yaml.YAMLError (``_Refused`` for the limits)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_YAML_NODES:
            raise _Refused(f"more than {MAX_YAML_NODES:,} values once aliases are expanded (an alias bomb?)",
                           node.start_mark)
        return loader.construct_document(node)
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise _Refused(str(exc)[:SHOWN_CHARS]) from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, or UserError naming the file."""
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_YAML_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"{p}: no such file") from None
    except OSError as exc:
        raise UserError(f"{p}: cannot read ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise UserError(f"{p}: larger than {MAX_YAML_BYTES:,} bytes; not a mnistlab study or experiment file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        raise UserError(f"{p}: {_yaml_problem(exc)}") from None
    if data is None:  # an empty file (or comments only) is a mistake, not the default config
        raise UserError(f"{p}: empty file (no settings in it)")
    if not isinstance(data, dict):
        raise UserError(f"{p}: expected a mapping at the top level")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    at = f" at line {mark.line + 1}" if mark else ""
    problem = getattr(exc, "problem", None)
    if isinstance(exc, _Refused):
        return f"refused{at}: {problem}"
    return f"malformed YAML{at}" + (f" ({str(problem)[:SHOWN_CHARS]})" if problem else "")


_PIECE = re.compile(r"^([A-Za-z_]\w*)(?:\[(\d+)\])?$")


def split_path(path: str) -> list[tuple[str, int | None]]:
    """``model.widths.3`` (or ``model.widths[3]``) -> [("model", None), ("widths", 3)]."""
    parts: list[tuple[str, int | None]] = []
    for piece in path.split("."):
        if piece.isdigit() and parts and parts[-1][1] is None:
            parts[-1] = (parts[-1][0], int(piece))
            continue
        m = _PIECE.match(piece)
        if not m:
            raise UserError(f"{shown(path)}: not a config name (expected e.g. model.dropout or model.widths.3)")
        parts.append((m.group(1), int(m.group(2)) if m.group(2) is not None else None))
    return parts


def canonical(path: str) -> str:
    """The one spelling of a name used everywhere: ``model.widths[3]`` -> ``model.widths.3``.

    MLflow param names cannot contain brackets, so indexes are written as a dotted number.
    """
    return ".".join(name if index is None else f"{name}.{index}" for name, index in split_path(path))


def set_path(raw: dict[str, Any], path: str, value: Any, where: str = "config") -> dict[str, Any]:
    """A copy of ``raw`` with the dotted ``path`` set; the path must name a real config field."""
    parts = split_path(path)
    check_path(path, where)
    out = _plain(raw)
    node = out
    for i, (name, index) in enumerate(parts):
        last = i == len(parts) - 1
        if index is None:
            if last:
                node[name] = value
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise UserError(f"{where}: {shown(path)}: {name} is not a section")
            continue
        seq = node.get(name)
        if seq is None:
            seq = list(_default_at(parts[: i + 1]))
        seq = list(seq)
        if index >= len(seq):
            raise UserError(f"{where}: {shown(path)}: index {index} out of range ({len(seq)} entries)")
        seq[index] = value
        node[name] = seq
    return out


def get_path(cfg: ExperimentConfig, path: str) -> Any:
    """The value at a dotted path of a built config."""
    node: Any = cfg
    for name, index in split_path(path):
        node = getattr(node, name)
        if index is not None:
            node = node[index]
    return node


def check_path(path: str, where: str = "config") -> None:
    """UserError unless ``path`` names a real (leaf) config field."""
    cls: Any = ExperimentConfig
    parts = split_path(path)
    for i, (name, index) in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if name not in fields:
            raise UserError(f"{where}: unknown config name {shown(path)}")
        tp = _hints(cls)[name]
        if index is not None and typing.get_origin(tp) is not tuple:
            raise UserError(f"{where}: {shown(path)}: {name} is not a list")
        cls = tp
        if i == len(parts) - 1 and dataclasses.is_dataclass(cls):
            raise UserError(f"{where}: {shown(path)} names a section, not a value")


def _default_at(parts: list[tuple[str, int | None]]) -> Any:
    node: Any = ExperimentConfig()
    for name, _ in parts:
        node = getattr(node, name)
    return node


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: Any, prefix: str, where: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise UserError(f"{where}: unknown key {shown(prefix + str(unknown[0]))}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _coerce(hints[key], value, prefix + key, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, name: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name + ".", where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, name, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"{where}: {name} must be one of {', '.join(map(str, choices))}; got {shown(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: {name} must be a list; got {shown(value)}")
        item = typing.get_args(tp)[0]
        return tuple(_coerce(item, v, f"{name}[{i}]", where) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: {name} must be true or false; got {shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: {name} must be an integer; got {shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where}: {name} must be a number; got {shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):  # .inf or .nan would train to NaN and be recorded as a result
            raise UserError(f"{where}: {name} must be a finite number; got {shown(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: {name} must be a string; got {shown(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {name}")  # a bug, not bad input


# Bounds far above any sensible MNIST network, low enough that a typo fails here rather than as
# an allocation of gigabytes or an overflow inside torch.
MAX_WIDTH = 4096  # channels of one conv (and the width multiplier)
MAX_PADDING = 64  # pixels; the images are 28 wide
MAX_THREADS = 1024
MAX_LAYERS = 64


def _scaled(m: ModelConfig) -> list[int]:
    from mnistlab.core.layers import widths

    return list(widths(m))


def validate(cfg: ExperimentConfig, where: str = "config") -> None:
    """Range checks that types alone cannot express; UserError naming the field."""
    m, t, d = cfg.model, cfg.train, cfg.data

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UserError(f"{where}: {msg}")

    need(1 <= len(m.widths) <= MAX_LAYERS, f"model.widths must have 1..{MAX_LAYERS} entries")
    need(all(w >= 1 for w in m.widths), f"model.widths must be positive; got {shown(list(m.widths))}")
    need(
        len(m.paddings) == len(m.widths),
        f"model.paddings has {len(m.paddings)} entries but model.widths has {len(m.widths)}",
    )
    need(all(0 <= p <= MAX_PADDING for p in m.paddings), f"model.paddings must be 0..{MAX_PADDING}")
    need(0 <= m.pool_after <= len(m.widths), f"model.pool_after must be 0..{len(m.widths)}")
    need(0.0 <= m.dropout < 1.0, f"model.dropout must be in [0, 1); got {m.dropout}")
    need(0 < m.width_mult <= MAX_WIDTH, f"model.width_mult must be in (0, {MAX_WIDTH}]; got {m.width_mult}")
    need(all(w <= MAX_WIDTH for w in _scaled(m)),
         f"model.widths times model.width_mult must stay <= {MAX_WIDTH} channels; got {shown(_scaled(m))}")
    need(t.epochs >= 1, f"train.epochs must be >= 1; got {t.epochs}")
    need(t.batch_size >= 1, f"train.batch_size must be >= 1; got {t.batch_size}")
    need(t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
    need(t.lr > 0, f"train.lr must be > 0; got {t.lr}")
    need(t.weight_decay >= 0, "train.weight_decay must be >= 0")
    need(0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
    need(t.step_epochs >= 1, "train.step_epochs must be >= 1")
    need(0 < t.pct_start < 1, "train.pct_start must be in (0, 1)")
    need(0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
    need(0 <= t.threads <= MAX_THREADS, f"train.threads must be 0..{MAX_THREADS}; got {shown(t.threads)}")
    need(0 <= t.seed < 2**63, f"train.seed must be 0..2**63-1 (torch's seed range); got {shown(t.seed)}")
    need(re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", t.device) is not None,
         f"train.device must be auto, cpu, cuda, cuda:N or mps; got {shown(t.device)}")
    need(d.limit_train is None or d.limit_train >= 1, "data.limit_train must be >= 1")
    need(d.limit_eval is None or d.limit_eval >= 1, "data.limit_eval must be >= 1")
    need(0 <= d.translate < 0.5, "data.translate must be in [0, 0.5)")
    # Shapes: raises UserError if the spatial size collapses.
    from mnistlab.core.layers import plan

    plan(m, where)


def replace(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """A validated copy with some fields of some sections changed, e.g. train={"epochs": 2}."""
    raw = cfg.to_dict()
    for section, values in sections.items():
        raw[section].update(values)
    return from_dict(raw)


def dump_yaml(cfg: ExperimentConfig) -> str:
    """The config as YAML (the resolved config logged with every run)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
