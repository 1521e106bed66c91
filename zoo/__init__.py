"""Torch models shared by streamc's tests, benchmarks and examples (not installed by pip).

Importable from the repository root (``import zoo``), as the tests and ``python -m
benchmarks.<name>`` run. Export any of them with :func:`streamc.export.export_torch`.

- :mod:`zoo.resnet`: ResNet-18/50 layouts (``BasicBlock``, ``Bottleneck``, ``ResNet``),
  :func:`~zoo.resnet.randomize_batchnorm` and :func:`~zoo.resnet.randomize_parameters`;
- :mod:`zoo.volumes`: :class:`~zoo.volumes.VolumeNet`, a small 3-D CNN;
- :mod:`zoo.models`: the tiny test models (VGG, MiniResNet, UNet, Dilated, ...) and the
  benchmark-sized ``VGGish`` and ``UNetish``;
- :mod:`zoo.registry`: the test models by name, seeded and exported (:func:`~zoo.registry.build`
  returns a :class:`~zoo.registry.ZooModel`);
- :mod:`zoo.onnx_helpers`: ONNX Runtime helpers (``run_onnx``, ``expose_tensor``,
  ``perturbation_field``, ``random_image``).
"""

from zoo.onnx_helpers import expose_tensor, perturbation_field, random_image, run_onnx
from zoo.registry import (
    CUT_HINTS,
    DEFAULT_SHAPES,
    LOCAL_NAMES,
    NAMES,
    ZooModel,
    build,
    make_module,
)
from zoo.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    randomize_batchnorm,
    randomize_parameters,
    resnet18,
    resnet50,
)
from zoo.volumes import VolumeNet

__all__ = [
    "CUT_HINTS",
    "DEFAULT_SHAPES",
    "LOCAL_NAMES",
    "NAMES",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "VolumeNet",
    "ZooModel",
    "build",
    "expose_tensor",
    "make_module",
    "perturbation_field",
    "random_image",
    "randomize_batchnorm",
    "randomize_parameters",
    "resnet18",
    "resnet50",
    "run_onnx",
]
