"""Few-shot networks: a backbone (a sequence of blocks) followed by a linear head.

Conv-4: four [3x3 conv, batch norm, ReLU, 2x2 max-pool] blocks; 64 filters on 32x32 images give a
256-dimensional feature, 32 filters on 84x84 give 800. Batch norm always uses the statistics of the
batch it sees (no running averages), the convention of MAML and its successors, so a task's support
and query sets are normalised by their own statistics at training and at test time alike.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..errors import UsageError


def conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1),
        nn.BatchNorm2d(cout, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2),
    )


def conv4(in_shape: tuple[int, ...], width: int = 64) -> nn.Sequential:
    c = in_shape[0]
    return nn.Sequential(
        conv_block(c, width), conv_block(width, width), conv_block(width, width), conv_block(width, width),
        nn.Flatten(),
    )


def mlp(in_shape: tuple[int, ...], width: int = 40) -> nn.Sequential:
    """The MAML sinusoid network: two hidden ReLU layers."""
    return nn.Sequential(nn.Linear(in_shape[0], width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


BACKBONES: dict[str, Callable[..., nn.Sequential]] = {"conv4": conv4, "mlp": mlp}
DEFAULT_WIDTH = {"conv4": 64, "mlp": 40}
#: the number of input dimensions each backbone takes: 3 for images (C, H, W), 1 for feature vectors
INPUT_DIMS = {"conv4": 3, "mlp": 1}


def register_backbone(name: str, default_width: int, input_dims: int = 3) -> Callable:
    def deco(fn: Callable[..., nn.Sequential]) -> Callable[..., nn.Sequential]:
        BACKBONES[name] = fn
        DEFAULT_WIDTH[name] = default_width
        INPUT_DIMS[name] = input_dims
        return fn

    return deco


def backbones_for(in_shape: tuple[int, ...]) -> list[str]:
    """The backbones that take inputs of shape `in_shape` (images C,H,W or feature vectors).

    Example:
        >>> backbones_for((1,)), backbones_for((3, 32, 32))
        (['mlp'], ['conv4', 'resnet12'])
    """
    return sorted(n for n, d in INPUT_DIMS.items() if d == len(in_shape))


def check_backbone(name: str, in_shape: tuple[int, ...]) -> None:
    """One-line UsageError unless backbone `name` exists and takes inputs of shape `in_shape`."""
    if name not in BACKBONES:
        raise UsageError(f"unknown backbone {name!r}: expected one of {', '.join(sorted(BACKBONES))}")
    if INPUT_DIMS.get(name, len(in_shape)) != len(in_shape):
        what = {3: "images (C, H, W)", 1: "feature vectors (1-D inputs)"}.get(INPUT_DIMS[name], f"{INPUT_DIMS[name]}-D inputs")
        fits = backbones_for(tuple(in_shape))
        fix = f"use --backbone {' or '.join(fits)}" if fits else "no built-in backbone takes them"
        raise UsageError(f"backbone {name!r} takes {what}, but these inputs have shape {tuple(in_shape)}: {fix}")


class FewShotNet(nn.Module):
    """`backbone` (a Sequential of blocks ending in a flat feature) then a linear `head`."""

    def __init__(self, backbone: nn.Sequential, feature_dim: int, outputs: int, zero_head: bool = True):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, outputs)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def stages(self) -> list[tuple[str, nn.Module]]:
        """The forward pass as an ordered list of (name prefix, module); used to split the model."""
        return [(f"backbone.{n}", m) for n, m in self.backbone.named_children()] + [("head", self.head)]


def build_model(name: str, in_shape: tuple[int, ...], outputs: int, width: int | None = None) -> FewShotNet:
    """Backbone `name` sized for inputs `in_shape` (C,H,W or features), with a head of `outputs` units."""
    check_backbone(name, tuple(in_shape))
    width = width or DEFAULT_WIDTH[name]
    backbone = BACKBONES[name](tuple(in_shape), width)
    with torch.no_grad():
        was = backbone.training
        backbone.train()
        dim = backbone(torch.zeros(2, *in_shape)).shape[1]
        backbone.train(was)
    return FewShotNet(backbone, dim, outputs)
