"""ResNet-12, the standard few-shot backbone (TADAM, MetaOptNet and their successors).

Four residual blocks; each is three [3x3 conv, batch norm, LeakyReLU(0.1)] layers (the third
activation after the residual sum) with a [1x1 conv, batch norm] shortcut, then a 2x2 max-pool.
Widths (64, 160, 320, 640) at the default width 64, scaled by `width / 64` otherwise (width 4 gives
4, 10, 20, 40). A global average pool and a flatten end the backbone: the feature has 10 x width
units whatever the image size (640 on 32x32 and on 84x84 images). Batch norm uses the statistics of
the batch it sees (track_running_stats=False), as Conv-4 does. No DropBlock.

The Sequential's children are the stages -- block 0..3, then the pool-and-flatten -- so that
`split_model` can put the head, or the last block and the head (`last-block`), in the inner part.
"""
from __future__ import annotations

import torch
from torch import nn

from .backbones import register_backbone

WIDTHS = (64, 160, 320, 640)


def conv_bn(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout, track_running_stats=False)]


class ResBlock(nn.Module):
    """Three 3x3 conv-BN(-LeakyReLU) layers plus a 1x1 conv-BN shortcut, LeakyReLU, 2x2 max-pool."""

    def __init__(self, cin: int, cout: int, slope: float = 0.1):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, 3), nn.LeakyReLU(slope),
            *conv_bn(cout, cout, 3), nn.LeakyReLU(slope),
            *conv_bn(cout, cout, 3),
        )
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1))
        self.act = nn.LeakyReLU(slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.body(x) + self.shortcut(x)))


def resnet12_widths(width: int = 64) -> tuple[int, ...]:
    return tuple(max(1, round(w * width / 64)) for w in WIDTHS)


@register_backbone("resnet12", 64)
def resnet12(in_shape: tuple[int, ...], width: int = 64) -> nn.Sequential:
    """ResNet-12 for (C, H, W) images; `width` scales (64, 160, 320, 640) by width / 64."""
    if len(in_shape) != 3:
        raise ValueError(f"resnet12 expects (C, H, W) images, got input shape {tuple(in_shape)}")
    chans = (in_shape[0],) + resnet12_widths(width)
    blocks = [ResBlock(chans[i], chans[i + 1]) for i in range(4)]
    return nn.Sequential(*blocks, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))
