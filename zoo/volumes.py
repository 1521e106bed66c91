"""A small 3-D CNN (BatchNorm frozen) for the volume benchmarks: :class:`VolumeNet`.

Three Conv3d blocks (full resolution, then two stride-2 blocks), global average pooling and a
linear head: a volume-segmentation-like encoder small enough to train on a 2-core CPU at 128³ and
256³. Its receptive field is 15 voxels, so streamc's halo is small and tiles keep most of what
they compute.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(c_in: int, c: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(c_in, c, 3, stride, 1, bias=False), nn.BatchNorm3d(c),
                         nn.ReLU())


class VolumeNet(nn.Module):
    """``width`` channels at full resolution, then ``2·width`` at strides 2 and 4."""

    def __init__(self, classes: int = 2, width: int = 16, channels: int = 1) -> None:
        super().__init__()
        self.block1 = _block(channels, width, 1)
        self.block2 = _block(width, 2 * width, 2)
        self.block3 = _block(2 * width, 2 * width, 2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(2 * width, classes)

    def stages(self) -> list[nn.Module]:
        """The three blocks, in order (what checkpointing benchmarks wrap)."""
        return [self.block1, self.block2, self.block3]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.block3(self.block2(self.block1(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


__all__ = ["VolumeNet"]
