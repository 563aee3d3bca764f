"""MODEL_CARD.md of an export: what the model is, how good, how to load each file."""

from __future__ import annotations

from typing import Any

from mnistlab.best.formats import CURVES, FORMATS, ONNX, TORCHSCRIPT
from mnistlab.core import data
from mnistlab.core.config import ExperimentConfig
from mnistlab.core.model import summary


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
        f"| validation score | {info['val_score']:.2f}% ± {info['val_score_se']:.2f} (the last epoch's "
        f"accuracy{_seeds(info)}; what picked it) |",
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
        # the least demanding first: ONNX Runtime needs no PyTorch, safetensors needs mnistlab
        *(line for fmt in reversed(FORMATS) for line in fmt.loading),
        "`mnistlab evaluate .` re-measures the test accuracy from these files.", "",
    ]
    return "\n".join(lines)
