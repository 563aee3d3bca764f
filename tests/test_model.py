"""The model family: the reference network exactly, exact counts, real shapes."""

from __future__ import annotations

import pytest
import torch

from mnistlab.core import config
from mnistlab.core.config import ModelConfig
from mnistlab.core.layers import plan
from mnistlab.core.model import build_model, count_params, summary
from mnistlab.util.errors import UserError

# The reference table from the original exercise's write-up, row for row.
REFERENCE = """\
----------------------------------------------------------------
        Layer (type)               Output Shape         Param #
================================================================
            Conv2d-1           [-1, 16, 26, 26]             144
              ReLU-2           [-1, 16, 26, 26]               0
       BatchNorm2d-3           [-1, 16, 26, 26]              32
         Dropout2d-4           [-1, 16, 26, 26]               0
            Conv2d-5           [-1, 32, 24, 24]           4,608
              ReLU-6           [-1, 32, 24, 24]               0
       BatchNorm2d-7           [-1, 32, 24, 24]              64
         Dropout2d-8           [-1, 32, 24, 24]               0
            Conv2d-9            [-1, 8, 24, 24]             256
        MaxPool2d-10            [-1, 8, 12, 12]               0
           Conv2d-11           [-1, 16, 10, 10]           1,152
             ReLU-12           [-1, 16, 10, 10]               0
      BatchNorm2d-13           [-1, 16, 10, 10]              32
        Dropout2d-14           [-1, 16, 10, 10]               0
           Conv2d-15             [-1, 16, 8, 8]           2,304
             ReLU-16             [-1, 16, 8, 8]               0
      BatchNorm2d-17             [-1, 16, 8, 8]              32
        Dropout2d-18             [-1, 16, 8, 8]               0
           Conv2d-19             [-1, 16, 8, 8]           2,304
             ReLU-20             [-1, 16, 8, 8]               0
      BatchNorm2d-21             [-1, 16, 8, 8]              32
        Dropout2d-22             [-1, 16, 8, 8]               0
           Conv2d-23             [-1, 10, 6, 6]           1,440
        AvgPool2d-24             [-1, 10, 1, 1]               0
================================================================
Total params: 12,400
Trainable params: 12,400
Non-trainable params: 0
----------------------------------------------------------------"""

FAMILY = [
    ModelConfig(),
    ModelConfig(widths=(8, 12, 6, 10, 12, 14), dropout=0.1),
    ModelConfig(widths=(10, 20, 10, 20, 20, 20), head="gap_conv"),
    ModelConfig(widths=(10, 20, 10, 20, 20, 20), head="gap_linear"),
    ModelConfig(widths=(16, 32, 8, 16, 16, 16), width_mult=0.5),
    ModelConfig(widths=(8, 8, 16, 16), paddings=(1, 0, 0, 0), pool_after=2),
    ModelConfig(widths=(8, 16, 16, 16), paddings=(0, 0, 0, 0), pool_after=0, bias=True),
]


def hooked_rows(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...], int]]:
    """What torchsummary records: each leaf module's type, output shape and parameter count."""
    rows, handles = [], []
    for module in model.modules():
        if not list(module.children()):
            handles.append(module.register_forward_hook(
                lambda m, _i, out: rows.append((type(m).__name__, tuple(out.shape[1:]),
                                                sum(p.numel() for p in m.parameters())))))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(2, 1, 28, 28))
    for h in handles:
        h.remove()
    return rows


def test_eva4_s4_is_the_reference_network_row_for_row() -> None:
    cfg = config.load(config_path("eva4-s4.yaml"))
    assert summary(cfg.model) == REFERENCE
    assert count_params(cfg.model) == 12_400
    model = build_model(cfg.model)
    assert sum(p.numel() for p in model.parameters()) == 12_400
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout2d)} == {0.05}


@pytest.mark.parametrize("cfg", FAMILY, ids=lambda c: f"{c.head}-{'x'.join(map(str, c.widths))}-{c.width_mult}")
def test_planned_layers_match_the_built_network(cfg: ModelConfig) -> None:
    model = build_model(cfg)
    planned = [(layer.kind, layer.shape, layer.params) for layer in plan(cfg)]
    assert hooked_rows(model) == planned
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)  # log-probabilities


def test_shrinking_to_nothing_is_a_config_error() -> None:
    with pytest.raises(UserError, match="shrinks the image to nothing"):
        plan(ModelConfig(widths=(8,) * 14, paddings=(0,) * 14, pool_after=3))


def config_path(name: str) -> str:
    from conftest import ROOT

    return str(ROOT / "experiments" / name)
