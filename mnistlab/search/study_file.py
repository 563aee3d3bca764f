"""Study files: a base experiment, a search space over its dotted config names, a budget.

Every search-space name is checked against the config's real fields when the file is
read, so a typo fails before a study is created. A little over 350 lines: the study file's
every key (space, sampler, pruner, confirmation, budget) is parsed and checked in this one place.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistlab.core import config as config_mod
from mnistlab.core.config import NAME_RULE, ExperimentConfig, safe_name, shown
from mnistlab.util.errors import UserError, clip

if TYPE_CHECKING:  # Optuna (and torch, behind core.model) load where used: a bad study file is answered at once
    import optuna

# The metrics a study may optimise, with their directions. The test set is never one of them.
OBJECTIVES = {"val_acc": "maximize", "params": "minimize", "val_loss": "minimize"}
SAMPLERS = ("tpe", "random", "nsga2")
PRUNERS = ("median", "hyperband", "threshold", "none")


def check_name(name: Any, where: str) -> str:
    """``name`` if it is a safe study name; else UserError saying the rule (for study files,
    ``--name`` and names found in a storage alike)."""
    if not safe_name(name):
        raise UserError(f"{where}: study name {clip(name)} is not allowed; a study name is {NAME_RULE}")
    return name


@dataclass(frozen=True)
class Param:
    """One search-space entry: a dotted config name and an Optuna distribution."""

    name: str
    type: str  # float, int or categorical
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def smallest_values(self) -> list[Any]:
        """Values that can give the smallest network: the low end, or every choice."""
        return list(self.choices) if self.type == "categorical" else [self.low]

    def distribution(self) -> Any:
        """The Optuna distribution a trial records for this entry (what objective._suggest asks for)."""
        from optuna import distributions as d

        if self.type == "float":
            return d.FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return d.IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return d.CategoricalDistribution(list(self.choices))


@dataclass(frozen=True)
class Sampler:
    """The sampler and every setting of it that a study depends on, stated rather than left to
    Optuna's defaults (Optuna 5 turned multivariate TPE and the constant liar on silently)."""

    name: str = "tpe"
    seed: int | None = None
    n_startup_trials: int = 10  # tpe: random trials before the model kicks in
    multivariate: bool = True  # tpe: model the parameters jointly (widths interact through the budget)
    constant_liar: bool = True  # tpe: treat running trials as bad, so parallel workers do not sample alike


@dataclass(frozen=True)
class Pruner:
    name: str = "median"
    n_startup_trials: int = 5  # median: trials that finish before any is pruned
    n_warmup_steps: int = 2  # median: epochs a trial always runs
    min_resource: int = 1  # hyperband: epochs
    reduction_factor: int = 3  # hyperband
    lower: float | None = None  # threshold: a trial below this validation accuracy (%) after the warm-up is pruned


@dataclass(frozen=True)
class Confirm:
    """Seed repeats for the finalists: after the search, the best ``top_k`` configurations are
    trained again with further seeds, and the pick is made on their seed-mean score."""

    top_k: int = 3  # configurations to confirm
    seeds: int = 3  # seeds per confirmed configuration, its original trial included
    max_params: int | None = None  # only finalists with at most this many params (e.g. a size goal)


@dataclass(frozen=True)
class Rung:
    """One screening schedule: a complete training of ``epochs`` epochs on the first
    ``limit_train`` training images (None: all of the study's)."""

    epochs: int
    limit_train: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The config values that make a trial's config this rung's."""
        return {"train.epochs": self.epochs, **({"data.limit_train": self.limit_train} if self.limit_train else {})}


@dataclass(frozen=True)
class Screen:
    """A study's screening stage: its rungs, cheapest first, and the fraction of each promoted."""

    rungs: tuple[Rung, ...]
    promote: float = 0.25  # fraction of a rung's finished trials that go one rung up (ASHA's 1/eta)
    bands: tuple[int, ...] = ()  # multi-objective: promote within each parameter band (upper bounds)

    @property
    def full(self) -> int:
        """The rung index of the study's own schedule."""
        return len(self.rungs)


@dataclass(frozen=True)
class Stop:
    """When a study is done: a configuration's score reaches ``val_score`` (%, its seed mean where
    it has seed repeats), or ``minutes`` of wall clock have passed since the study was created."""

    val_score: float | None = None
    minutes: float | None = None

    def merged(self, val_score: float | None, minutes: float | None) -> Stop:
        """This stop with the command line's values, where given, in place of the file's."""
        return Stop(val_score if val_score is not None else self.val_score,
                    minutes if minutes is not None else self.minutes)

    def __bool__(self) -> bool:
        return self.val_score is not None or self.minutes is not None


# The study attributes of the study-wide stop (search/stop.py): spelled here, where the stop block
# is read, so that the storage can set them without importing the stop's logic.


MAX_SOURCES = 20  # warm_start: sources
MAX_TOP = 100  # a source study's best configurations


@dataclass(frozen=True)
class Source:
    """One warm-start source: an earlier study (``study``, ``storage``) or an export's config.json."""

    study: str | None = None
    storage: str | None = None  # None: this study's own storage
    export: Path | None = None
    top: int = 3  # a study's best configurations to take


def _warm_start(raw: Any, where: str, folder: Path) -> tuple[Source, ...]:
    """``warm_start:``: a list of sources; UserError naming the culprit."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw or len(raw) > MAX_SOURCES:
        raise UserError(f"{where}: warm_start must be a list of 1 to {MAX_SOURCES} sources ({{study: NAME}} or "
                        "{export: PATH})")
    out = []
    for i, item in enumerate(raw):
        here = f"{where}: warm_start[{i}]"
        if not isinstance(item, dict) or len({"study", "export"} & set(item)) != 1:
            raise UserError(f"{here}: expected {{study: NAME}} or {{export: PATH}}; got {shown(item)}")
        unknown = sorted(set(item) - ({"study", "storage", "top"} if "study" in item else {"export"}))
        if unknown:
            raise UserError(f"{here}: unknown key {shown(unknown[0])}")
        if "export" in item:
            if not isinstance(item["export"], str) or not item["export"]:
                raise UserError(f"{here}: export must be the path of an export's config.json")
            out.append(Source(export=(folder / item["export"]).resolve()))
            continue
        name = check_name(item["study"], here)
        storage = item.get("storage")
        if storage is not None and (not isinstance(storage, str) or not storage):
            raise UserError(f"{here}: storage must be a storage URL")
        top = item.get("top", Source.top)
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
            raise UserError(f"{here}: top must be an integer from 1 to {MAX_TOP}; got {shown(top)}")
        out.append(Source(study=name, storage=storage, top=top))
    return tuple(out)


@dataclass(frozen=True)
class StudyConfig:
    """A parsed study file."""

    name: str
    path: Path
    base_path: Path
    base: ExperimentConfig  # the base experiment with the study's overrides applied
    base_raw: dict[str, Any]  # the same as a plain dict, for setting sampled values
    space: tuple[Param, ...]
    max_params: int
    objectives: tuple[str, ...] = ("val_acc",)
    sampler: Sampler = field(default_factory=Sampler)
    pruner: Pruner = field(default_factory=Pruner)
    n_trials: int | None = None
    timeout: float | None = None  # seconds, per worker
    target: float | None = None  # stop when a trial reaches this validation accuracy (%)
    enqueue_base: bool = True  # trial 0 is the base experiment itself, as a yardstick
    confirm: Confirm | None = None  # seed repeats of the finalists after the search
    screen: Screen | None = None  # cheap complete schedules first, the full one for the best (search/screen.py)
    stop: Stop = field(default_factory=Stop)  # when every worker stops taking new work (search/stop.py)
    warm_start: tuple[Source, ...] = ()  # earlier studies and exports whose best configurations go first

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[o] for o in self.objectives]

    def trial_config(self, values: dict[str, Any], extra: dict[str, Any] | None = None) -> ExperimentConfig:
        """The base with sampled values (and CLI overrides) set; UserError if invalid."""
        raw = self.base_raw
        for name, value in {**values, **(extra or {})}.items():
            raw = config_mod.set_path(raw, name, value, where=str(self.path))
        return config_mod.from_dict(raw, f"{self.path} (trial config)")

    def smallest_params(self) -> int:
        """Fewest parameters any config in the space can have (widths grow the count)."""
        from mnistlab.core.model import count_params

        options = [p.smallest_values() for p in self.space]
        best = None
        for combo in itertools.islice(itertools.product(*options), 4096):
            try:
                n = count_params(self.trial_config(dict(zip((p.name for p in self.space), combo, strict=True))).model)
            except UserError:
                continue
            best = n if best is None else min(best, n)
        if best is None:
            raise UserError(f"{self.path}: no configuration in the search space is valid")
        return best


MAX_BOUND = 1e12  # a search-space bound beyond this is a typo (and floats overflow soon after)

_TOP_KEYS = {"name", "base", "overrides", "space", "max_params", "objectives", "sampler", "pruner",
             "n_trials", "timeout", "target", "enqueue_base", "confirm", "screen", "stop", "warm_start"}


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study file (or a shipped study by name); UserError naming the file and the culprit."""
    p = config_mod.shipped(path, "studies")
    raw = config_mod.read_yaml(p)
    where = str(p)
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {shown(unknown[0])}")
    for key in ("name", "base", "space", "max_params"):
        if key not in raw:
            raise UserError(f"{where}: missing key {shown(key)}")
    name = check_name(raw["name"], where)
    base_path = (p.parent / _typed(raw["base"], str, "base", where)).resolve()
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise UserError(f"{where}: overrides must be a mapping of dotted names to values")
    base_raw = config_mod.read_yaml(base_path)
    for key, value in overrides.items():
        base_raw = config_mod.set_path(base_raw, str(key), value, where=f"{where}: overrides")
    base = config_mod.from_dict(base_raw, f"{where} (base {base_path.name} with overrides)")
    space = _space(raw["space"], where)
    objectives = _objectives(raw.get("objectives"), where)
    for o in objectives:
        if o not in OBJECTIVES:
            raise UserError(f"{where}: unknown objective {shown(o)}; choose from {', '.join(OBJECTIVES)}")
    if len(set(objectives)) != len(objectives):
        raise UserError(f"{where}: objectives repeat a metric")
    study = StudyConfig(
        name=name, path=p, base_path=base_path, base=base, base_raw=config_mod.from_dict(base_raw).to_dict(),
        space=space, max_params=_positive(raw["max_params"], "max_params", where), objectives=objectives,
        sampler=_section(Sampler, raw.get("sampler"), "sampler", where),
        pruner=_section(Pruner, raw.get("pruner"), "pruner", where),
        n_trials=_optional_positive(raw.get("n_trials"), "n_trials", where),
        timeout=_optional_positive(raw.get("timeout"), "timeout", where, float),
        target=_optional_positive(raw.get("target"), "target", where, float),
        enqueue_base=_typed(raw.get("enqueue_base", True), bool, "enqueue_base", where),
        confirm=_confirm(raw.get("confirm"), where),
        screen=_screen(raw.get("screen"), base, len(objectives) > 1, where),
        stop=_stop(raw.get("stop"), where),
        warm_start=_warm_start(raw.get("warm_start"), where, p.parent),
    )
    if study.sampler.name not in SAMPLERS:
        raise UserError(f"{where}: unknown sampler {shown(study.sampler.name)}; choose from {', '.join(SAMPLERS)}")
    if study.confirm and study.n_trials and study.confirm.top_k > study.n_trials:
        raise UserError(f"{where}: confirm.top_k {study.confirm.top_k} is more than the study's n_trials "
                        f"{study.n_trials}")
    if study.pruner.name not in PRUNERS:
        raise UserError(f"{where}: unknown pruner {shown(study.pruner.name)}; choose from {', '.join(PRUNERS)}")
    if (study.pruner.name == "threshold") != (study.pruner.lower is not None):
        raise UserError(f"{where}: pruner.lower (a validation accuracy in %) goes with the threshold pruner, "
                        "and only with it")
    study.trial_config({p.name: p.smallest_values()[0] for p in space})  # every name maps to a field
    return study


def _objectives(raw: Any, where: str) -> tuple[str, ...]:
    """``objectives``: a list of metric names (one name alone is a list of one)."""
    if raw is None:
        return ("val_acc",)
    names = [raw] if isinstance(raw, str) else raw
    if not isinstance(names, list) or not names or not all(isinstance(o, str) for o in names):
        raise UserError(f"{where}: objectives must be a list of metric names ({', '.join(OBJECTIVES)}); "
                        f"got {shown(raw)}")
    return tuple(names)


def _space(raw: Any, where: str) -> tuple[Param, ...]:
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: space must be a non-empty mapping of dotted names to distributions")
    out = []
    for given, spec in raw.items():
        name = config_mod.canonical(str(given))
        here = f"{where}: space.{given}"
        config_mod.check_path(name, where)
        if any(p.name == name for p in out):
            raise UserError(f"{here}: {name} appears twice")
        if not isinstance(spec, dict):
            raise UserError(f"{here}: expected a mapping with a type")
        extra = sorted(set(spec) - {"type", "low", "high", "step", "log", "choices"})
        if extra:
            raise UserError(f"{here}: unknown key {shown(extra[0])}")
        kind = spec.get("type")
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise UserError(f"{here}: categorical needs a non-empty choices list")
            out.append(Param(str(name), kind, choices=tuple(choices)))
            continue
        if kind not in ("float", "int"):
            raise UserError(f"{here}: type must be float, int or categorical; got {shown(kind)}")
        out.append(_numeric(str(name), kind, spec, here))
    return tuple(out)


def _numeric(name: str, kind: str, spec: dict[str, Any], here: str) -> Param:
    number = int if kind == "int" else (int, float)
    for key in ("low", "high"):
        if key not in spec:
            raise UserError(f"{here}: missing {key}")
        if isinstance(spec[key], bool) or not isinstance(spec[key], number) or abs(spec[key]) > MAX_BOUND:
            raise UserError(f"{here}: {key} must be {'an integer' if kind == 'int' else 'a number'} "
                            f"within ±{MAX_BOUND:g}; got {shown(spec[key])}")
    low, high, step, log = spec["low"], spec["high"], spec.get("step"), spec.get("log", False)
    if low > high:
        raise UserError(f"{here}: low {low} > high {high}")
    if not isinstance(log, bool):
        raise UserError(f"{here}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{here}: log scale needs low > 0")
    if step is not None and (isinstance(step, bool) or not isinstance(step, number) or not 0 < step <= MAX_BOUND):
        raise UserError(f"{here}: step must be a positive {'integer' if kind == 'int' else 'number'}")
    if log and step is not None:
        raise UserError(f"{here}: step and log cannot be combined")
    return Param(name, kind, low, high, step, log)


def _confirm(raw: Any, where: str) -> Confirm | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: confirm must be a mapping (top_k, seeds, max_params)")
    unknown = sorted(set(raw) - set(Confirm.__dataclass_fields__))
    if unknown:
        raise UserError(f"{where}: unknown key confirm.{shown(unknown[0])}")
    top_k = _positive(raw.get("top_k", Confirm.top_k), "confirm.top_k", where)
    seeds = _positive(raw.get("seeds", Confirm.seeds), "confirm.seeds", where)
    if seeds < 2 or seeds > 100 or top_k > 1000:
        raise UserError(f"{where}: confirm needs 2 <= seeds <= 100 and top_k <= 1000; got seeds {seeds}, "
                        f"top_k {top_k}")
    return Confirm(top_k, seeds, _optional_positive(raw.get("max_params"), "confirm.max_params", where))


MAX_RUNGS = 8


def _screen(raw: Any, base: ExperimentConfig, multi: bool, where: str) -> Screen | None:
    """``screen:``: rungs cheapest first (or one rung's ``epochs``/``limit_train`` given directly),
    ``promote`` in (0, 1), and for multi-objective studies ``bands`` of parameter counts."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise UserError(f"{where}: screen must be a mapping (rungs or epochs/limit_train, promote, bands)")
    unknown = sorted(set(raw) - {"rungs", "epochs", "limit_train", "promote", "bands"})
    if unknown:
        raise UserError(f"{where}: unknown key screen.{shown(unknown[0])}")
    if "rungs" in raw and ("epochs" in raw or "limit_train" in raw):
        raise UserError(f"{where}: screen takes rungs or one rung's epochs/limit_train, not both")
    given = raw["rungs"] if "rungs" in raw else [{k: raw[k] for k in ("epochs", "limit_train") if k in raw}]
    if not isinstance(given, list) or not given or len(given) > MAX_RUNGS:
        raise UserError(f"{where}: screen.rungs must be a list of 1 to {MAX_RUNGS} rungs")
    if base.data.full_train:
        raise UserError(f"{where}: screen ranks configurations on validation images, but the base trains on "
                        "all of them (data.full_train: true)")
    full_images = base.data.limit_train or config_mod.TRAIN_IMAGES
    rungs = []
    for i, r in enumerate(given):
        here = f"screen.rungs[{i}]" if "rungs" in raw else "screen"
        if not isinstance(r, dict) or "epochs" not in r or set(r) - {"epochs", "limit_train"}:
            raise UserError(f"{where}: {here} must be a mapping of epochs (and limit_train)")
        epochs = _positive(r["epochs"], f"{here}.epochs", where)
        limit = _optional_positive(r.get("limit_train"), f"{here}.limit_train", where)
        rungs.append(Rung(epochs, limit))
    schedules = [(r.epochs, min(r.limit_train or full_images, full_images)) for r in rungs]
    schedules.append((base.train.epochs, full_images))
    for i, ((e, n), (e2, n2)) in enumerate(itertools.pairwise(schedules)):
        what = "the full schedule" if i == len(rungs) - 1 else f"rung {i + 1}"
        if e > e2 or n > n2 or (e, n) == (e2, n2):
            raise UserError(f"{where}: screen rung {i} ({e} epochs on {n:,} images) is not cheaper than {what} "
                            f"({e2} epochs on {n2:,} images); a screen must be shorter than what it screens for")
    promote = raw.get("promote", Screen.promote)
    if isinstance(promote, bool) or not isinstance(promote, (int, float)) or not 0 < promote < 1:
        raise UserError(f"{where}: screen.promote must be a fraction between 0 and 1 (exclusive); got {shown(promote)}")
    bands = raw.get("bands", [])
    if not isinstance(bands, list) or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0
                                              for b in bands) or bands != sorted(set(bands)):
        raise UserError(f"{where}: screen.bands must be increasing positive parameter counts; got {shown(bands)}")
    if bands and not multi:
        raise UserError(f"{where}: screen.bands applies to studies with the objectives val_acc and params")
    return Screen(tuple(rungs), float(promote), tuple(bands))


def _stop(raw: Any, where: str) -> Stop:
    """``stop:``: ``val_score`` (%, at most 100) and/or ``minutes`` of wall clock."""
    if raw is None:
        return Stop()
    if not isinstance(raw, dict):
        raise UserError(f"{where}: stop must be a mapping (val_score, minutes)")
    unknown = sorted(set(raw) - {"val_score", "minutes"})
    if unknown:
        raise UserError(f"{where}: unknown key stop.{shown(unknown[0])}")
    return Stop(stop_value(raw.get("val_score"), "stop.val_score", where),
                stop_value(raw.get("minutes"), "stop.minutes", where))


def stop_value(value: Any, key: str, where: str) -> float | None:
    """A stop target: a positive finite number; a val_score at most 100 (%)."""
    if value is None:
        return None
    high = 100.0 if key.endswith(("val_score", "val-score")) else 1e6
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= high:
        raise UserError(f"{where}: {key} must be a number above 0 and at most {high:g}; got {shown(value)}")
    return float(value)


def _percent(value: Any, key: str, where: str) -> float:
    """An accuracy in %: a finite number from 0 to 100."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise UserError(f"{where}: {key} must be a number from 0 to 100 (%); got {shown(value)}")
    return float(value)


def _section(cls: type, raw: Any, key: str, where: str) -> Any:
    if raw is None:
        return cls()
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise UserError(f"{where}: {key} must be a name or a mapping")
    fields = cls.__dataclass_fields__
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key {key}.{shown(unknown[0])}")
    for k, v in raw.items():
        want = str if k == "name" else bool if isinstance(fields[k].default, bool) else int
        if k == "seed" and v is None:
            continue
        if k == "lower":
            v = raw[k] = _percent(v, f"{key}.{k}", where)
            continue
        _typed(v, want, f"{key}.{k}", where)
        low, high = _RANGES.get(k, (None, None))
        if low is not None and not low <= v <= high:
            raise UserError(f"{where}: {key}.{k} must be {low}..{high}; got {shown(v)}")
    return cls(**raw)


# What Optuna accepts for the sampler and pruner settings (a hyperband reduction_factor of 0
# or 1 fails only after a trial has trained, with a ZeroDivisionError).
_RANGES = {"seed": (0, 2**32 - 1), "n_startup_trials": (0, 1_000_000), "n_warmup_steps": (0, 1_000_000),
           "min_resource": (1, 1_000_000), "reduction_factor": (2, 1_000)}


def _typed(value: Any, tp: type, key: str, where: str) -> Any:
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise UserError(f"{where}: {key} must be {tp.__name__}; got {shown(value)}")
    return value


def _positive(value: Any, key: str, where: str) -> int:
    _typed(value, int, key, where)
    if value <= 0:
        raise UserError(f"{where}: {key} must be > 0; got {value}")
    return value


def _optional_positive(value: Any, key: str, where: str, tp: type = int) -> Any:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if tp is float else int) or value <= 0:
        raise UserError(f"{where}: {key} must be a positive {'number' if tp is float else 'integer'}")
    return tp(value)


def make_sampler(study: StudyConfig, salt: str | None = None) -> optuna.samplers.BaseSampler:
    """The sampler a study file names; with ``salt``, its seed is mixed with it (see worker_salt)."""
    import optuna

    s = study.sampler
    seed = s.seed
    if seed is not None and salt:
        seed = int(hashlib.sha256(f"{seed}:{salt}".encode()).hexdigest()[:8], 16)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials, multivariate=s.multivariate,
                                      constant_liar=s.constant_liar)


def worker_salt(trials: list[optuna.trial.FrozenTrial], worker_index: int | None = None) -> str | None:
    """What keeps a seeded sampler from repeating itself.

    The first worker on a fresh study uses the study file's seed as it is (a single-process
    study is reproducible). A worker joining or continuing a study, one of `--workers N` (its
    ``worker_index`` above 0), or one with MNISTLAB_SEED_PER_WORKER=1 (the compose workers) mixes
    in its worker index, host, process and the trials done so far: the same seed again would
    replay the same samples.
    """
    from optuna.trial import TrialState

    started = any(t.state != TrialState.WAITING for t in trials)
    if not started and worker_index in (None, 0) and os.environ.get("MNISTLAB_SEED_PER_WORKER") != "1":
        return None
    return f"{worker_index}:{socket.gethostname()}:{os.getpid()}:{len(trials)}"


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    """The pruner a study file names (none for multi-objective studies: Optuna cannot prune them)."""
    import optuna

    p = study.pruner
    if p.name == "none" or len(study.objectives) > 1:
        return optuna.pruners.NopPruner()
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource, max_resource=study.base.train.epochs,
                                              reduction_factor=p.reduction_factor)
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(lower=p.lower, n_warmup_steps=p.n_warmup_steps)
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
