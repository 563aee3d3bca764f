"""An export's files: the table of model formats, each written from the network and loaded back
the way a user loads it (every format must agree on every test prediction), and the names of
the export's other files; the only place an export's file names are spelled.

Exported TorchScript and ONNX models take pixels in [0, 1] (``uint8 / 255``) shaped
(N, 1, 28, 28) and normalise inside; they return log-probabilities (N, 10).

A new format is one ``Format`` in ``FORMATS``: its file, how to write it, how to load it back,
and MODEL_CARD.md's lines on loading it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mnistlab.core import data
from mnistlab.core.config import ExperimentConfig
from mnistlab.core.model import build_model
from mnistlab.util.errors import UserError

WEIGHTS, CONFIG, TORCHSCRIPT, ONNX, CARD, CURVES = (
    "model.safetensors", "config.json", "model.torchscript.pt", "model.onnx", "MODEL_CARD.md", "learning_curves.png")
INPUT = {"name": "images", "shape": [None, 1, 28, 28], "dtype": "float32",
         "range": "pixels in [0, 1] (uint8 / 255); the TorchScript and ONNX models normalise inside",
         "mean": data.MEAN, "std": data.STD}
OUTPUT = {"name": "log_probs", "shape": [None, 10], "dtype": "float32", "meaning": "log-softmax over digits 0-9"}

Predict = Callable[[np.ndarray], np.ndarray]  # a batch of pixels in [0, 1] in, log-probabilities out


class Classifier(torch.nn.Module):
    """The exported graph: normalise pixels in [0, 1], then the network."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(data.MEAN))
        self.register_buffer("std", torch.tensor(data.STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images - self.mean) / self.std)


@dataclass(frozen=True)
class Format:
    """One model format of an export."""

    name: str  # its name in the per-format accuracies
    file: str  # its file in the export folder
    # Writes the file: (path, the Classifier in eval mode, the network's weights, an example batch).
    write: Callable[[Path, Classifier, dict[str, torch.Tensor], torch.Tensor], None]
    load: Callable[[Path, ExperimentConfig], Predict]  # the file loaded the way a user loads it
    loading: tuple[str, ...]  # MODEL_CARD.md's paragraph and snippet on loading it


def _torch_predict(model: torch.nn.Module) -> Predict:
    def run(chunk: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(chunk)).numpy()
    return run


def _write_safetensors(path: Path, model: Classifier, weights: dict[str, torch.Tensor], example: torch.Tensor
                       ) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in weights.items()}, str(path))


def _load_safetensors(path: Path, cfg: ExperimentConfig) -> Predict:
    from safetensors.torch import load_file

    net = build_model(cfg.model)
    net.load_state_dict(load_file(str(path)), strict=True)
    return _torch_predict(Classifier(net).eval())


def _write_torchscript(path: Path, model: Classifier, weights: dict[str, torch.Tensor], example: torch.Tensor
                       ) -> None:
    with torch.inference_mode():
        torch.jit.save(torch.jit.trace(model, example), str(path))


def _load_torchscript(path: Path, cfg: ExperimentConfig) -> Predict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch marks TorchScript deprecated in favour of torch.export
        script = torch.jit.load(str(path), map_location="cpu").eval()
    return _torch_predict(script)


def _write_onnx(path: Path, model: Classifier, weights: dict[str, torch.Tensor], example: torch.Tensor) -> None:
    torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=False, verbose=False,
                      input_names=[INPUT["name"]], output_names=[OUTPUT["name"]],
                      dynamic_shapes={"images": {0: torch.export.Dim("batch")}})


def _load_onnx(path: Path, cfg: ExperimentConfig) -> Predict:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda chunk: session.run(None, {INPUT["name"]: chunk})[0]


# The first format is the reference the others must agree with, and its accuracy the export's.
FORMATS = (
    Format("safetensors", WEIGHTS, _write_safetensors, _load_safetensors, (
        "safetensors (the architecture from mnistlab, no pickle):", "",
        "```python",
        "import json, torch",
        "from safetensors.torch import load_file",
        "from mnistlab.core.config import from_dict",
        "from mnistlab.core.model import build_model",
        f"cfg = from_dict(json.load(open(\"{CONFIG}\"))[\"config\"])",
        "net = build_model(cfg.model)",
        f"net.load_state_dict(load_file(\"{WEIGHTS}\"))",
        "digits = net.eval()((torch.zeros(1, 1, 28, 28) - 0.1307) / 0.3081).argmax(1)",
        "```", "")),
    Format("torchscript", TORCHSCRIPT, _write_torchscript, _load_torchscript, (
        "TorchScript (PyTorch only):", "",
        "```python",
        "import torch",
        f"model = torch.jit.load(\"{TORCHSCRIPT}\").eval()",
        "digits = model(torch.zeros(1, 1, 28, 28)).argmax(1)",
        "```", "")),
    Format("onnx", ONNX, _write_onnx, _load_onnx, (
        "ONNX Runtime (no PyTorch needed):", "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        f"session = ort.InferenceSession(\"{ONNX}\")",
        "pixels = np.zeros((1, 1, 28, 28), np.float32)  # your images, values in [0, 1]",
        "digits = session.run(None, {\"images\": pixels})[0].argmax(1)",
        "```", "")),
)
MODEL_FILES = tuple(fmt.file for fmt in FORMATS)  # in every export, with their SHA-256 in config.json


def write(folder: Path, cfg: ExperimentConfig, weights: dict[str, torch.Tensor]) -> None:
    """Every format's file of the network ``cfg`` with ``weights`` into ``folder``."""
    net = build_model(cfg.model)
    net.load_state_dict(weights, strict=True)
    model = Classifier(net).eval()
    example = torch.rand(2, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript and the exporter announce their own futures
        for fmt in FORMATS:
            fmt.write(folder / fmt.file, model, weights, example)


def test_pixels(data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 test images as float32 pixels in [0, 1], (N, 1, 28, 28), and their labels."""
    x, y = data.cached_arrays(data_dir)["test"]
    return (x.reshape(-1, 1, 28, 28).astype(np.float32) / 255.0), y.astype(np.int64)


def _batched(fn: Predict, x: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate([fn(x[i : i + batch]) for i in range(0, len(x), batch)])


# Formats whose loading runs code from the file itself: a TorchScript archive is a program, and a
# crafted one can touch the file system as it loads. They are loaded only from a trusted folder.
CODE_FORMATS = frozenset({"torchscript"})


def outputs(folder: Path, cfg: ExperimentConfig, x: np.ndarray, trusted: bool = True) -> dict[str, np.ndarray]:
    """Log-probabilities of every image from each exported file, loaded the way a user loads it;
    not ``trusted``, the formats that run code from the file (CODE_FORMATS) are skipped."""
    loaded = {fmt.name: fmt.load(folder / fmt.file, cfg) for fmt in FORMATS
              if trusted or fmt.name not in CODE_FORMATS}
    return {name: _batched(predict, x) for name, predict in loaded.items()}


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
