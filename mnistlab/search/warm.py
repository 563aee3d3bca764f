"""Warm starts: a new study begins with the best configurations earlier work found.

A study file's ``warm_start:`` lists sources, each an earlier study (``{study: NAME}``, in this
study's storage or in ``storage: URL``; its ``top`` best configurations by the pick rules of
``core/trials.py``, 3 by default) or an exported record (``{export: PATH}`` to an export's
``config.json``; relative paths are read from the study file's folder). Nothing from a source
is trusted: each configuration is re-read as values of this study's search space, each value
must lie in this study's distribution, the config it makes must be valid and within this
study's budget, and a configuration already taken is not taken twice; one that fails is
skipped with one line saying why. The rest are enqueued when the study is created, before any
sampled trial, as ordinary trials of this study (user attribute ``warm_from`` says where each
came from); the sources' own trials are not copied and do not count here. A name of the space
that a source study did not sample takes this study's base value.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mnistlab.core import config as config_mod
from mnistlab.util.errors import UserError, clip

if TYPE_CHECKING:
    from mnistlab.search.study_file import Param, Source, StudyConfig


def fits(p: Param, value: Any) -> str | None:
    """Why ``value`` is not a value of ``p``'s distribution, or None when it is."""
    if p.type == "categorical":
        return None if any(value == c and type(value) is type(c) for c in p.choices) else \
            f"{p.name} {clip(value)} is not one of {list(p.choices)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{p.name} {clip(value)} is not a number"
    if p.type == "int" and value != int(value):
        return f"{p.name} {value} is not an integer"
    if not p.low <= value <= p.high:
        return f"{p.name} {value:g} is outside this study's range {p.low:g}..{p.high:g}"
    if p.step and abs((value - p.low) / p.step - round((value - p.low) / p.step)) > 1e-9:
        return f"{p.name} {value:g} is not on this study's step {p.step:g} from {p.low:g}"
    return None


def _from_study(source: Source, own_storage: str | None) -> list[tuple[str, dict[str, Any]]]:
    """(label, sampled values) of a stored study's ``top`` best configurations."""
    from mnistlab.core import trials as tr
    from mnistlab.search.storage import load, open_storage

    storage = open_storage(source.storage or own_storage, heartbeat=None, create=False)
    study = load(source.study, storage)
    ranked = sorted(tr.groups(study.get_trials(deepcopy=False)), key=lambda g: (-len(g.members), *tr.rank_key(g)))
    if not ranked:
        raise UserError(f"warm_start: study {source.study!r} has no completed configuration to start from")
    return [(f"study {source.study} trial {g.number}", dict(g.first.params)) for g in ranked[:source.top]]


def _from_export(source: Source) -> tuple[str, ExportValues]:
    from mnistlab.util.jsonfile import read_json

    path = source.export
    assert path is not None
    if not path.is_file():
        raise UserError(f"warm_start: {path}: no such export file")
    try:
        record = read_json(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"warm_start: {path}: not an export's config.json ({clip(str(exc), 120)})") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise UserError(f"warm_start: {path}: not an export's config.json (no config object)")
    return f"export {path}", ExportValues(config_mod.from_dict(record["config"], f"warm_start: {path}"))


@dataclass(frozen=True)
class ExportValues:
    """An exported record's full config: every name of a space reads from it."""

    config: config_mod.ExperimentConfig


def base_values(cfg: StudyConfig) -> dict[str, Any]:
    """The base config's own values of the space: the study's trial 0 (``enqueue_base``)."""
    out = {}
    for p in cfg.space:
        value = config_mod.get_path(cfg.base, p.name)
        out[p.name] = list(value) if isinstance(value, tuple) else value
    return out


def configurations(cfg: StudyConfig, own_storage: str | None, say: Any = None) -> list[tuple[str, dict[str, Any]]]:
    """The warm-start configurations of ``cfg`` as (source label, values of its space), checked;
    each one skipped is said in one line (``say``, stderr by default). UserError for a source
    that does not exist or holds nothing to start from."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    from mnistlab.core.model import count_params

    candidates: list[tuple[str, Any]] = []
    for source in cfg.warm_start:
        candidates += [_from_export(source)] if source.export is not None else _from_study(source, own_storage)
    out: list[tuple[str, dict[str, Any]]] = []
    seen: list[dict[str, Any]] = [base_values(cfg)] if cfg.enqueue_base else []
    for label, found in candidates:
        values, why = {}, None
        for p in cfg.space:
            if isinstance(found, ExportValues):
                value = config_mod.get_path(found.config, p.name)
                value = list(value) if isinstance(value, tuple) else value
            else:
                value = found.get(p.name, config_mod.get_path(cfg.base, p.name))
            why = fits(p, value)
            if why:
                break
            values[p.name] = value
        if why is None:
            try:
                n = count_params(cfg.trial_config(values).model)
                if n > cfg.max_params:
                    why = f"over budget: {n:,} > {cfg.max_params:,} params"
            except UserError as exc:
                why = f"invalid config: {clip(str(exc), 160)}"
        if why is None and values in seen:
            why = "the same configuration is already taken"
        if why is not None:
            say(f"warm start: skipped {label}: {why}")
            continue
        seen.append(values)
        out.append((label, values))
    return out
