"""The network family as torch modules, built from a ModelConfig alone (the layer plan in
layers.py), and its exact parameter count.

Body: 3x3 blocks Conv-ReLU-BatchNorm-Dropout2d, with one bare 1x1 transition conv followed
by MaxPool(2) at ``pool_after``. Head: ``conv_gap`` (the reference's Conv(c->10, 3) and a
global AvgPool), ``gap_conv`` or ``gap_linear``. Output: log-probabilities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mnistlab.core.config import ModelConfig
from mnistlab.core.layers import Layer, plan


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
