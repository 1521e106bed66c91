"""ResNet-18/50-shaped torch models (BatchNorm frozen) and their ONNX export, for benchmarks.

Defined here rather than taken from torchvision (which does not import beside torch 2.13 on these
machines). Layouts follow the ImageNet ResNets: 7x7/2 stem, 3x3/2 max pool, four stages at
strides 4, 8, 16, 32, global average pooling and a linear head.
"""

from __future__ import annotations

import io

import onnx
import torch
from torch import nn


class BasicBlock(nn.Module):
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

    def __init__(self, block, layers: list[int], classes: int = 2, width: int = 64) -> None:
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

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


def resnet18(classes: int = 2, width: int = 64) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], classes, width)


def resnet50(classes: int = 2, width: int = 64) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], classes, width)


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm distinct, non-trivial parameters and running statistics.

    torch's ONNX exporter merges initializers with identical values: freshly initialised
    BatchNorms (weight 1, bias 0, mean 0, var 1) would all collapse onto one set of names, and
    their gradients onto one tensor. Pretrained networks never look like that; benchmarks
    should not either.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d | nn.BatchNorm3d):
                c = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=generator))
                m.bias.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
    return module


def export(module: nn.Module, size: int = 224, dynamic: bool = True) -> onnx.ModelProto:
    """Export in eval mode with BatchNorm kept as BatchNormalization nodes and torch's names.

    BatchNorm parameters are randomised first (:func:`randomize_batchnorm`), in place.
    """
    module = randomize_batchnorm(module).eval()
    buffer = io.BytesIO()
    kwargs = {"dynamic_axes": {"image": {2: "H", 3: "W"}}} if dynamic else {}
    torch.onnx.export(
        module, torch.zeros(1, 3, size, size), buffer, dynamo=False, opset_version=17,
        input_names=["image"], output_names=["logits"], do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL, **kwargs,
    )
    return onnx.load_from_string(buffer.getvalue())
