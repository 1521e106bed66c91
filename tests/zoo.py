"""A zoo of small torch CNNs exported to ONNX, for streamc's tests.

Every model is tiny (a handful of convolutions, at most 16 channels) so that full-image runs on
32²–96² images take milliseconds on a CPU, yet together they cover the cases the compiler must
get right: strides, pooling with padding, residual DAGs, frozen BatchNorm, dilation, groups,
non-square kernels and strides, ``auto_pad``, explicit asymmetric ``Pad``, nearest ``Resize`` and
``Concat`` (U-Net), several cut tensors, 3-D volumes, assorted activations, and a model whose very
first op is not local (for error tests).

Export choices (see :func:`export`), found by inspecting what torch 2.13's TorchScript exporter
(``dynamo=False``, opset 17) emits:

- ``do_constant_folding=True`` folds eval-mode BatchNorm into the preceding Conv and renames the
  folded weights ``onnx::Conv_NN``. We therefore export with ``do_constant_folding=False`` and
  ``training=TrainingMode.EVAL``: BatchNorm stays a ``BatchNormalization`` node (inference form,
  running statistics as inputs) and every initializer is named after its torch
  ``state_dict`` key (``'conv1.weight'``, ``'bn1.running_mean'``...).
- Torch de-duplicates initializers with identical values, replacing the duplicates by
  ``Identity`` nodes; untouched BatchNorm has ``weight == running_var == 1`` and
  ``bias == running_mean == 0`` and so would lose its names. :func:`_randomise` gives every
  BatchNorm random affine parameters and statistics, so this does not happen here.
- Without constant folding some constants come out as subgraphs rather than initializers: the
  ``scales`` of ``Resize`` are a ``Concat`` of two ``Constant`` nodes, and ``nn.ZeroPad2d`` turns
  into a ``Shape``/``Gather``/``ConstantOfShape``/``Concat``/``Reshape``/``Slice``/``Transpose``/
  ``Cast`` chain computing the ``pads`` input of a ``Pad`` (``mode='constant'``) from the input
  shape. The compiler must fold such chains (static shapes make them constant).
"""

from __future__ import annotations

import copy
import functools
import io
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

__all__ = [
    "NAMES",
    "LOCAL_NAMES",
    "DEFAULT_SHAPES",
    "CUT_HINTS",
    "ZooModel",
    "build",
    "make_module",
    "export",
    "expose_tensor",
    "perturbation_field",
    "random_image",
    "run_onnx",
]


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


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


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu-conv-bn + shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18 in miniature: 7×7/2 stem + BN + relu + maxpool 3/2, two basic blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
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
    """First op is InstanceNormalization (statistics over the whole image): not local."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.InstanceNorm2d(3, affine=True)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = _head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.relu(self.conv(self.norm(x))))


_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "vgg": VGG,
    "resnet": ResNet,
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
    "nonlocal_first": "empty prefix: the first op, InstanceNormalization, is not local",
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


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def export(
    module: nn.Module,
    image_shape: Sequence[int],
    dynamic: bool = False,
    output_names: Sequence[str] | None = None,
) -> onnx.ModelProto:
    """Export ``module`` (put in eval mode) to an opset-17 ONNX model.

    The input is named ``'image'``; outputs are ``output_names``, by default ``['logits']`` for a
    single output or ``['out0', 'out1', ...]`` when the module returns a tuple. BatchNorm stays
    ``BatchNormalization`` and initializers keep their torch ``state_dict`` names (see the module
    docstring). With ``dynamic=True`` the batch and spatial axes of the input are symbolic
    (``N``, ``D``, ``H``, ``W``), as are the batch and spatial axes of every output.
    """
    module.eval()
    shape = tuple(int(s) for s in image_shape)
    x = torch.zeros(shape, dtype=torch.float32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. padding='same' with an even kernel
        y = module(x)
    n_out = len(y) if isinstance(y, (tuple, list)) else 1
    outs = list(y) if isinstance(y, (tuple, list)) else [y]
    if output_names is None:
        output_names = ["logits"] if n_out == 1 else [f"out{i}" for i in range(n_out)]
    output_names = list(output_names)
    if len(output_names) != n_out:
        raise ValueError(f"module returns {n_out} outputs but {len(output_names)} names given")

    dynamic_axes: dict[str, dict[int, str]] | None = None
    if dynamic:
        spatial = ["D", "H", "W"][-(len(shape) - 2) :] if len(shape) > 2 else []
        dynamic_axes = {"image": {0: "N", **{i + 2: s for i, s in enumerate(spatial)}}}
        for oname, out in zip(output_names, outs, strict=True):
            axes = {0: "N"}
            if out.dim() == len(shape):  # a spatial map: its spatial axes follow the input's
                axes.update({i + 2: f"{oname}_{s}" for i, s in enumerate(spatial)})
            dynamic_axes[oname] = axes

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            f,
            dynamo=False,
            opset_version=17,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.EVAL,
            input_names=["image"],
            output_names=output_names,
            dynamic_axes=dynamic_axes,
        )
    model = onnx.load_model_from_string(f.getvalue())
    if not dynamic:
        # torch names the batch axis of a Gemm output symbolically ('Gemmlogits_dim_0') even in
        # a static export; pin every output to the shape torch computed.
        for vi, out in zip(model.graph.output, outs, strict=True):
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for size in out.shape:
                dims.add().dim_value = int(size)
    return model


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
    model = export(module, image_shape, dynamic=dynamic)
    return ZooModel(name, module, model, image_shape, CUT_HINTS[name])


def build(name: str, image_shape: tuple[int, ...] | None = None, dynamic: bool = False) -> ZooModel:
    """Build (or fetch from the cache) zoo model ``name`` exported at ``image_shape``.

    ``image_shape`` defaults to :data:`DEFAULT_SHAPES`; the weights do not depend on it. The
    result is cached per ``(name, image_shape, dynamic)`` and shared between callers.
    """
    if name not in _FACTORIES:
        raise KeyError(f"unknown zoo model {name!r}; choose one of {NAMES}")
    shape = tuple(int(s) for s in (image_shape or DEFAULT_SHAPES[name]))
    return _build_cached(name, shape, bool(dynamic))


# --------------------------------------------------------------------------------------------
# ONNX helpers
# --------------------------------------------------------------------------------------------


def random_image(shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """A standard-normal float32 array of ``shape``."""
    return np.random.default_rng(seed).standard_normal(tuple(shape)).astype(np.float32)


def run_onnx(
    onnx_model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    optimize: bool = False,
) -> dict[str, np.ndarray]:
    """Run ``onnx_model`` on ONNX Runtime (CPU); returns every graph output by name.

    Graph optimisations are off by default so the graph runs as written (no BN folding or
    fusions), which keeps results comparable across graph rewrites.
    """
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.log_severity_level = 3
    sess = ort.InferenceSession(
        onnx_model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


def expose_tensor(onnx_model: onnx.ModelProto, tensor_name: str | Sequence[str]) -> onnx.ModelProto:
    """A copy of ``onnx_model`` with intermediate tensor(s) added as graph outputs.

    Types and shapes come from ``onnx.shape_inference``; a tensor whose shape cannot be inferred
    is exposed with its element type only (float when unknown). Raises ``KeyError`` for a name
    that no node produces and that is not a graph input or initializer.
    """
    names = [tensor_name] if isinstance(tensor_name, str) else list(tensor_name)
    model = copy.deepcopy(onnx_model)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 - shape inference is best effort here
        inferred = model
    g = inferred.graph
    infos = {vi.name: vi for vi in [*g.value_info, *g.input, *g.output]}
    produced = {o for n in model.graph.node for o in n.output}
    produced |= {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in produced:
            raise KeyError(f"tensor {name!r} is not produced by any node of the graph")
        if name in existing:
            continue
        if name in infos:
            model.graph.output.append(copy.deepcopy(infos[name]))
        else:
            model.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
        existing.add(name)
    return model


def perturbation_field(
    onnx_model: onnx.ModelProto,
    input_name: str,
    output_name: str,
    shape: Sequence[int],
    pixel: Sequence[int],
    trials: int = 4,
    seed: int = 0,
    rtol: float = 1e-4,
) -> np.ndarray:
    """Which output positions depend on one input pixel, found empirically with ONNX Runtime.

    For each trial, a random standard-normal input of ``shape`` is run, then run again with the
    input value at spatial position ``pixel`` (all batch items and channels) changed by a random
    amount of magnitude 3 to 100; output positions whose value changes by more than
    ``rtol × (1 + max |output|)`` (well above float32 noise, yet far below the change a real
    dependency makes) are marked. The masks of all trials are OR-ed, so positions that one
    perturbation misses (a ReLU that stays off, a max pool that keeps another value) are still
    found. ``output_name`` may be an intermediate tensor (it is exposed with
    :func:`expose_tensor`).

    Returns a boolean array over the output's spatial grid (its axes after batch and channel;
    0-d for an output without spatial axes). Every marked position lies inside the true
    receptive-field cone of ``pixel``; for dense random networks the mask fills it.
    """
    shape = tuple(int(s) for s in shape)
    pixel = tuple(int(p) for p in pixel)
    if len(pixel) != len(shape) - 2:
        raise ValueError(f"pixel {pixel} must have {len(shape) - 2} spatial coordinates")
    if not all(0 <= p < s for p, s in zip(pixel, shape[2:], strict=True)):
        raise ValueError(f"pixel {pixel} lies outside the spatial extent {shape[2:]}")
    model = onnx_model
    if output_name not in {o.name for o in onnx_model.graph.output}:
        model = expose_tensor(onnx_model, output_name)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    index = (slice(None), slice(None), *pixel)
    mask: np.ndarray | None = None
    for trial in range(trials):
        x = rng.standard_normal(shape).astype(np.float32)
        magnitude = 100.0 if trial % 2 == 0 else 3.0
        delta = (
            rng.choice([-1.0, 1.0], size=x[index].shape)
            * magnitude
            * rng.uniform(0.5, 1.0, size=x[index].shape)
        )
        xp = x.copy()
        xp[index] += delta.astype(np.float32)
        (y0,) = sess.run([output_name], {input_name: x})
        (y1,) = sess.run([output_name], {input_name: xp})
        y0 = np.asarray(y0, dtype=np.float64)
        y1 = np.asarray(y1, dtype=np.float64)
        scale = 1.0 + max(np.abs(y0).max(initial=0.0), np.abs(y1).max(initial=0.0))
        changed = np.abs(y1 - y0) > rtol * scale
        changed = changed.reshape(changed.shape[0] * changed.shape[1], *changed.shape[2:])
        trial_mask = changed.any(axis=0) if changed.ndim > 1 else np.asarray(changed.any())
        mask = trial_mask if mask is None else (mask | trial_mask)
    assert mask is not None
    return mask
