"""Blocks of the architectures people train today, written here as torch modules (issue 14).

Each is small enough to test at 48-96 px yet has the structure of the real thing: ConvNeXt's
block (depthwise 7x7, LayerNorm2d as Transpose -> LayerNorm over channels -> Transpose, the
channels-last pointwise MLP with GELU and layer scale), squeeze-and-excitation (EfficientNet,
MobileNetV3 with hard-swish, RegNetY), GroupNorm and InstanceNorm U-Nets in 2-D and 3-D
(MONAI's SegResNet, BasicUNet, UNet). The tests export them with :func:`streamc.export_torch`
and compare a training step with torch autograd.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: LayerNorm over channels of an (N, C, H, W) map, via permutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block (channels-last MLP form): dw7x7 -> LN -> Linear -> GELU -> Linear,
    layer scale, residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + (y * self.gamma).permute(0, 3, 1, 2)


class ConvNeXtNet(nn.Module):
    """Stem (4x4 patchify + LayerNorm2d), two stages with a downsampling LayerNorm2d + 2x2
    conv between them, global pool, LayerNorm, linear head."""

    def __init__(self, dims: tuple[int, int] = (8, 16), classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        self.stage0 = ConvNeXtBlock(dims[0])
        self.down = nn.Sequential(LayerNorm2d(dims[0]), nn.Conv2d(dims[0], dims[1], 2, stride=2))
        self.stage1 = ConvNeXtBlock(dims[1])
        self.head_norm = nn.LayerNorm(dims[1])
        self.fc = nn.Linear(dims[1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(self.down(self.stage0(self.stem(x))))
        return self.fc(self.head_norm(x.mean((2, 3))))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global average pool -> 1x1 reduce -> act -> 1x1 expand -> gate."""

    def __init__(self, channels: int, reduced: int, act: type[nn.Module] = nn.ReLU,
                 gate: type[nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class InvertedResidual(nn.Module):
    """MobileNet/EfficientNet block: 1x1 expand -> BN -> act -> dw3x3 -> BN -> act -> SE ->
    1x1 project -> BN (+ residual)."""

    def __init__(self, cin: int, cout: int, stride: int, act: type[nn.Module],
                 gate: type[nn.Module]) -> None:
        super().__init__()
        mid = 4 * cin
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), act())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), act())
        self.se = SqueezeExcite(mid, max(1, cin // 2), act, gate)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class SENet(nn.Module):
    """An EfficientNet-like (SiLU, Sigmoid gate) or MobileNetV3-like (Hardswish, Hardsigmoid
    gate) network: stem, three inverted residual blocks with SE, pooled linear head."""

    def __init__(self, kind: str = "efficientnet", classes: int = 3) -> None:
        super().__init__()
        efficient = kind == "efficientnet"
        act = nn.SiLU if efficient else nn.Hardswish
        gate = nn.Sigmoid if efficient else nn.Hardsigmoid
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), act())
        self.blocks = nn.Sequential(InvertedResidual(8, 8, 1, act, gate),
                                    InvertedResidual(8, 12, 2, act, gate),
                                    InvertedResidual(12, 12, 1, act, gate))
        self.fc = nn.Linear(12, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def _norm(kind: str, channels: int, dims: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(2, channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels)


class NormUNet(nn.Module):
    """A two-level U-Net whose convolutions are followed by GroupNorm or InstanceNorm (and
    PReLU, as MONAI's UNet): per-sample whole-image statistics at every level, 2-D or 3-D."""

    def __init__(self, norm: str = "group", dims: int = 2, width: int = 4,
                 classes: int = 2, linear_upsampling: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        up = nn.ConvTranspose2d if dims == 2 else nn.ConvTranspose3d

        def block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(conv(cin, cout, 3, stride, 1), _norm(norm, cout, dims),
                                 nn.PReLU(cout) if norm == "instance" else nn.LeakyReLU(0.1))

        self.enc0 = block(1, width)
        self.enc1 = block(width, 2 * width, stride=2)
        self.mid = block(2 * width, 2 * width)
        if linear_upsampling:  # SegResNet's: 1x1 conv, then (tri)linear interpolation
            self.up = nn.Sequential(conv(2 * width, width, 1), nn.Upsample(
                scale_factor=2, mode="bilinear" if dims == 2 else "trilinear"))
        else:
            self.up = up(2 * width, width, 2, stride=2)
        self.dec0 = block(2 * width, width)
        self.out = conv(width, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e0 = self.enc0(x)
        m = self.mid(self.enc1(e0))
        return self.out(self.dec0(torch.cat([e0, self.up(m)], dim=1)))


class PaddedConvs(nn.Module):
    """Convolutions with reflect and replicate padding (``padding_mode``), the zero-width
    ``replicate`` pad MONAI's U-Nets write where two branches already agree in size, and
    bilinear upsampling (``align_corners=False``, as SegResNet's decoder)."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect")
        self.replicate = nn.Conv2d(4, 4, 5, stride=2, padding=2, padding_mode="replicate")
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.replicate(torch.relu(self.reflect(x)))
        y = F.interpolate(F.pad(y, (0, 0, 0, 0), mode="replicate"), scale_factor=2,
                          mode="bilinear", align_corners=False)
        return self.out(y)
