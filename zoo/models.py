"""Small torch CNNs: the test models (each one case the compiler must get right) and the
benchmark-sized VGG and U-Net.

Test models are tiny (a handful of convolutions, at most 16 channels) so that full-image runs on
32²–96² images take milliseconds on a CPU, yet together they cover strides, pooling with padding,
residual DAGs, frozen BatchNorm, dilation, groups, non-square kernels and strides, ``auto_pad``,
explicit asymmetric ``Pad``, nearest ``Resize`` and ``Concat`` (U-Net), several cut tensors, 3-D
volumes, assorted activations, and a model whose very first op is not local (for error tests).
:mod:`zoo.registry` names them, seeds their weights and exports them.
"""

from __future__ import annotations

import torch
from torch import nn

from zoo.resnet import BasicBlock


def _head(channels: int, classes: int = 10, dims: int = 2) -> nn.Sequential:
    """Global average pool + flatten + linear: exports as GlobalAveragePool, Flatten, Gemm."""
    pool = nn.AdaptiveAvgPool2d(1) if dims == 2 else nn.AdaptiveAvgPool3d(1)
    return nn.Sequential(pool, nn.Flatten(), nn.Linear(channels, classes))


class VGG(nn.Module):
    """conv3x3-relu ×2, maxpool 2, conv-relu ×2, maxpool 2, conv, head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1),
        )
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ShortcutFirst(BasicBlock):
    """The shared :class:`~zoo.resnet.BasicBlock` with the shortcut computed first (the order
    the tests' golden exports were made with: it fixes the node order of the ONNX graph)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class MiniResNet(nn.Module):
    """ResNet-18 in miniature: 7×7/2 stem + BN + relu + maxpool 3/2, two basic blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _ShortcutFirst(8, 8)
        self.layer2 = _ShortcutFirst(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class UNet(nn.Module):
    """One-level U-Net: the whole graph is local and the output is a full-resolution map."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU()
        )
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(16 + 8, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc(x)
        y = self.up(self.bottleneck(self.pool(skip)))
        return self.out(self.dec(torch.cat([y, skip], dim=1)))


class Dilated(nn.Module):
    """Dilation 2 and 3, a grouped conv (groups=2, stride 2), a depthwise conv, a 1×1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=2, dilation=2),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=3, dilation=3),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 1),
        )
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class NonSquare(nn.Module):
    """Kernels (3,5), (1,7), (2,4); strides (2,1), (1,2); begin ≠ end padding; (2,3) max pool.

    The (2,4) conv uses ``padding='same'``, which exports as ``auto_pad='SAME_UPPER'`` (begin
    padding (0,1), end padding (1,2)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2)),
            nn.ReLU(),
            nn.Conv2d(8, 8, (1, 7), stride=(1, 2), padding=(0, 3)),
            nn.ReLU(),
            nn.Conv2d(8, 16, (2, 4), padding="same"),
            nn.ReLU(),
            nn.MaxPool2d((2, 3), stride=(2, 3)),
            nn.Conv2d(16, 16, (3, 1), padding=(1, 0)),
        )
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ZeroPad(nn.Module):
    """Explicit asymmetric ZeroPad2d((left=1, right=2, top=0, bottom=3)) before unpadded convs."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.ZeroPad2d((1, 2, 0, 3)),
            nn.Conv2d(3, 8, 3),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2),
            nn.ReLU(),
        )
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TwoCut(nn.Module):
    """Head reads both the stride-4 and the stride-8 feature maps (ReduceMean of each)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU())
        self.stage4 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.stage8 = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f4 = self.stage4(self.stem(x))
        f8 = self.stage8(f4)
        return self.fc(torch.cat([f4.mean(dim=(2, 3)), f8.mean(dim=(2, 3))], dim=1))


class Conv3D(nn.Module):
    """3-D: conv3d k3 + BN3d + relu, maxpool3d 2, conv3d k3 stride 2 + BN3d + relu, head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.BatchNorm3d(4),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(4, 8, 3, stride=2, padding=1),
            nn.BatchNorm3d(8),
            nn.ReLU(),
        )
        self.head = _head(8, classes=3, dims=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MixedAct(nn.Module):
    """LeakyReLU, PReLU, a Sigmoid gate (Mul), ceil-mode AveragePool, Hardswish, ELU, GELU
    (exported as Div/Erf/Add/Mul at opset 17), a residual Add and Tanh."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.LeakyReLU(0.1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.act2 = nn.PReLU(8)
        self.gate = nn.Conv2d(8, 8, 1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.act3 = nn.Hardswish()
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.act4 = nn.ELU()
        self.conv5 = nn.Conv2d(16, 16, 3, padding=1)
        self.act5 = nn.GELU()
        self.head = _head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        x = x * torch.sigmoid(self.gate(x))
        x = self.act3(self.conv3(self.pool(x)))
        y = self.act5(self.conv5(self.act4(self.conv4(x))))
        return self.head(torch.tanh(x + y))


class NonLocalFirst(nn.Module):
    """First op is CumSum along the width (each value sums a whole row before it): not local."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = _head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(torch.cumsum(x, dim=3))))


# --------------------------------------------------------------------------------------------
# Benchmark-sized models (benchmarks/memory_plan_accuracy.py)
# --------------------------------------------------------------------------------------------


class VGGish(nn.Module):
    """conv-ReLU x2 at ``w`` ch, maxpool, x2 at ``2w`` ch, maxpool, conv ``2w``, GAP, FC."""

    def __init__(self, w: int = 32) -> None:
        super().__init__()

        def c(a: int, b: int) -> list[nn.Module]:
            return [nn.Conv2d(a, b, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(*c(3, w), *c(w, w), nn.MaxPool2d(2), *c(w, 2 * w),
                                      *c(2 * w, 2 * w), nn.MaxPool2d(2), *c(2 * w, 2 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


class UNetish(nn.Module):
    """Two-level U-Net (``w``/``2w``/``4w`` ch), nearest upsampling, skip concatenations; the
    output is a full-resolution 2-channel map (the whole network is the prefix)."""

    def __init__(self, w: int = 16) -> None:
        super().__init__()

        def c(a: int, b: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(b, b, 3, padding=1), nn.ReLU())

        self.e1, self.e2, self.b = c(3, w), c(w, 2 * w), c(2 * w, 4 * w)
        self.pool = nn.MaxPool2d(2)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.d2, self.d1 = c(6 * w, 2 * w), c(3 * w, w)
        self.out = nn.Conv2d(w, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.e1(x)
        s2 = self.e2(self.pool(s1))
        y = self.b(self.pool(s2))
        y = self.d2(torch.cat([self.up(y), s2], 1))
        return self.out(self.d1(torch.cat([self.up(y), s1], 1)))


__all__ = [
    "VGG",
    "MiniResNet",
    "UNet",
    "Dilated",
    "NonSquare",
    "ZeroPad",
    "TwoCut",
    "Conv3D",
    "MixedAct",
    "NonLocalFirst",
    "VGGish",
    "UNetish",
]
