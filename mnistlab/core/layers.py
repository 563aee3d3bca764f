"""The network family's layer plan from a model config alone: every leaf layer with its output
shape and parameter count, computed without torch (config validation checks shapes with it,
``model.py`` builds the network from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from mnistlab.util.errors import UserError

IMAGE_SIDE = 28
CLASSES = 10


class Architecture(Protocol):
    """The fields of a network's config that the plan reads: ``config.ModelConfig`` has them
    (named here, not imported: config.py imports this module to check shapes)."""

    @property
    def widths(self) -> tuple[int, ...]: ...
    @property
    def paddings(self) -> tuple[int, ...]: ...
    @property
    def pool_after(self) -> int: ...
    @property
    def head(self) -> str: ...
    @property
    def width_mult(self) -> float: ...
    @property
    def bias(self) -> bool: ...


@dataclass(frozen=True)
class Layer:
    """One leaf module of the network as the summary table shows it."""

    kind: str  # Conv2d, ReLU, BatchNorm2d, Dropout2d, MaxPool2d, AvgPool2d, Linear
    shape: tuple[int, ...]  # output shape without the batch dimension
    params: int
    args: tuple[int, ...] = ()  # Conv2d: (in, out, kernel, padding); pools: (kernel,)


def widths(cfg: Architecture) -> tuple[int, ...]:
    """The body widths after ``width_mult``."""
    return tuple(max(1, round(w * cfg.width_mult)) for w in cfg.widths)


def plan(cfg: Architecture, where: str = "config") -> list[Layer]:
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
