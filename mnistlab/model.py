"""The network family, built from a ModelConfig alone, and its exact parameter count.

Body: 3x3 blocks Conv-ReLU-BatchNorm-Dropout2d, with one bare 1x1 transition conv followed
by MaxPool(2) at ``pool_after``. Head: ``conv_gap`` (the reference's Conv(c->10, 3) and a
global AvgPool), ``gap_conv`` or ``gap_linear``. Output: log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnistlab.config import ModelConfig
from mnistlab.errors import UserError

IMAGE_SIDE = 28
CLASSES = 10


@dataclass(frozen=True)
class Layer:
    """One leaf module of the network as the summary table shows it."""

    kind: str  # Conv2d, ReLU, BatchNorm2d, Dropout2d, MaxPool2d, AvgPool2d, Linear
    shape: tuple[int, ...]  # output shape without the batch dimension
    params: int
    args: tuple[int, ...] = ()  # Conv2d: (in, out, kernel, padding); pools: (kernel,)


def widths(cfg: ModelConfig) -> tuple[int, ...]:
    """The body widths after ``width_mult``."""
    return tuple(max(1, round(w * cfg.width_mult)) for w in cfg.widths)


def plan(cfg: ModelConfig, where: str = "config") -> list[Layer]:
    """Every leaf layer with its output shape and parameter count; no tensors are made."""
    layers: list[Layer] = []
    c, side = 1, IMAGE_SIDE
    bias = 1 if cfg.bias else 0

    def conv(cout: int, k: int, pad: int) -> None:
        nonlocal c, side
        side = side + 2 * pad - k + 1
        if side < 1:
            raise UserError(f"{where}: the network shrinks the image to nothing at conv {_n(layers)}")
        layers.append(Layer("Conv2d", (cout, side, side), c * cout * k * k + bias * cout, (c, cout, k, pad)))
        c = cout

    for i, (w, pad) in enumerate(zip(widths(cfg), cfg.paddings, strict=True), start=1):
        if i == cfg.pool_after:
            conv(w, 1, pad)
            if side < 2:
                raise UserError(f"{where}: nothing left to pool after conv {i}")
            side //= 2
            layers.append(Layer("MaxPool2d", (c, side, side), 0, (2,)))
            continue
        conv(w, 3, pad)
        layers.append(Layer("ReLU", (c, side, side), 0))
        layers.append(Layer("BatchNorm2d", (c, side, side), 2 * c))
        layers.append(Layer("Dropout2d", (c, side, side), 0))
    if cfg.head == "conv_gap":
        conv(CLASSES, 3, 0)
        layers.append(Layer("AvgPool2d", (CLASSES, 1, 1), 0, (side,)))
    elif cfg.head == "gap_conv":
        layers.append(Layer("AvgPool2d", (c, 1, 1), 0, (side,)))
        side = 1
        conv(CLASSES, 1, 0)
    else:
        layers.append(Layer("AvgPool2d", (c, 1, 1), 0, (side,)))
        layers.append(Layer("Linear", (CLASSES,), c * CLASSES + CLASSES, (c, CLASSES)))
    return layers


def _n(layers: list[Layer]) -> int:
    return sum(1 for layer in layers if layer.kind == "Conv2d") + 1


def count_params(cfg: ModelConfig) -> int:
    """Exact trainable parameter count from the config alone (microseconds; no tensors)."""
    return sum(layer.params for layer in plan(cfg))


class Net(nn.Module):
    """The family's network: leaf modules registered in forward order, so hooks see the plan."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        modules: list[nn.Module] = []
        for layer in plan(cfg):
            modules.append(_module(layer, cfg))
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.layers:
            if isinstance(module, nn.Linear):
                x = x.flatten(1)
            x = module(x)
        return F.log_softmax(x.flatten(1), dim=1)


def _module(layer: Layer, cfg: ModelConfig) -> nn.Module:
    if layer.kind == "Conv2d":
        cin, cout, k, pad = layer.args
        return nn.Conv2d(cin, cout, k, padding=pad, bias=cfg.bias)
    if layer.kind == "ReLU":
        return nn.ReLU()
    if layer.kind == "BatchNorm2d":
        return nn.BatchNorm2d(layer.shape[0])
    if layer.kind == "Dropout2d":
        return nn.Dropout2d(cfg.dropout)
    if layer.kind == "MaxPool2d":
        return nn.MaxPool2d(layer.args[0])
    if layer.kind == "AvgPool2d":
        return nn.AvgPool2d(layer.args[0])
    return nn.Linear(*layer.args)


def build_model(cfg: ModelConfig) -> Net:
    """The network for a config (weights from torch's default initialisation)."""
    return Net(cfg)


def summary(cfg: ModelConfig) -> str:
    """A torchsummary-style table: Layer (type), Output Shape, Param #, then the totals."""
    line = "-" * 64
    rows = [line, "{:>20}  {:>25} {:>15}".format("Layer (type)", "Output Shape", "Param #"), "=" * 64]
    layers = plan(cfg)
    for i, layer in enumerate(layers, start=1):
        shape = str([-1, *layer.shape])
        rows.append("{:>20}  {:>25} {:>15}".format(f"{layer.kind}-{i}", shape, f"{layer.params:,}"))
    total = sum(layer.params for layer in layers)
    rows += ["=" * 64, f"Total params: {total:,}", f"Trainable params: {total:,}",
             "Non-trainable params: 0", line]
    return "\n".join(rows)
