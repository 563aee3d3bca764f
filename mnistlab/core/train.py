"""The trainer: a plain function that knows nothing about Optuna or MLflow.

``train(cfg, data, on_epoch=...)`` runs the epochs, checkpoints after each one and calls
``on_epoch(metrics)`` once the checkpoint is on disk; the callback is its only channel out
(a callback may raise to stop the run, e.g. a pruner).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mnistlab.core import checkpoint
from mnistlab.core.checkpoint_files import BEST, BEST_META, LAST, PREV, SUM
from mnistlab.core.config import ExperimentConfig, TrainConfig
from mnistlab.core.data import MnistData, Split, batches
from mnistlab.core.metrics import EpochMetrics, Result
from mnistlab.core.model import build_model, count_params
from mnistlab.util.errors import UserError, clip

OnEpoch = Callable[[EpochMetrics], None]


MATCH_IMAGES = 2  # validation images by which a re-measured checkpoint may differ from its record


class Diverged(Exception):
    """The training loss became NaN or infinite: the run cannot recover (too high a learning rate)."""


@dataclass
class Restored:
    """The checkpoint a resume takes over, read and verified once (``restore``): its path (None when
    there is nothing to take over), its state, what was passed over, and its epochs."""

    path: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    passed_over: str = ""  # unusable checkpoints skipped on the way, "" if none

    @property
    def history(self) -> list[EpochMetrics]:
        return [EpochMetrics(**m) for m in self.state.get("history", [])]


def restore(cfg: ExperimentConfig, data: MnistData, checkpoint_dir: Path) -> Restored:
    """What a resume of ``cfg`` takes over from ``checkpoint_dir``, the newest usable checkpoint read
    once (checksum, a weights-only load, every field) and measured before anything is believed
    (``unproven``): one not believed is set aside (``refused/``) with a warning line and the
    resume starts from epoch 0. UserError for a checkpoint of another config."""
    if not checkpoint_dir.is_dir():
        return Restored()
    good, state, passed_over = checkpoint.load_latest(checkpoint_dir, map_location=data.train.x.device)
    if good is None:
        return Restored(passed_over=passed_over)
    if state["config"] != cfg.to_dict():
        raise UserError(f"{good}: checkpoint of a different config; not resuming from it")
    why = _unproven(cfg, data, checkpoint_dir, good, state)
    if why:
        _set_aside(checkpoint_dir, why)
        return Restored()
    return Restored(good, state, passed_over)


def restored_history(checkpoint_dir: Path) -> list[EpochMetrics]:
    """The epochs ``train(..., resume=True)`` takes over from ``checkpoint_dir``: those recorded in
    its newest usable checkpoint (none when there is no such checkpoint)."""
    if not checkpoint_dir.is_dir():
        return []
    _, state, _ = checkpoint.load_latest(checkpoint_dir)
    return [EpochMetrics(**m) for m in state.get("history", [])]


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; UserError for a device this machine lacks (asked
    before any tensor goes there, where torch would fail with a traceback)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):  # torch's own message for "cuda:x" or an index past 64 bits
        raise UserError(f"device {clip(name)}: not a device name (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {name}: this machine has no CUDA device that torch can use; use cpu or auto")
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name}: this machine has {count} CUDA device{'s' if count > 1 else ''} "
                            f"(cuda:0 to cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name}: Apple's MPS is not available on this machine; use cpu or auto")
    return device


def make_optimizer(model: torch.nn.Module, t: TrainConfig, steps_per_epoch: int) -> tuple[Any, Any]:
    """Optimiser and a per-batch learning-rate schedule."""
    if t.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum,
                              nesterov=t.nesterov and t.momentum > 0, weight_decay=t.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    total = t.epochs * steps_per_epoch
    if t.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.lr, total_steps=total, pct_start=t.pct_start)
    elif t.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=t.step_epochs * steps_per_epoch, gamma=t.gamma)
    else:
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total), gamma=1.0)
    return opt, sched


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, batch_size: int = 2000) -> tuple[float, int]:
    """Summed NLL loss and correct count over a split (model put in eval mode)."""
    model.eval()
    loss = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), dtype=torch.long, device=split.x.device)
    for start in range(0, len(split), batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        out = model(x).float()
        loss += F.nll_loss(out, y, reduction="sum")
        correct += (out.argmax(1) == y).sum()
    return loss.item(), int(correct.item())


def _autocast(device: torch.device, t: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and t.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _Run:
    """The state of one run; split out of ``train`` so resume and the loop stay small."""

    def __init__(self, cfg: ExperimentConfig, data: MnistData, device: torch.device) -> None:
        t = cfg.train
        self.cfg, self.data, self.device = cfg, data, device
        torch.manual_seed(t.seed)
        fmt = torch.channels_last if t.channels_last else torch.contiguous_format
        self.model = build_model(cfg.model).to(device, memory_format=fmt)
        self.net = torch.compile(self.model) if t.compile else self.model
        self.steps = -(-len(data.train) // t.batch_size)
        self.opt, self.sched = make_optimizer(self.model, t, self.steps)
        self.gen = torch.Generator(device=device)
        self.gen.manual_seed(t.seed)
        self.epoch = 0
        self.history: list[EpochMetrics] = []

    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "batch_rng": self.gen.get_state(),
            "history": [asdict(m) for m in self.history],
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.gen.set_state(state["batch_rng"])
        self.epoch = int(state["epoch"])
        self.history = [EpochMetrics(**m) for m in state["history"]]

    def train_epoch(self, show: bool) -> tuple[float, float]:
        t = self.cfg.train
        self.net.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        bar = tqdm(total=self.steps, desc=f"epoch {self.epoch + 1}", leave=False, disable=None if show else True,
                   dynamic_ncols=True, mininterval=0.5)
        for i, (x, y) in enumerate(batches(self.data.train, t.batch_size, self.gen, self.cfg.data)):
            with _autocast(self.device, t):
                out = self.net(x)
                loss = F.cross_entropy(out.float(), y, label_smoothing=t.label_smoothing)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.detach().argmax(1) == y).sum()
            bar.update()
            if show and i % 20 == 0:
                bar.set_postfix_str(f"loss={loss.item():.4f} batch_id={i}")
        bar.close()
        n = len(self.data.train)
        return loss_sum.item() / n, 100.0 * correct.item() / n


def train(
    cfg: ExperimentConfig,
    data: MnistData,
    on_epoch: OnEpoch | None = None,
    *,
    checkpoint_dir: Path | None = None,
    resume: bool | Restored = False,
    verbose: bool = True,
    test_once: bool = False,
) -> Result:
    """Train ``cfg`` on ``data``; checkpoint each epoch; evaluate the best weights on test.

    With ``resume``, continue from the newest intact checkpoint in ``checkpoint_dir`` (or from the
    ``Restored`` checkpoint given, which ``restore`` has read and measured already); on the CPU the
    final weights equal those of an uninterrupted run. With ``test_once`` and no
    validation split (``data.full_train``), the epochs measure nothing held out and the test
    set is read once, after the last epoch (a refit); otherwise such a run shows the test
    accuracy of every epoch, as the original exercise's log did.
    """
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    device = data.train.x.device
    run = _Run(cfg, data, device)
    if resume is not False and checkpoint_dir is not None:
        _resume(run, resume if isinstance(resume, Restored) else _read(checkpoint_dir, run.device), verbose)
    result = Result(params=count_params(cfg.model), device=str(device),
                    checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    best_state = _best_from_history(run.history, result)
    eval_split, label = ("test", "Test") if data.val is None else ("val", "Validation")
    evaluation = data.test if data.val is None else data.val
    while run.epoch < t.epochs:
        start = time.perf_counter()
        train_loss, train_acc = run.train_epoch(verbose)
        if not math.isfinite(train_loss):  # before its checkpoint: last.pt keeps the last sound epoch
            raise Diverged(f"training diverged at epoch {run.epoch + 1}: the loss became {train_loss} "
                           f"(train.lr {t.lr} is likely too high)")
        blind = test_once and data.val is None
        loss_sum, correct = (float("nan"), 0) if blind else evaluate(run.net, evaluation, t.eval_batch_size)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        run.epoch += 1
        total = 0 if blind else len(evaluation)
        m = EpochMetrics(run.epoch, train_loss, train_acc, loss_sum / max(1, total),
                         100.0 * correct / total if total else float("nan"), correct, total, run.sched.get_last_lr()[0],
                         seconds, len(data.train) / seconds, "none" if blind else eval_split)
        run.history.append(m)
        if verbose and not blind:
            print(f"{label}: Average loss: {m.val_loss:.4f}, Accuracy: {correct}/{total} ({m.val_acc:.2f}%)")
        if data.val is not None and m.val_acc > result.best_val_acc:
            result.best_val_acc, result.best_epoch = m.val_acc, m.epoch
            best_state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            if checkpoint_dir is not None:
                meta = {"config": cfg.to_dict(), "epoch": m.epoch, "val_acc": m.val_acc, "params": result.params}
                checkpoint.save_best(checkpoint_dir, run.model, meta)
        if checkpoint_dir is not None:
            checkpoint.save_state(checkpoint_dir, run.state())
        if on_epoch is not None:
            on_epoch(m)
    result.history = run.history
    _finish(run, result, best_state, checkpoint_dir, verbose)
    return result


def _read(checkpoint_dir: Path, device: torch.device) -> Restored:
    good, state, passed_over = checkpoint.load_latest(checkpoint_dir, map_location=device)
    return Restored(good, state, passed_over)


def _resume(run: _Run, restored: Restored, verbose: bool) -> None:
    """Restore a checkpoint; one warning line when there were checkpoints but none usable."""
    good, state = restored.path, restored.state
    if good is None:
        if restored.passed_over:
            print(f"warning: no usable checkpoint ({restored.passed_over}); training starts again from epoch 0",
                  file=sys.stderr, flush=True)
        return
    if state["config"] != run.cfg.to_dict():
        raise UserError(f"{good}: checkpoint of a different config; not resuming from it")
    try:
        run.restore(state)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:  # what checkpoint.misfit cannot foresee
        raise UserError(f"{good}: does not fit this run ({type(exc).__name__}: {str(exc)[:200]}); move it "
                        "aside to start again") from None
    if verbose:
        print(f"Resuming from {good} after epoch {run.epoch}")


def unproven(cfg: ExperimentConfig, data: MnistData, checkpoint_dir: Path) -> str:
    """Why the checkpoint a resume would take from ``checkpoint_dir`` is not believed ("" when it is):
    its weights, and the best weights beside it, must fit ``cfg`` and score on the validation split
    what the checkpoint records they scored (within MATCH_IMAGES or 0.1%, for another device's
    arithmetic). A checksum only says a file is the one written; a file written to lie, or the best
    weights of another configuration, passes it. The checks cost one evaluation each (about a
    second) and leave every random generator as it was."""
    good, state, _ = checkpoint.load_latest(checkpoint_dir, config=cfg.to_dict())
    return _unproven(cfg, data, checkpoint_dir, good, state)


def _unproven(cfg: ExperimentConfig, data: MnistData, checkpoint_dir: Path, good: Path | None,
              state: dict[str, Any]) -> str:
    if good is None or data.val is None:
        return ""  # nothing to resume, or nothing to measure on (a refit: its test is read at the end)
    history = [EpochMetrics(**m) for m in state["history"]]
    claims = [m for m in history if m.eval_split == "val"]
    if not claims:
        return ""
    allowed = max(MATCH_IMAGES, len(data.val) // 1000)
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        net = build_model(cfg.model)
    net = net.to_empty(device=data.val.x.device)
    last = claims[-1]
    net.load_state_dict(state["model"])
    _, correct = evaluate(net, data.val, cfg.train.eval_batch_size)
    if abs(correct - last.val_correct) > allowed:
        return (f"{good}: its weights score {100 * correct / len(data.val):.2f}% on validation, not the "
                f"{last.val_acc:.2f}% it records for epoch {last.epoch}")
    best = max(claims, key=lambda m: m.val_acc)  # the first of equal ones, as train() keeps it
    try:
        weights, meta = checkpoint.load_best(checkpoint_dir)
    except UserError as exc:
        return str(exc)
    problem = checkpoint.weights_misfit(weights, net)
    if problem or meta.get("epoch") != best.epoch:
        return f"{checkpoint_dir / BEST}: " + (problem or f"of epoch {clip(meta.get('epoch'))}, "
                                                          f"the best epoch is {best.epoch}")
    net.load_state_dict(weights)
    _, correct = evaluate(net, data.val, cfg.train.eval_batch_size)
    if abs(correct - best.val_correct) > allowed:
        return (f"{checkpoint_dir / BEST}: scores {100 * correct / len(data.val):.2f}% on validation, "
                f"not the {best.val_acc:.2f}% recorded for epoch {best.epoch}")
    return ""


def _set_aside(checkpoint_dir: Path, why: str) -> None:
    """Set aside (into ``refused/`` inside the folder) a checkpoint that ``unproven`` does not believe,
    with one warning line: the training starts again from epoch 0, as from a corrupt checkpoint."""
    aside = checkpoint_dir / "refused"
    aside.mkdir(exist_ok=True)
    for name in (LAST, PREV, BEST, BEST_META):
        for path in (checkpoint_dir / name, checkpoint_dir / (name + SUM)):
            if path.is_file() and not path.is_symlink():
                os.replace(path, aside / path.name)
    print(f"warning: checkpoint not believed ({why}); set aside in {aside}, training starts again from epoch 0",
          file=sys.stderr, flush=True)


def _best_from_history(history: list[EpochMetrics], result: Result) -> dict[str, torch.Tensor] | None:
    for m in history:
        if m.eval_split == "val" and m.val_acc > result.best_val_acc:
            result.best_val_acc, result.best_epoch = m.val_acc, m.epoch
    return None  # the best weights of a resumed run are read back from best.safetensors


def _finish(run: _Run, result: Result, best_state: dict[str, Any] | None, ckpt: Path | None, verbose: bool) -> None:
    """Report the test set once, on the weights a user would keep."""
    if run.data.val is not None:
        if best_state is None and ckpt is not None and (ckpt / BEST).exists():
            best_state, _ = checkpoint.load_best(ckpt)
        if best_state is not None:
            run.model.load_state_dict(best_state)
    last = run.history[-1] if run.history else None
    if run.data.val is None and last is not None and last.eval_split == "test" and last.epoch == run.epoch:
        # full-train: the last epoch measured the test set on these very weights, and printed it
        result.test_loss, result.test_acc = last.val_loss, last.val_acc
        result.test_correct, result.test_total = last.val_correct, last.val_total
        return
    loss_sum, correct = evaluate(run.model, run.data.test, run.cfg.train.eval_batch_size)
    total = len(run.data.test)
    result.test_loss, result.test_acc = loss_sum / total, 100.0 * correct / total
    result.test_correct, result.test_total = correct, total
    if verbose:
        which = f"best epoch {result.best_epoch}" if run.data.val is not None else "last epoch"
        print(f"Test ({which}): Average loss: {result.test_loss:.4f}, "
              f"Accuracy: {correct}/{total} ({result.test_acc:.2f}%)")
