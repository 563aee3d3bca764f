"""The winning model out of a study: pick it, export it in every format, verify before it lands.

``pick`` chooses a trial by the study's objectives. ``export`` rebuilds that trial's
best-validation-epoch weights, writes safetensors, TorchScript, ONNX, ``config.json`` and
``MODEL_CARD.md`` into a temporary folder, re-measures the test set from each format, and
moves the folder into place only when all three agree on every prediction.

Exported TorchScript and ONNX models take pixels in [0, 1] (``uint8 / 255``) shaped
(N, 1, 28, 28) and normalise inside; they return log-probabilities (N, 10).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from mnistlab import checkpoint, data, interrupts
from mnistlab import trials as trials_mod
from mnistlab.config import ExperimentConfig, from_dict
from mnistlab.errors import UserError, clip
from mnistlab.model import build_model, count_params, summary
from mnistlab.report import trial_curves

FORMAT = "mnistlab-export/1"
WEIGHTS, CONFIG, TORCHSCRIPT, ONNX, CARD, CURVES = (
    "model.safetensors", "config.json", "model.torchscript.pt", "model.onnx", "MODEL_CARD.md", "learning_curves.png")
INPUT = {"name": "images", "shape": [None, 1, 28, 28], "dtype": "float32",
         "range": "pixels in [0, 1] (uint8 / 255); the TorchScript and ONNX models normalise inside",
         "mean": data.MEAN, "std": data.STD}
OUTPUT = {"name": "log_probs", "shape": [None, 10], "dtype": "float32", "meaning": "log-softmax over digits 0-9"}


# -- picking -----------------------------------------------------------------------------------

@dataclass
class Choice:
    """The picked configuration, the rule that picked it, the Pareto front (two objectives) and
    the configurations within noise of it."""

    group: trials_mod.Group
    rule: str
    front: list[trials_mod.Group] = field(default_factory=list)
    tied: list[trials_mod.Group] = field(default_factory=list)

    @property
    def trial(self) -> optuna.trial.FrozenTrial:
        """The search trial of the configuration (its weights are the export's without --refit)."""
        return self.group.first


def candidates(study: optuna.Study) -> list[trials_mod.Group]:
    """Configurations of completed, trained trials within the study's budget, seed repeats grouped."""
    budget = study.user_attrs.get("max_params")
    return [g for g in trials_mod.groups(study.get_trials(deepcopy=False))
            if trials_mod.PARAM_COUNT in g.first.user_attrs and (budget is None or g.params <= budget)]


def pick(study: optuna.Study, objectives: tuple[str, ...] | list[str], min_accuracy: float | None = None,
         max_params: int | None = None) -> Choice:
    """The configuration to export, by validation scores only.

    Where some configurations were confirmed with seed repeats, only those with the most seeds
    compete (a single seed's score is not comparable with a seed mean). With ``min_accuracy``:
    the fewest parameters among those whose score is at or above it. Otherwise the highest
    score (among those with at most ``max_params`` when given). Ties go to the smaller
    network, then to the earlier trial.
    """
    pool = candidates(study)
    name = study.study_name
    if not pool:
        raise UserError(f"study {name!r} has no completed trials to pick from")
    front = trials_mod.pareto(pool) if len(objectives) > 1 else []
    if max_params is not None:
        best_size = min(g.params for g in pool)
        pool = [g for g in pool if g.params <= max_params]
        if not pool:
            raise UserError(f"study {name!r}: no completed trial has at most {max_params:,} params "
                            f"(the smallest has {best_size:,})")
    most = max(g.n_seeds for g in pool)
    pool = [g for g in pool if g.n_seeds == most]
    seeds = f", mean of {most} seeds" if most > 1 else ""
    if min_accuracy is not None:
        best_acc = max(g.mean for g in pool)
        passing = [g for g in pool if g.mean >= min_accuracy]
        if not passing:
            raise UserError(f"study {name!r}: no completed trial reaches {min_accuracy}% validation accuracy"
                            + (f" with at most {max_params:,} params" if max_params is not None else "")
                            + f" (the best is {best_acc:.2f}%)")
        chosen = min(passing, key=lambda g: (g.params, -g.mean, g.number))
        rule = f"fewest params at >= {min_accuracy}% validation score{seeds}"
    else:
        chosen = min(pool, key=trials_mod.rank_key)
        rule = "highest validation score" + seeds + (f" with <= {max_params:,} params" if max_params else "")
    best = min(pool, key=trials_mod.rank_key)
    tied = [g for g in sorted(pool, key=trials_mod.rank_key)
            if g.number != chosen.number and trials_mod.tied(g, best)]
    return Choice(chosen, rule, front, tied)


def _measured(t: optuna.trial.FrozenTrial) -> str:
    """What a trial's own test figure was measured on (a limited run reads fewer images)."""
    cfg = _recorded_config(t)
    n = (cfg.data.limit_eval if cfg is not None and cfg.data.limit_eval else None) or data.SIZES["test"]
    return f"{n:,} test images"


def describe(choice: Choice) -> str:
    """What `mnistlab best` prints: the front (two objectives), the pick, the ones tied with it."""
    lines = []
    if choice.front:
        lines.append("Pareto front (validation score against params):")
        for g in choice.front:
            mark = "*" if g.number == choice.group.number else " "
            lines.append(f" {mark} trial {g.number:>4}  {g.params:>7,} params  val {g.describe()}")
        lines.append("")
    g, t = choice.group, choice.trial
    a = t.user_attrs
    total = int(a.get(trials_mod.VAL_TOTAL, data.SIZES["val"]))
    lines.append(f"best trial: {t.number} ({choice.rule})")
    lines.append(f"  params:          {g.params:,}")
    lines.append(f"  validation:      {g.describe()} (score: the last epoch's accuracy on "
                 f"{total:,} validation images; ± one standard error)")
    if g.n_seeds > 1:
        per_seed = ", ".join(f"seed {m.user_attrs.get(trials_mod.SEED, _seed(m))} {trials_mod.score(m):.2f}%"
                             for m in g.members)
        lines.append(f"  per seed:        {per_seed}")
    epoch, epochs = a.get(trials_mod.BEST_EPOCH), a.get(trials_mod.EPOCHS_RUN)
    lines.append(f"  best epoch:      {_acc(t):.2f}% validation (epoch {epoch} of {epochs})")
    test_acc = a.get(trials_mod.TEST_ACC, float("nan"))
    lines.append(f"  test acc:        {test_acc:.2f}% on {_measured(t)} (trial {t.number}'s "
                 "best-epoch weights; reported, never used to choose)")
    cfg = _recorded_config(t)
    if cfg is not None:
        lines.append(f"  widths:          {list(cfg.model.widths)}")
        lines.append(f"  dropout:         {cfg.model.dropout:g}")
        lines.append(f"  lr:              {cfg.train.lr:g} ({cfg.train.schedule}, {cfg.train.optimizer})")
    for key in sorted(t.params):
        lines.append(f"  {key + ':':<17}{t.params[key]}")
    lines.append(f"  MLflow run:      {a.get(trials_mod.MLFLOW_RUN_ID, '-')}")
    lines.append(f"  checkpoint:      {a.get(trials_mod.CHECKPOINT_DIR, '-')}")
    if choice.tied:
        lines.append("")
        lines.append(f"within noise of the best (difference under {trials_mod.Z} standard errors):")
        for o in choice.tied:
            lines.append(f"  ~ trial {o.number:>4}  {o.params:>7,} params  val {o.describe()}")
    return "\n".join(lines)


def _seed(t: optuna.trial.FrozenTrial) -> Any:
    cfg = _recorded_config(t)
    return cfg.train.seed if cfg is not None else "?"


def _acc(t: optuna.trial.FrozenTrial) -> float:
    return float(t.user_attrs[trials_mod.BEST_VAL_ACC])


def _recorded_config(t: optuna.trial.FrozenTrial) -> ExperimentConfig | None:
    """The full config a trial trained, from its checkpoint folder's best.json (None if not here)."""
    meta = Path(t.user_attrs.get(trials_mod.CHECKPOINT_DIR, "")) / checkpoint.BEST_META
    try:
        return from_dict(json.loads(meta.read_text())["config"], str(meta))
    except (OSError, ValueError, KeyError, UserError):
        return None


# -- the weights of a trial -------------------------------------------------------------------

def trial_weights(trial: optuna.trial.FrozenTrial, tracker: Any, scratch: Path
                  ) -> tuple[ExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The trial's best-epoch weights and config, checksum- and shape-verified.

    Read from the trial's checkpoint folder; where that is gone (another machine), from the
    checkpoints its MLflow run stored.
    """
    folder = Path(trial.user_attrs.get(trials_mod.CHECKPOINT_DIR, ""))
    run_id = trial.user_attrs.get(trials_mod.MLFLOW_RUN_ID)
    if not (folder / checkpoint.BEST).is_file() and run_id and tracker is not None:
        folder = tracker.download_checkpoints(run_id, scratch) or folder
    if not (folder / checkpoint.BEST).is_file():
        raise UserError(f"trial {trial.number}: checkpoint missing ({folder / checkpoint.BEST} does not exist"
                        + (f" and MLflow run {run_id} has no checkpoints/{checkpoint.BEST}" if run_id else "") + ")")
    weights, meta = checkpoint.load_best(folder)
    cfg = from_dict(meta.get("config"), f"{folder / checkpoint.BEST_META}")
    n_params = count_params(cfg.model)
    if n_params != trial.user_attrs.get(trials_mod.PARAM_COUNT, n_params):
        raise UserError(f"{folder / checkpoint.BEST_META}: its config has {n_params:,} params, "
                        f"trial {trial.number} recorded {trial.user_attrs[trials_mod.PARAM_COUNT]:,}")
    net = build_model(cfg.model)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise UserError(f"{folder / checkpoint.BEST}: weights do not match their config "
                        f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return cfg, weights, meta


# -- the export --------------------------------------------------------------------------------

class Classifier(torch.nn.Module):
    """The exported graph: normalise pixels in [0, 1], then the network."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(data.MEAN))
        self.register_buffer("std", torch.tensor(data.STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


def test_pixels(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test images as float32 pixels in [0, 1], (N, 1, 28, 28), and their labels."""
    x, y = data.cached_arrays(data_dir)["test"]
    return (x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0), y.astype(np.int64)


def _batched(fn: Any, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


def outputs(folder: Path, cfg: ExperimentConfig, x: np.ndarray) -> dict[str, np.ndarray]:
    """Log-probabilities of every image from each exported file, loaded the way a user loads it."""
    import onnxruntime as ort
    from safetensors.torch import load_file

    net = build_model(cfg.model)
    net.load_state_dict(load_file(str(folder / WEIGHTS)), strict=True)
    eager = Classifier(net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated in favour of torch.export
        script = torch.jit.load(str(folder / TORCHSCRIPT), map_location="cpu").eval()
    session = ort.InferenceSession(str(folder / ONNX), providers=["CPUExecutionProvider"])

    def torch_fn(model: Any) -> Any:
        def run(chunk: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(chunk)).numpy()
        return run

    return {"safetensors": _batched(torch_fn(eager), x), "torchscript": _batched(torch_fn(script), x),
            "onnx": _batched(lambda chunk: session.run(None, {INPUT["name"]: chunk})[0], x)}


def agreement(out: dict[str, np.ndarray], y: np.ndarray) -> dict[str, float]:
    """Each format's test accuracy; UserError if the formats disagree on any prediction."""
    preds = {name: o.argmax(1) for name, o in out.items()}
    ref_name, ref = next(iter(preds.items()))
    for name, p in preds.items():
        differ = int((p != ref).sum())
        if differ:
            raise UserError(f"export check failed: {name} and {ref_name} disagree on {differ} of {len(y):,} "
                            "test images")
    gap = max(float(np.abs(o - out[ref_name]).max()) for o in out.values())
    if gap > 1e-3:
        raise UserError(f"export check failed: outputs of the formats differ by up to {gap:.2g}")
    return {name: round(100.0 * float((p == y).mean()), 4) for name, p in preds.items()}


def _write_model_files(folder: Path, cfg: ExperimentConfig, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS))
    net = build_model(cfg.model)
    net.load_state_dict(weights, strict=True)
    model = Classifier(net).eval()
    example = torch.rand(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript and the exporter announce their own futures
        with torch.inference_mode():
            torch.jit.save(torch.jit.trace(model, example), str(folder / TORCHSCRIPT))
        torch.onnx.export(model, (example,), str(folder / ONNX), dynamo=True, external_data=False, verbose=False,
                          input_names=[INPUT["name"]], output_names=[OUTPUT["name"]],
                          dynamic_shapes={"images": {0: torch.export.Dim("batch")}})


def _versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("mnistlab", "torch", "onnx", "onnxruntime", "safetensors", "numpy", "optuna", "mlflow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


@dataclass
class Exported:
    """What `mnistlab best --export` reports."""

    folder: Path
    test_acc: float
    accuracies: dict[str, float]
    info: dict[str, Any]
    example: np.ndarray  # two test images, the registry's input example


OWN_FILES = frozenset({WEIGHTS, CONFIG, TORCHSCRIPT, ONNX, CARD, CURVES})
MODEL_FILES = (WEIGHTS, TORCHSCRIPT, ONNX)  # in every export, with their SHA-256 in config.json
HASHED = frozenset({*MODEL_FILES, CURVES})  # the only names config.json's "files" may list


def _prepare_target(given: Path, force: bool) -> Path:
    """The export folder, resolved; UserError (nothing touched) where writing there could lose data."""
    if given.is_symlink():  # replacing it would act on the link's target, wherever that is
        raise UserError(f"export folder {given}: is a symbolic link; give a real folder")
    out = given.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"export folder {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"export folder {out}: exists and is not empty (use --force to replace it)")
        _check_replaceable(out)
    parent = out.parent
    if not parent.is_dir():
        raise UserError(f"export folder {out}: its parent {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"export folder {out}: {parent} is not writable")
    return out


def _check_replaceable(out: Path) -> None:
    """``--force`` replaces an earlier export and nothing else: a folder with a ``config.json`` of
    this format and only the export's own files. That rules out the working folder and every
    folder above it, the stores, the checkpoints and anything of the user's."""
    if Path.cwd().resolve().is_relative_to(out):
        raise UserError(f"export folder {out}: is the working folder or holds it; --force replaces only an "
                        "earlier export")
    strangers = sorted(p.name for p in out.iterdir() if p.name not in OWN_FILES or p.is_symlink() or not p.is_file())
    try:
        fmt = json.loads((out / CONFIG).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if strangers or fmt != FORMAT:
        why = f"it holds {strangers[0]!r}" if strangers else f"no {CONFIG} of format {FORMAT!r}"
        raise UserError(f"export folder {out}: not an earlier mnistlab export ({why}); --force replaces only "
                        "those: choose another folder")


def refit_weights(refit: Any) -> tuple[ExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The exported refit's final weights and config, checksum- and shape-verified."""
    folder = refit.exported.folder
    weights, meta = checkpoint.load_best(folder)
    cfg = from_dict(meta.get("config"), f"{folder / checkpoint.BEST_META}")
    net = build_model(cfg.model)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError:
        raise UserError(f"{folder / checkpoint.BEST}: weights do not match their config") from None
    return cfg, weights, meta


def export(choice: Choice, study: optuna.Study, out: Path, *, force: bool = False, tracker: Any = None,
           data_dir: Path | None = None, refit: Any = None) -> Exported:
    """Write the picked trial's model (or, with ``refit``, its exported refit) into ``out``:
    all of it, checked, or nothing."""
    from mnistlab.provenance import environment

    out = _prepare_target(out, force)
    _remove_stale_partials(out)
    trial = choice.trial
    previous = interrupts.stop_on_signals()  # SIGTERM then raises like SIGINT, so the temporary folder is removed
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out), suffix=".partial", dir=out.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the delivered folder is an ordinary one
    except OSError as exc:
        interrupts.restore(previous)
        raise UserError(f"export folder {out}: cannot write in {out.parent} ({exc.strerror})") from None
    try:
        if refit is not None:
            cfg, weights, meta = refit_weights(refit)
        else:
            cfg, weights, meta = trial_weights(trial, tracker, tmp / ".download")
        shutil.rmtree(tmp / ".download", ignore_errors=True)
        _write_model_files(tmp, cfg, weights)
        x, y = test_pixels(data_dir)
        accuracies = agreement(outputs(tmp, cfg, x), y)
        test_acc = accuracies["safetensors"]
        a = trial.user_attrs
        curves = refit is None and trial_curves(trial, tracker, tmp / CURVES)
        files = [*MODEL_FILES] + ([CURVES] if curves else [])
        info = {
            "format": FORMAT,
            "study": study.study_name,
            "trial": trial.number,
            "mlflow_run_id": refit.exported.run_id if refit is not None else a.get(trials_mod.MLFLOW_RUN_ID),
            "params": count_params(cfg.model),
            "val_acc": meta.get("val_acc") or a.get(trials_mod.BEST_VAL_ACC),
            "val_score": round(choice.group.mean, 4),
            "val_score_se": round(choice.group.se, 4),
            "val_seeds": choice.group.n_seeds,
            "best_epoch": meta.get("epoch", a.get(trials_mod.BEST_EPOCH)),
            "epochs_run": a.get(trials_mod.EPOCHS_RUN),
            "test_acc": test_acc,
            "test_images": int(len(y)),
            "trial_test_acc": a.get(trials_mod.TEST_ACC),
            "trial_test_images": cfg.data.limit_eval or data.SIZES["test"],
            "picked_by": choice.rule,
            "refit": refit.summary() if refit is not None else None,
            "input": INPUT,
            "output": OUTPUT,
            "files": {name: data.sha256(tmp / name) for name in files},
            "config": cfg.to_dict(),
            "git_commit": environment()["git_commit"],
            "versions": _versions(),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / CONFIG).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / CARD).write_text(model_card(info, cfg, accuracies, curves))
        for path in tmp.iterdir():  # safetensors writes its file 0600: every file gets the umask's mode
            path.chmod(0o666 & ~_umask())
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        interrupts.restore(previous)
    return Exported(out, test_acc, accuracies, info, x[:2])


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _partial_prefix(out: Path) -> str:
    """The start of the temporary folder's name: ``.DIR.<host>-<pid>.``, so a later export can tell
    whether the process that made it still runs."""
    return f".{out.name}.{_host_tag()}-{os.getpid()}."


def _remove_stale_partials(out: Path) -> None:
    """Remove temporary folders of earlier exports into ``out`` that were killed (SIGKILL, a power
    cut): only ``.DIR.<host>-<pid>.XXXXXXXX.partial`` folders of this DIR, made on this machine by a
    process that no longer runs. Another machine's (a shared folder) and older-style names are kept:
    whether their process runs cannot be known from here."""
    shape = re.compile(rf"\.{re.escape(out.name)}\.([0-9a-f]{{8}})-(\d+)\.[a-z0-9_]{{8}}\.partial")
    host = _host_tag()
    for path in out.parent.iterdir():
        found = shape.fullmatch(path.name)
        if found and found.group(1) == host and not path.is_symlink() and path.is_dir() \
                and not _running(int(found.group(2))):
            shutil.rmtree(path, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    """This process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder over ``out``; an old ``out`` is removed only after the swap."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _seeds(info: dict[str, Any]) -> str:
    return f", mean of {info['val_seeds']} seeds" if info.get("val_seeds", 1) > 1 else ""


def _test_rows(info: dict[str, Any]) -> list[str]:
    r = info.get("refit")
    if not r:
        return [f"| test accuracy recorded by the trial | {info['trial_test_acc']}% on "
                f"{info['trial_test_images']:,} images |"]
    per_seed = ", ".join(f"seed {k}: {v:.2f}%" for k, v in r["test_acc"].items())
    return [f"| refit test accuracy over {len(r['seeds'])} seeds | mean {r['test_acc_mean']:.2f}% ± "
            f"{r['test_acc_std']:.2f} (std), min {r['test_acc_min']:.2f}% ({per_seed}) |"]


def _protocol(info: dict[str, Any]) -> list[str]:
    r = info.get("refit")
    if not r:
        return ["The weights are those of the trial's best validation epoch. Validation picked them; the",
                "test set was never used for a choice."]
    return [f"Protocol: validation (the last 10,000 training images) picked trial {info['trial']}'s configuration.",
            "It was then trained again on all training images, with its own recipe and epochs, once per seed",
            f"({', '.join(map(str, r['seeds']))}); each refit read the test set once, after its last epoch. These",
            f"are the weights of seed {r['exported_seed']}, the configuration's own seed, fixed before any test",
            "figure existed; the other seeds show the spread."]


def model_card(info: dict[str, Any], cfg: ExperimentConfig, accuracies: dict[str, float], curves: bool) -> str:
    """MODEL_CARD.md: what the model is, how good, how to load each file."""
    m = cfg.model
    acc = " / ".join(f"{k} {v:.2f}%" for k, v in accuracies.items())
    lines = [
        f"# {info['study']}: trial {info['trial']}",
        "",
        f"A {info['params']:,}-parameter MNIST classifier found by the mnistlab study `{info['study']}` "
        f"(picked by {info['picked_by']}).",
        "",
        "| | |",
        "|---|---|",
        f"| parameters | {info['params']:,} |",
        f"| validation score | {info['val_score']:.2f}% ± {info['val_score_se']:.2f} (mean of the last "
        f"epochs{_seeds(info)}; what picked it) |",
        f"| test accuracy (re-measured at export) | {info['test_acc']:.2f}% on {info['test_images']:,} images |",
        f"| test accuracy per format | {acc} |",
        *_test_rows(info),
        f"| widths | {list(m.widths)} |",
        f"| dropout | {m.dropout} |",
        f"| learning rate | {cfg.train.lr} ({cfg.train.schedule}, {cfg.train.optimizer}) |",
        f"| MLflow run | {info['mlflow_run_id']} |",
        f"| git commit | {info['git_commit']} |",
        "",
        *_protocol(info),
        "",
    ]
    if curves:
        lines += [f"![learning curves]({CURVES})", ""]
    lines += [
        "## Network", "", "```", summary(m), "```", "",
        "## Input and output", "",
        "Images are float32 tensors shaped (N, 1, 28, 28) holding pixels in [0, 1] (`uint8 / 255`).",
        f"`{TORCHSCRIPT}` and `{ONNX}` normalise inside (mean {data.MEAN}, std {data.STD}) and return",
        "log-probabilities (N, 10); the digit is their argmax. The network in `model.safetensors` takes",
        "normalised images: `(pixels - 0.1307) / 0.3081`.",
        "",
        "## Loading", "",
        "ONNX Runtime (no PyTorch needed):", "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        f"session = ort.InferenceSession(\"{ONNX}\")",
        "pixels = np.zeros((1, 1, 28, 28), np.float32)  # your images, values in [0, 1]",
        "digits = session.run(None, {\"images\": pixels})[0].argmax(1)",
        "```", "",
        "TorchScript (PyTorch only):", "",
        "```python",
        "import torch",
        f"model = torch.jit.load(\"{TORCHSCRIPT}\").eval()",
        "digits = model(torch.zeros(1, 1, 28, 28)).argmax(1)",
        "```", "",
        "safetensors (the architecture from mnistlab, no pickle):", "",
        "```python",
        "import json, torch",
        "from safetensors.torch import load_file",
        "from mnistlab.config import from_dict",
        "from mnistlab.model import build_model",
        f"cfg = from_dict(json.load(open(\"{CONFIG}\"))[\"config\"])",
        "net = build_model(cfg.model)",
        f"net.load_state_dict(load_file(\"{WEIGHTS}\"))",
        "digits = net.eval()((torch.zeros(1, 1, 28, 28) - 0.1307) / 0.3081).argmax(1)",
        "```", "",
        "`mnistlab evaluate .` re-measures the test accuracy from these files.", "",
    ]
    return "\n".join(lines)


# -- evaluate an export -----------------------------------------------------------------------

def evaluate_folder(folder: Path, data_dir: Path | None = None) -> dict[str, Any]:
    """Re-measure an exported model from its files alone; UserError on a bad or altered export."""
    folder = folder.resolve()
    info = _export_info(folder)
    _check_files(folder, info["files"])
    cfg = from_dict(info.get("config"), f"{folder / CONFIG}")
    x, y = test_pixels(data_dir)
    try:
        out = outputs(folder, cfg, x)
    except UserError:
        raise
    except Exception as exc:  # a file that passed its checksum but does not load
        raise UserError(f"{folder}: cannot load the model ({type(exc).__name__}: {str(exc)[:200]})") from None
    accuracies = agreement(out, y)
    return {"info": info, "accuracies": accuracies, "test_images": int(len(y))}


def _export_info(folder: Path) -> dict[str, Any]:
    """config.json of an export, its shape checked: what evaluate reads from it is all there."""
    where = folder / CONFIG
    try:
        info = json.loads(where.read_text())
    except FileNotFoundError:
        raise UserError(f"{folder}: no {CONFIG}; not an mnistlab export") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{where}: unreadable ({clip(str(exc))})") from None
    if not isinstance(info, dict):
        raise UserError(f"{where}: expected a JSON object; not an mnistlab export")
    if info.get("format") != FORMAT:
        raise UserError(f"{where}: format {clip(info.get('format'))}, expected {FORMAT!r}")
    acc = info.get("test_acc")
    if isinstance(acc, bool) or not isinstance(acc, (int, float)) or not math.isfinite(acc):
        raise UserError(f"{where}: test_acc must be a number; got {clip(acc)}")
    if not isinstance(info.get("files"), dict):
        raise UserError(f"{where}: files must map each model file to its SHA-256")
    return info


def _check_files(folder: Path, files: dict[str, Any]) -> None:
    """Every model file of the export, and nothing else, against its SHA-256.

    Only the export's own file names are accepted, so a config.json cannot point evaluate at a
    path outside the folder, and each model file must be listed, so none escapes the check."""
    where = folder / CONFIG
    strangers = sorted(set(files) - HASHED, key=str)
    if strangers:
        raise UserError(f"{where}: files lists {clip(strangers[0])}, not a file of an export")
    missing = [name for name in MODEL_FILES if name not in files]
    if missing:
        raise UserError(f"{where}: files lacks {missing[0]}; every model file must have its SHA-256")
    for name, digest in files.items():
        path = folder / name
        if path.is_symlink():  # its checksum would vouch for a file outside the export
            raise UserError(f"{path}: is a symbolic link; an export holds plain files")
        if not path.is_file():
            raise UserError(f"{path}: missing")
        if not isinstance(digest, str) or data.sha256(path) != digest:
            raise UserError(f"{path}: checksum does not match {CONFIG} (altered or corrupt)")
