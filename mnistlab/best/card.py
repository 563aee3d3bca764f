"""MODEL_CARD.md of an export: what the model is, how good, how to load each file."""

from __future__ import annotations

from typing import Any

from mnistlab.best.formats import CURVES, FORMATS, ONNX, TORCHSCRIPT
from mnistlab.core import data
from mnistlab.core.config import SIZES, ExperimentConfig
from mnistlab.core.model import summary


def _seeds(info: dict[str, Any]) -> str:
    return f", mean of {info['val_seeds']} seeds" if info.get("val_seeds", 1) > 1 else ""


POOLS = {"search": "training images", "refit": "training images (training and validation together)",
         "val": "validation images (the last 10,000 of MNIST's training file)", "test": "test images"}


def images(n: int, total: int, what: str) -> str:
    """``all 60,000 training images`` or ``the first 2,000 of the 60,000 training images``."""
    return f"all {total:,} {what}" if n >= total else f"the first {n:,} of the {total:,} {what}"


def _counts(info: dict[str, Any], key: str) -> dict[str, Any]:
    """The images the search trial or the refit counted (exports written before this was recorded:
    the full sets, as every shipped study used then)."""
    default = {"train": SIZES["train"] + (SIZES["val"] if key == "refit" else 0),
               "val": None if key == "refit" else SIZES["val"], "test": SIZES["test"]}
    return (info.get("images") or {}).get(key) or default


def _test_rows(info: dict[str, Any]) -> list[str]:
    r = info.get("refit")
    if not r:
        return [f"| test accuracy recorded by the trial | {info['trial_test_acc']}% on "
                f"{info['trial_test_images']:,} images |"]
    per_seed = ", ".join(f"seed {k}: {v:.2f}%" for k, v in r["test_acc"].items())
    return [f"| refit test accuracy over {len(r['seeds'])} seeds | mean {r['test_acc_mean']:.2f}% ± "
            f"{r['test_acc_std']:.2f} (std), min {r['test_acc_min']:.2f}% ({per_seed}), on "
            f"{_counts(info, 'refit')['test']:,} images |"]


def _protocol(info: dict[str, Any]) -> list[str]:
    r = info.get("refit")
    search, total = _counts(info, "search"), SIZES
    trained = images(search["train"], total["train"], POOLS["search"])
    picked = images(search["val"], total["val"], POOLS["val"])
    if not r:
        lines = [f"The weights are those of the trial's best validation epoch. The trial trained on {trained};",
                 f"validation on {picked} picked them; the test set was never used for a choice."]
        if info["trial_test_images"] != info["test_images"]:
            lines += ["", f"The trial's own test figure counts {info['trial_test_images']:,} test images (the study's "
                      f"`data.limit_eval`); the one re-measured at export counts {info['test_images']:,}: they",
                      "differ by the images counted, not by the weights."]
        return lines
    refit = _counts(info, "refit")
    lines = [f"Protocol: validation on {picked} picked trial {info['trial']}'s configuration, which had trained on",
             f"{trained}. It was then trained again on "
             f"{images(refit['train'], total['train'] + total['val'], POOLS['refit'])},",
             f"with its own recipe and epochs, once per seed ({', '.join(map(str, r['seeds']))}); each refit read "
             f"{images(refit['test'], total['test'], POOLS['test'])}",
             f"once, after its last epoch. These are the weights of seed {r['exported_seed']}, the configuration's "
             "own seed, fixed before any test",
             "figure existed; the other seeds show the spread."]
    if refit["test"] != info["test_images"]:
        lines += ["", f"The refit's figures count {refit['test']:,} test images (the study's `data.limit_eval`); the "
                  f"test accuracy at the top re-measures these weights on {info['test_images']:,}: the two differ by",
                  "the images counted, not by the weights."]
    return lines


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
        f"accuracy on {_counts(info, 'search')['val']:,} images{_seeds(info)}; what picked it) |",
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
