"""ResNet-18/50-shaped torch models (ImageNet layout) and the frozen-BatchNorm helper.

Defined here rather than taken from torchvision (which does not import beside torch 2.13 on
these machines). Layouts follow the ImageNet ResNets: 7x7/2 stem, 3x3/2 max pool, four stages at
strides 4, 8, 16, 32, global average pooling and a linear head.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn, plus the (projected) shortcut, relu."""

    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != c:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False),
                                            nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = x if self.downsample is None else self.downsample(x)
        return self.relu(y + s)


class Bottleneck(nn.Module):
    """ResNet bottleneck block: 1x1 reduce, 3x3 (strided), 1x1 expand by 4, plus shortcut."""

    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        out = c * 4
        self.conv1 = nn.Conv2d(c_in, c, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = None
        if stride != 1 or c_in != out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        s = x if self.downsample is None else self.downsample(x)
        return self.relu(y + s)


class ResNet(nn.Module):
    """ImageNet-layout ResNet with ``width`` stem channels (64 for the standard nets)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int],
                 classes: int = 2, width: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        c_in = width
        for i, n in enumerate(layers):
            c = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, c, 2 if (j == 0 and i > 0) else 1))
                c_in = c * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, classes)

    def stages(self) -> list[nn.Module]:
        """The four stages, in order (what checkpointing benchmarks wrap)."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def resnet18(classes: int = 2, width: int = 64) -> ResNet:
    """ResNet-18 layout: basic blocks [2, 2, 2, 2]."""
    return ResNet(BasicBlock, [2, 2, 2, 2], classes, width)


def resnet50(classes: int = 2, width: int = 64) -> ResNet:
    """ResNet-50 layout: bottleneck blocks [3, 4, 6, 3]."""
    return ResNet(Bottleneck, [3, 4, 6, 3], classes, width)


def randomize_batchnorm(module: nn.Module, seed: int = 0, *,
                        weight: Literal["normal", "uniform"] = "normal") -> nn.Module:
    """Give every BatchNorm distinct, non-trivial parameters and running statistics (in place;
    returns ``module``).

    torch's ONNX exporter merges initializers with identical values: freshly initialised
    BatchNorms (weight 1, bias 0, mean 0, var 1) would all collapse onto one set of names, and
    their gradients onto one tensor. Pretrained networks never look like that; benchmarks
    should not either. Draws, per BatchNorm in module order from one generator seeded with
    ``seed``: the weight (``"normal"``: 1 + 0.1·N(0, 1); ``"uniform"``: 0.5 + U(0, 1)), then
    bias and running mean 0.1·N(0, 1), running variance 0.5 + U(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
                c = m.num_features
                if weight == "uniform":
                    m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                else:
                    m.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return module


__all__ = ["BasicBlock", "Bottleneck", "ResNet", "randomize_batchnorm", "resnet18", "resnet50"]


def randomize_parameters(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter whose entries are all equal (norm weights and biases, biases, layer
    scales, PReLU slopes: what networks initialise to constants) distinct random values, and
    every BatchNorm random running statistics (in place; returns ``module`` in eval mode).

    A fresh network's constant-initialised parameters would otherwise be merged by the
    exporter into one initializer per value and shape (see :func:`randomize_batchnorm`). A
    zero becomes U(−0.2, 0.2), any other value ``v`` becomes ``v·U(0.5, 1.5)``. Draws come
    from one generator seeded with ``seed``, in parameter order.
    """
    generator = torch.Generator().manual_seed(seed)

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(uniform(m.running_mean.shape, -0.2, 0.2))
                m.running_var.copy_(uniform(m.running_var.shape, 0.5, 1.5))
        for p in module.parameters():
            if p.numel() == 0 or p.min() != p.max():
                continue
            value = float(p.flatten()[0])
            p.copy_(uniform(p.shape, -0.2, 0.2) if value == 0
                    else value * uniform(p.shape, 0.5, 1.5))
    return module.eval()
