"""Random CNNs for streamc's property tests: small torch modules from a random spec, and ONNX.

A :class:`NetSpec` is a little DAG program over tensors on the image grid: layer 0 is the image,
every other layer reads earlier layers. :func:`random_spec` draws one from a :class:`Source` of
random choices (a seeded :class:`RandomSource`, or :class:`HypothesisSource` inside a hypothesis
test so that failures shrink), tracking every layer's channel count and spatial size so that the
network is valid for the image size it was drawn for. What it covers:

- Conv with random kernel 1–5 per axis (non-square), stride 1–3, dilation 1–2, symmetric padding
  0–3, or asymmetric padding through an explicit ``ZeroPad``/``ConstantPad`` (an ONNX ``Pad``),
  groups (including depthwise), with or without bias;
- max and average pooling, non-square, with padding, ``ceil_mode``, dilation (max),
  ``count_include_pad`` (average);
- pointwise activations, frozen BatchNorm (random running statistics);
- residual blocks (shape-preserving branch + identity, or a strided branch + strided 1×1
  shortcut), channel concatenation of branches with different receptive fields, nearest ×2
  upsampling, and U-Net style skip concatenations with an earlier map of the same size;
- heads: global mean of one or several maps (several cut tensors at different strides) followed
  by a Linear layer, or the maps themselves as graph outputs (no head at all);
- 2-D images and 3-D volumes.

:func:`random_net` exports the module as the zoo does (:func:`streamc.export.export_torch`,
static shapes), so ONNX initializer names are torch ``state_dict`` names. With ``dense=True``
the generator avoids everything that leaves holes in a receptive field or kills a dependency
(ReLU, max pooling, dilation, strides larger than the kernel); with ``chain=True`` it draws no
branches. A dense chain depends on every pixel of the box that region transfer predicts
(branches of different shapes make the bounding-box union conservative: a k×1 and a 1×k branch
read a plus shape, not its box).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import onnx
import torch
from torch import nn

from streamc.export import export_torch

__all__ = [
    "Layer",
    "NetSpec",
    "RandNet",
    "RandomSource",
    "HypothesisSource",
    "Source",
    "random_spec",
    "build_module",
    "random_net",
]


# --------------------------------------------------------------------------------------------
# Sources of random choices
# --------------------------------------------------------------------------------------------


class Source:
    """Random choices: ``integer(lo, hi)`` (inclusive), ``choice(options)``, ``flag(p)``."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, options: Sequence[Any]) -> Any:
        return options[self.integer(0, len(options) - 1)]

    def flag(self, p: float = 0.5) -> bool:
        return self.integer(0, 999) < int(p * 1000)


class RandomSource(Source):
    """Choices from a seeded :class:`random.Random`."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


class HypothesisSource(Source):
    """Choices drawn through hypothesis (``data.draw`` from ``st.data()``), so failures shrink."""

    def __init__(self, draw: Callable[[Any], Any]) -> None:
        from hypothesis import strategies as st

        self._draw = draw
        self._st = st

    def integer(self, lo: int, hi: int) -> int:
        return self._draw(self._st.integers(lo, hi))

    def choice(self, options: Sequence[Any]) -> Any:
        return self._draw(self._st.sampled_from(list(options)))

    def flag(self, p: float = 0.5) -> bool:
        return self._draw(self._st.integers(0, 999)) < int(p * 1000)


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One tensor of the network: the op producing it, its inputs (layer indices), its
    parameters, its channel count and spatial size."""

    kind: str  # input, conv, pad, pool, act, bn, up, add, cat
    inputs: tuple[int, ...]
    params: dict[str, Any]
    channels: int
    size: tuple[int, ...]

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.kind}({args}) <- {list(self.inputs)} -> C={self.channels} {self.size}"


@dataclass
class NetSpec:
    """A random network: its layers, the layers its head reads (cut tensors), and the head."""

    dims: int
    layers: list[Layer] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    head: str = "linear"  # 'linear': mean of each cut, concat, Linear; 'map': cuts are outputs
    classes: int = 3

    @property
    def image_shape(self) -> tuple[int, ...]:
        first = self.layers[0]
        return (1, first.channels, *first.size)

    def describe(self) -> str:
        lines = [f"{i}: {layer.describe()}" for i, layer in enumerate(self.layers)]
        lines.append(f"head={self.head} cuts={self.cuts}")
        return "\n".join(lines)


def _conv_out(n: int, k: int, s: int, d: int, p_total: int) -> int:
    return (n + p_total - d * (k - 1) - 1) // s + 1


def _pool_out(n: int, k: int, s: int, d: int, p: int, ceil_mode: bool) -> int:
    """torch (and ONNX) pooling output size with symmetric padding ``p``."""
    span = d * (k - 1) + 1
    if not ceil_mode:
        return (n + 2 * p - span) // s + 1
    out = -(-(n + 2 * p - span) // s) + 1
    if (out - 1) * s >= n + p:
        out -= 1
    return out


class _Builder:
    def __init__(self, src: Source, dims: int, dense: bool, max_size: int,
                 chain: bool = False) -> None:
        self.src = src
        self.dims = dims
        self.dense = dense
        self.chain = chain
        self.max_size = max_size
        self.layers: list[Layer] = []
        self.max_channels = 6 if dims == 2 else 3

    def add(self, kind: str, inputs: Sequence[int], params: dict, channels: int,
            size: Sequence[int]) -> int:
        self.layers.append(Layer(kind, tuple(inputs), params, channels, tuple(size)))
        return len(self.layers) - 1

    def ok(self, size: Sequence[int]) -> bool:
        return all(1 <= s <= self.max_size for s in size)

    # -- single ops ------------------------------------------------------------------------------
    def channels(self) -> int:
        return self.src.integer(2, self.max_channels)

    def groups(self, cin: int, cout: int) -> int:
        g = math.gcd(cin, cout)
        options = [d for d in range(1, g + 1) if g % d == 0]
        return self.src.choice(options) if self.src.flag(0.3) else 1

    def conv(self, x: int, cout: int | None = None, preserve: bool = False) -> int | None:
        """A Conv (with an explicit Pad before it for asymmetric padding). ``preserve``: stride
        1 and total padding d·(k−1), so the spatial size does not change."""
        src, layer = self.src, self.layers[x]
        cout = cout or self.channels()
        kernel = [src.integer(1, 5) for _ in range(self.dims)]
        dilation = [1 if self.dense else src.choice([1, 1, 2]) for _ in range(self.dims)]
        if preserve:
            stride = [1] * self.dims
        else:
            stride = [src.choice([1, 1, 2, 3]) for _ in range(self.dims)]
            if self.dense:
                stride = [min(s, k) for s, k in zip(stride, kernel)]
        if preserve:
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            begin = [src.integer(0, t) for t in totals]
            pads = [(b, t - b) for b, t in zip(begin, totals)]
        elif src.flag(0.3):
            pads = [(src.integer(0, 3), src.integer(0, 3)) for _ in range(self.dims)]
        else:
            pads = [(p, p) for p in (src.integer(0, 3) for _ in range(self.dims))]
        symmetric = all(b == e for b, e in pads)
        size_in = layer.size
        source = x
        if not symmetric:
            padded = tuple(n + b + e for n, (b, e) in zip(size_in, pads))
            if not self.ok(padded):
                return None
            source = self.add("pad", [x], {"pads": pads}, layer.channels, padded)
            size_in = padded
            conv_pad = [0] * self.dims
        else:
            conv_pad = [b for b, _ in pads]
        out = tuple(
            _conv_out(n, k, s, d, 2 * p)
            for n, k, s, d, p in zip(size_in, kernel, stride, dilation, conv_pad)
        )
        if not self.ok(out):
            if source != x:
                self.layers.pop()
            return None
        params = {
            "kernel": kernel, "stride": stride, "dilation": dilation, "padding": conv_pad,
            "groups": self.groups(layer.channels, cout), "bias": src.flag(0.7),
        }
        return self.add("conv", [source], params, cout, out)

    def pool(self, x: int) -> int | None:
        src, layer = self.src, self.layers[x]
        kind = "avg" if self.dense else src.choice(["max", "avg"])
        kernel = [src.integer(1, 4) for _ in range(self.dims)]
        stride = [src.integer(1, 3) for _ in range(self.dims)]
        if self.dense:
            stride = [min(s, k) for s, k in zip(stride, kernel)]
        padding = [src.integer(0, k // 2) for k in kernel]
        ceil_mode = src.flag(0.4)
        dilation = [1] * self.dims
        if kind == "max" and src.flag(0.2):
            dilation = [src.choice([1, 2]) for _ in range(self.dims)]
        count_include_pad = kind == "avg" and not ceil_mode and src.flag(0.5)
        out = tuple(
            _pool_out(n, k, s, d, p, ceil_mode)
            for n, k, s, d, p in zip(layer.size, kernel, stride, dilation, padding)
        )
        if not self.ok(out):
            return None
        if self.dims == 3 and any(n < d * (k - 1) + 1 for n, k, d in zip(layer.size, kernel,
                                                                             dilation)):
            return None  # torch's 3-D pooling refuses an input smaller than the kernel
        params = {"type": kind, "kernel": kernel, "stride": stride, "padding": padding,
                  "dilation": dilation, "ceil_mode": ceil_mode,
                  "count_include_pad": count_include_pad}
        return self.add("pool", [x], params, layer.channels, out)

    def act(self, x: int) -> int:
        smooth = ["tanh", "elu", "softplus", "leaky", "gelu"]
        options = smooth if self.dense else smooth + ["relu", "relu", "sigmoid", "hardswish"]
        layer = self.layers[x]
        return self.add("act", [x], {"fn": self.src.choice(options)}, layer.channels, layer.size)

    # -- blocks ----------------------------------------------------------------------------------
    def block(self, x: int) -> int:
        src = self.src
        kinds = ["conv", "conv", "conv_act", "pool", "residual", "concat", "bn", "up", "skip"]
        if self.chain:
            kinds = kinds[:4] + ["bn", "up"]
        kind = src.choice(kinds)
        layer = self.layers[x]
        if kind == "conv":
            y = self.conv(x)
        elif kind == "conv_act":
            y = self.conv(x)
            y = None if y is None else self.act(y)
        elif kind == "pool":
            y = self.pool(x)
        elif kind == "bn":
            y = self.add("bn", [x], {}, layer.channels, layer.size)
        elif kind == "up":
            size = tuple(2 * n for n in layer.size)
            y = self.add("up", [x], {"factor": 2}, layer.channels, size) if self.ok(size) else None
        elif kind == "residual":
            y = self.residual(x)
        elif kind == "concat":
            y = self.concat(x)
        else:
            y = self.skip(x)
        return x if y is None else y

    def residual(self, x: int) -> int | None:
        layer = self.layers[x]
        mark = len(self.layers)
        if self.src.flag(0.7):
            y = self.conv(x, preserve=True)
            if y is not None and self.src.flag():
                y = self.act(y)
                y = self.conv(y, cout=layer.channels, preserve=True)
            elif y is not None:
                y = self.conv(y, cout=layer.channels, preserve=True)
            shortcut = x
        else:  # strided branch and a strided 1x1 shortcut (ResNet downsampling block)
            y = self.conv(x)
            shortcut = None
            if y is not None:
                s = [max(1, math.ceil(n / m)) for n, m in zip(layer.size, self.layers[y].size)]
                out = tuple((n - 1) // si + 1 for n, si in zip(layer.size, s))
                if out == self.layers[y].size:
                    shortcut = self.add(
                        "conv", [x],
                        {"kernel": [1] * self.dims, "stride": s, "dilation": [1] * self.dims,
                         "padding": [0] * self.dims, "groups": 1, "bias": False},
                        self.layers[y].channels, out)
        if y is None or shortcut is None or self.layers[y].size != self.layers[shortcut].size \
                or self.layers[y].channels != self.layers[shortcut].channels:
            del self.layers[mark:]
            return None
        out = self.add("add", [y, shortcut], {}, self.layers[y].channels, self.layers[y].size)
        return self.act(out) if self.src.flag() else out

    def concat(self, x: int) -> int | None:
        mark = len(self.layers)
        branches = [x] if self.src.flag() else []
        for _ in range(self.src.integer(2 - len(branches), 3 - len(branches))):
            b = self.conv(x, cout=self.src.integer(1, 4), preserve=True)
            if b is None:
                del self.layers[mark:]
                return None
            branches.append(self.act(b) if self.src.flag() else b)
        channels = sum(self.layers[b].channels for b in branches)
        return self.add("cat", branches, {}, channels, self.layers[x].size)

    def skip(self, x: int) -> int | None:
        """Concatenate with an earlier map of the same spatial size (U-Net style)."""
        size = self.layers[x].size
        earlier = [i for i, layer in enumerate(self.layers[:x]) if layer.size == size
                   and layer.kind != "pad"]
        if not earlier:
            return None
        other = self.src.choice(earlier)
        channels = self.layers[x].channels + self.layers[other].channels
        return self.add("cat", [x, other], {}, channels, size)


def random_spec(
    src: Source,
    dims: int = 2,
    image: Sequence[int] | None = None,
    max_blocks: int = 6,
    dense: bool = False,
    head: str | None = None,
    chain: bool = False,
) -> NetSpec:
    """Draw a network for an image of ``image`` (drawn too when None) from ``src``.

    ``chain``: no branches (no residual, concat or skip blocks); the head may still read two
    layers of the chain.
    """
    if image is None:
        lo, hi = (10, 40) if dims == 2 else (6, 14)
        image = [src.integer(lo, hi) for _ in range(dims)]
    image = tuple(int(n) for n in image)
    builder = _Builder(src, dims, dense, max_size=2 * max(image), chain=chain)
    x = builder.add("input", [], {}, src.integer(1, 3), image)
    for _ in range(src.integer(1, max_blocks)):
        x = builder.block(x)
    if x == 0:  # make sure there is at least one op after the image
        x = builder.act(0)
    spec = NetSpec(dims, builder.layers)
    spec.head = head or src.choice(["linear", "linear", "map"])
    spec.cuts = [x]
    candidates = [i for i, layer in enumerate(spec.layers) if 0 < i < x and layer.kind != "pad"]
    if candidates and src.flag(0.4):
        spec.cuts.insert(0, src.choice(candidates))
    return spec


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def _activation(fn: str) -> nn.Module:
    return {
        "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU,
        "softplus": nn.Softplus, "hardswish": nn.Hardswish, "gelu": nn.GELU,
        "leaky": lambda: nn.LeakyReLU(0.1),
    }[fn]()


def _torch_pad(pads: Sequence[tuple[int, int]]) -> list[int]:
    """Per-axis (begin, end) -> F.pad / ConstantPadNd order (last axis first)."""
    out: list[int] = []
    for b, e in reversed(list(pads)):
        out += [b, e]
    return out


def _layer_module(layer: Layer, cin: int, dims: int) -> nn.Module:
    p = layer.params
    if layer.kind == "conv":
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        return conv(cin, layer.channels, tuple(p["kernel"]), stride=tuple(p["stride"]),
                    padding=tuple(p["padding"]), dilation=tuple(p["dilation"]),
                    groups=p["groups"], bias=p["bias"])
    if layer.kind == "pad":
        pad = nn.ZeroPad2d if dims == 2 else (lambda v: nn.ConstantPad3d(v, 0.0))
        return pad(tuple(_torch_pad(p["pads"])))
    if layer.kind == "pool":
        if p["type"] == "max":
            pool = nn.MaxPool2d if dims == 2 else nn.MaxPool3d
            return pool(tuple(p["kernel"]), tuple(p["stride"]), tuple(p["padding"]),
                        dilation=tuple(p["dilation"]), ceil_mode=p["ceil_mode"])
        pool = nn.AvgPool2d if dims == 2 else nn.AvgPool3d
        return pool(tuple(p["kernel"]), tuple(p["stride"]), tuple(p["padding"]),
                    ceil_mode=p["ceil_mode"], count_include_pad=p["count_include_pad"])
    if layer.kind == "act":
        return _activation(p["fn"])
    if layer.kind == "bn":
        return (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(layer.channels)
    if layer.kind == "up":
        return nn.Upsample(scale_factor=p["factor"], mode="nearest")
    return nn.Identity()  # add / cat: computed in forward


class RandNet(nn.Module):
    """The torch module of a :class:`NetSpec` (``layers.<k>`` holds layer ``k + 1``'s op)."""

    def __init__(self, spec: NetSpec) -> None:
        super().__init__()
        self.spec = spec
        mods = []
        for layer in spec.layers[1:]:
            cin = spec.layers[layer.inputs[0]].channels
            mods.append(_layer_module(layer, cin, spec.dims))
        self.layers = nn.ModuleList(mods)
        if spec.head == "linear":
            self.fc = nn.Linear(sum(spec.layers[c].channels for c in spec.cuts), spec.classes)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every layer's value (layer 0 is ``x``)."""
        values = [x]
        for layer, mod in zip(self.spec.layers[1:], self.layers):
            args = [values[i] for i in layer.inputs]
            if layer.kind == "add":
                values.append(args[0] + args[1])
            elif layer.kind == "cat":
                values.append(torch.cat(args, dim=1))
            else:
                values.append(mod(args[0]))
        return values

    def forward(self, x: torch.Tensor):
        values = self.features(x)
        if self.spec.head == "linear":
            axes = tuple(range(2, 2 + self.spec.dims))
            pooled = [values[c].mean(dim=axes) for c in self.spec.cuts]
            return self.fc(torch.cat(pooled, dim=1))
        outs = tuple(values[c] for c in self.spec.cuts)
        return outs if len(outs) > 1 else outs[0]


def build_module(spec: NetSpec, seed: int = 0) -> RandNet:
    """The seeded float32 eval-mode module of ``spec``, BatchNorm with random statistics.

    Every parameter is drawn afresh so that no two initializers are equal (torch's exporter
    would merge equal initializers into ``Identity`` nodes and lose their names).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = RandNet(spec)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    c = m.num_features
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(0.2 * torch.randn(c, generator=gen))
                    m.running_mean.copy_(0.2 * torch.randn(c, generator=gen))
                    m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                elif isinstance(m, (nn.Conv2d, nn.Conv3d)) and m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    return module.float().eval()


@dataclass
class RandomNet:
    """A drawn network: its spec, torch module and ONNX export."""

    spec: NetSpec
    module: RandNet
    onnx_model: onnx.ModelProto

    @property
    def image_shape(self) -> tuple[int, ...]:
        return self.spec.image_shape


def random_net(src: Source | int, dims: int = 2, image: Sequence[int] | None = None,
               dense: bool = False, max_blocks: int = 6, head: str | None = None,
               seed: int = 0, chain: bool = False) -> RandomNet:
    """Draw a spec from ``src`` (a :class:`Source` or an integer seed), build and export it."""
    if isinstance(src, int):
        seed = src
        src = RandomSource(src)
    spec = random_spec(src, dims, image, max_blocks=max_blocks, dense=dense, head=head,
                       chain=chain)
    module = build_module(spec, seed)
    return RandomNet(spec, module, export_torch(module, spec.image_shape, dynamic=False))
