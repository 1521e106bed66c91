"""The test model registry: named, seeded zoo models and their ONNX exports.

:func:`build` returns a :class:`ZooModel` (the torch module and its ONNX export, cached per name,
shape and dynamism); :data:`NAMES`, :data:`LOCAL_NAMES`, :data:`DEFAULT_SHAPES` and
:data:`CUT_HINTS` describe the models of :mod:`zoo.models`. Exports go through
:func:`streamc.export.export_torch`; every BatchNorm (and PReLU, affine InstanceNorm) gets random
non-trivial values first, so torch does not de-duplicate equal initializers into ``Identity``
nodes.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import torch
from torch import nn

from streamc.export import export_torch
from zoo.models import (
    VGG,
    Conv3D,
    Dilated,
    MiniResNet,
    MixedAct,
    NonLocalFirst,
    NonSquare,
    TwoCut,
    UNet,
    ZeroPad,
)
from zoo.onnx_helpers import random_image, run_onnx

_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "vgg": VGG,
    "resnet": MiniResNet,
    "unet": UNet,
    "dilated": Dilated,
    "nonsquare": NonSquare,
    "zeropad": ZeroPad,
    "twocut": TwoCut,
    "conv3d": Conv3D,
    "mixed_act": MixedAct,
    "nonlocal_first": NonLocalFirst,
}

#: Every model name, in a stable order.
NAMES: list[str] = list(_FACTORIES)

#: Models whose graph starts with a non-empty local prefix (all but the error-test model).
LOCAL_NAMES: list[str] = [n for n in NAMES if n != "nonlocal_first"]

#: Default input shape per model (N, C, *spatial).
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "vgg": (1, 3, 64, 64),
    "resnet": (1, 3, 64, 64),
    "unet": (1, 3, 48, 48),  # spatial size must be even (pool 2, upsample 2, concat)
    "dilated": (1, 3, 48, 48),
    "nonsquare": (1, 3, 40, 56),
    "zeropad": (1, 3, 32, 36),
    "twocut": (1, 3, 64, 64),
    "conv3d": (1, 1, 24, 24, 24),
    "mixed_act": (1, 3, 45, 45),  # odd: exercises the ceil-mode average pool's partial window
    "nonlocal_first": (1, 3, 32, 32),
}

#: Where the local prefix should end, in words.
CUT_HINTS: dict[str, str] = {
    "vgg": "before GlobalAveragePool: the output of the last Conv (stride 4)",
    "resnet": "before GlobalAveragePool: the last block's final Relu (stride 8)",
    "unet": "no head: the whole graph is local, the cut tensor is the output map (stride 1)",
    "dilated": "before GlobalAveragePool: the output of the last 1x1 Conv (stride 2)",
    "nonsquare": "before GlobalAveragePool: the output of the last Conv (strides (4, 6))",
    "zeropad": "before GlobalAveragePool: the last Relu (stride 2); the Pad chain is in the prefix",
    "twocut": "two cut tensors: the stride-4 Relu (also feeds the next conv) and the stride-8 "
    "Relu, each read by a ReduceMean",
    "conv3d": "before GlobalAveragePool: the last Relu (stride 4 on D, H, W)",
    "mixed_act": "before GlobalAveragePool: the Tanh after the residual Add (stride 2)",
    "nonlocal_first": "empty prefix: the first op, CumSum, is not local",
}


def _seed(name: str) -> int:
    """A stable per-model seed (``hash`` is salted per process; crc32 is not)."""
    return zlib.crc32(name.encode())


def _randomise(module: nn.Module, generator: torch.Generator) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    Random values also keep torch's exporter from de-duplicating equal initializers (all-ones
    weight and running_var) into ``Identity`` nodes, which would lose their names.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                m.bias.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
                m.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
        elif isinstance(m, nn.PReLU):
            with torch.no_grad():
                m.weight.copy_(0.5 * torch.rand(m.weight.shape, generator=generator))
        elif isinstance(m, nn.InstanceNorm2d) and m.affine:
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=generator))


def make_module(name: str) -> nn.Module:
    """A fresh instance of zoo model ``name``: seeded weights, float32, eval mode."""
    if name not in _FACTORIES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {NAMES}")
    seed = _seed(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = _FACTORIES[name]()
    _randomise(module, torch.Generator().manual_seed(seed + 1))
    return module.float().eval()


@dataclass
class ZooModel:
    """A zoo model: the torch module and its ONNX export.

    Instances returned by :func:`build` are cached and shared: ``copy.deepcopy`` the module or
    the ONNX model before changing them.
    """

    name: str
    module: nn.Module  # eval mode, float32, seeded weights, BN with non-trivial running stats
    onnx_model: onnx.ModelProto  # static shapes at image_shape unless built with dynamic=True
    image_shape: tuple[int, ...]
    cut_hint: str

    @property
    def output_names(self) -> list[str]:
        """Names of the ONNX graph outputs."""
        return [o.name for o in self.onnx_model.graph.output]

    def image(self, seed: int = 0) -> np.ndarray:
        """A random float32 image of ``image_shape``."""
        return random_image(self.image_shape, seed)

    def torch_forward(self, image: np.ndarray) -> np.ndarray:
        """Run the torch module on ``image`` (no grad); returns a numpy array."""
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. padding='same' with an even kernel
            return self.module(torch.from_numpy(np.ascontiguousarray(image))).numpy()

    def ort_forward(self, image: np.ndarray) -> np.ndarray:
        """Run the ONNX model with ONNX Runtime on ``image``; returns the first output."""
        return run_onnx(self.onnx_model, {"image": image})[self.output_names[0]]


@functools.cache  # = lru_cache(maxsize=None)
def _build_cached(name: str, image_shape: tuple[int, ...], dynamic: bool) -> ZooModel:
    module = make_module(name)
    model = export_torch(module, image_shape, dynamic=dynamic, dynamic_batch=dynamic)
    return ZooModel(name, module, model, image_shape, CUT_HINTS[name])


def build(name: str, image_shape: tuple[int, ...] | None = None, dynamic: bool = False) -> ZooModel:
    """Build (or fetch from the cache) zoo model ``name`` exported at ``image_shape``.

    ``image_shape`` defaults to :data:`DEFAULT_SHAPES`; the weights do not depend on it. With
    ``dynamic=True`` the batch and spatial axes of the input (and of spatial outputs) are
    symbolic. The result is cached per ``(name, image_shape, dynamic)`` and shared between
    callers.
    """
    if name not in _FACTORIES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {NAMES}")
    shape = tuple(int(s) for s in (image_shape or DEFAULT_SHAPES[name]))
    return _build_cached(name, shape, bool(dynamic))


__all__ = [
    "CUT_HINTS",
    "DEFAULT_SHAPES",
    "LOCAL_NAMES",
    "NAMES",
    "ZooModel",
    "build",
    "make_module",
]
