"""Table-driven tests of the VJP rules: one-node ONNX models, ORT backward vs torch.autograd.

Each case builds a one-node model with onnx.helper, emits its backward graph with
:func:`build_backward`, runs it on ONNX Runtime (CPU, float32) and compares the forward output and
every input gradient with torch (float64) on the equivalent torch function.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from streamc.ops.vjp import conv as vjp_conv
from streamc.passes.autodiff import build_backward

TOLERANCE = 1e-5


@dataclass
class In:
    """A float operand: a graph input, or (``init=True``) an initializer; gradients are checked."""

    name: str
    shape: tuple[int, ...]
    init: bool = False
    low: float | None = None  # uniform in [low, high) instead of a normal draw
    high: float | None = None


@dataclass
class Const:
    """A constant operand (an initializer that is not differentiated): pads, axes, shapes..."""

    name: str
    value: np.ndarray


@dataclass
class Case:
    id: str
    op: str
    operands: list[In | Const | None]  # None: an omitted optional input
    torch_fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]
    attrs: dict = field(default_factory=dict)
    outputs: int = 1
    opset: int = 17
    fd_check: bool = False  # also run the finite-difference inner-product check


def ints(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def floats(*values: float) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def torch_pads(pads: Sequence[int]) -> list[int]:
    """ONNX pads (b1, b2, ..., e1, e2, ...) -> F.pad order (last axis first)."""
    rank = len(pads) // 2
    order = []
    for a in reversed(range(rank)):
        order += [pads[a], pads[a + rank]]
    return order


def conv_ref(pads, strides, dilations, groups):
    rank = len(strides)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[rank]

    def fn(x, w, b=None):
        return conv(F.pad(x, torch_pads(pads)), w, b, stride=strides, dilation=dilations,
                    groups=groups)

    return fn


def conv_case(id, x, w, bias=False, strides=None, pads=None, dilations=None, group=1,
              fd=False, auto_pad=None, torch_pads_override=None):
    rank = len(x) - 2
    strides = strides or [1] * rank
    dilations = dilations or [1] * rank
    attrs = {"strides": strides, "dilations": dilations, "group": group}
    if auto_pad:
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = pads or [0] * (2 * rank)
    operands = [In("x", x), In("w", w, init=True)]
    if bias:
        operands.append(In("b", (w[0],), init=True))
    ref_pads = torch_pads_override or pads or [0] * (2 * rank)
    return Case(id, "Conv", operands, conv_ref(ref_pads, strides, dilations, group), attrs,
                fd_check=fd)


CONV_CASES = [
    conv_case("conv2d_s1_p1_bias", (2, 3, 9, 10), (4, 3, 3, 3), True, pads=[1, 1, 1, 1], fd=True),
    conv_case("conv2d_s2_asym", (2, 3, 9, 10), (4, 3, 3, 3), pads=[0, 1, 1, 0], strides=[2, 2]),
    conv_case("conv2d_s3_d2", (1, 2, 13, 12), (3, 2, 3, 3), True, pads=[2, 1, 2, 1],
              strides=[3, 3], dilations=[2, 2], fd=True),
    conv_case("conv2d_groups2", (2, 4, 10, 9), (6, 2, 3, 3), True, pads=[1, 1, 1, 1],
              strides=[2, 1], dilations=[2, 1], group=2),
    conv_case("conv2d_depthwise", (2, 4, 8, 8), (4, 1, 3, 3), True, pads=[1, 1, 1, 1],
              group=4, fd=True),
    conv_case("conv2d_depthwise_mult2_s2", (1, 4, 9, 9), (8, 1, 3, 3), pads=[1, 0, 1, 2],
              strides=[2, 2], group=4),
    conv_case("conv2d_k3x1_s2x1", (2, 3, 8, 7), (5, 3, 3, 1), pads=[1, 0, 1, 0],
              strides=[2, 1]),
    conv_case("conv2d_1x1_s2", (2, 6, 7, 8), (4, 6, 1, 1), True, strides=[2, 2]),
    conv_case("conv2d_1x1_pad_beyond_kernel", (1, 3, 5, 5), (2, 3, 1, 1), pads=[1, 2, 0, 1]),
    conv_case("conv2d_k5_s2_d2_p3", (1, 2, 15, 16), (3, 2, 5, 5), pads=[3, 3, 3, 3],
              strides=[2, 2], dilations=[2, 2]),
    conv_case("conv2d_same_upper_s2", (1, 3, 9, 10), (4, 3, 3, 3), strides=[2, 2],
              auto_pad="SAME_UPPER", torch_pads_override=[1, 0, 1, 1]),
    conv_case("conv2d_valid", (1, 3, 9, 10), (4, 3, 3, 3), strides=[2, 2], auto_pad="VALID"),
    conv_case("conv1d_k5_s2", (2, 3, 17), (4, 3, 5), True, pads=[2, 1], strides=[2], fd=True),
    conv_case("conv1d_d3", (1, 2, 20), (2, 2, 3), pads=[0, 3], dilations=[3]),
    conv_case("conv3d_s122", (1, 2, 5, 6, 7), (3, 2, 3, 3, 3), True, pads=[1, 1, 1, 1, 0, 1],
              strides=[1, 2, 2]),
    conv_case("conv3d_groups", (1, 4, 4, 5, 6), (4, 2, 3, 1, 3), pads=[1, 0, 1, 1, 0, 1],
              group=2, dilations=[1, 1, 2]),
]


def conv_transpose_case(id, x, w, bias=False, strides=(1, 1), pads=(0, 0, 0, 0),
                        output_padding=None, dilations=None, group=1):
    rank = len(x) - 2
    dilations = list(dilations or [1] * rank)
    attrs = {"strides": list(strides), "pads": list(pads), "dilations": dilations, "group": group}
    if output_padding:
        attrs["output_padding"] = list(output_padding)
    fn_t = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[rank]

    def fn(x, w, b=None):
        return fn_t(x, w, b, stride=list(strides), padding=list(pads[:rank]),
                    output_padding=list(output_padding or [0] * rank), groups=group,
                    dilation=dilations)

    operands = [In("x", x), In("w", w, init=True)]
    if bias:
        operands.append(In("b", (w[1] * group,), init=True))
    return Case(id, "ConvTranspose", operands, fn, attrs)


CONV_TRANSPOSE_CASES = [
    conv_transpose_case("convT_s2_p1_op1", (2, 3, 5, 6), (3, 4, 3, 3), True, (2, 2),
                        (1, 1, 1, 1), (1, 1)),
    conv_transpose_case("convT_s1", (1, 3, 5, 6), (3, 2, 3, 3), False, (1, 1), (1, 1, 1, 1)),
    conv_transpose_case("convT_groups_d2", (1, 4, 5, 5), (4, 3, 3, 3), True, (2, 2),
                        (0, 0, 0, 0), None, (2, 2), 2),
    conv_transpose_case("convT_1d_s3", (2, 2, 7), (2, 3, 4), False, (3,), (1, 1), (2,)),
    Case("convT_output_shape", "ConvTranspose", [In("x", (1, 3, 5, 5)), In("w", (3, 2, 3, 3))],
         lambda x, w: F.conv_transpose2d(x, w, stride=2)[:, :, 1:, 1:],
         {"strides": [2, 2], "output_shape": [10, 10]}),
]


def pool_case(id, op, x, kernel, strides=None, pads=None, dilations=None, ceil=0,
              include_pad=None, fd=False):
    rank = len(kernel)
    strides = list(strides or [1] * rank)
    pads = list(pads or [0] * (2 * rank))
    attrs = {"kernel_shape": list(kernel), "strides": strides, "pads": pads, "ceil_mode": ceil}
    if dilations:
        attrs["dilations"] = list(dilations)
    if include_pad is not None:
        attrs["count_include_pad"] = include_pad
    if op == "MaxPool":
        fn_t = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[rank]

        def fn(x):
            return fn_t(x, list(kernel), strides, pads[:rank], list(dilations or [1] * rank),
                        ceil_mode=bool(ceil))
    else:
        fn_t = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[rank]

        def fn(x):
            return fn_t(x, list(kernel), strides, pads[:rank], ceil_mode=bool(ceil),
                        count_include_pad=bool(include_pad))

    return Case(id, op, [In("x", x)], fn, attrs, opset=19 if dilations else 17, fd_check=fd)


POOL_CASES = [
    pool_case("maxpool_k3_s2_p1", "MaxPool", (2, 3, 9, 10), (3, 3), (2, 2), (1, 1, 1, 1), fd=True),
    pool_case("maxpool_k2_s2_ceil", "MaxPool", (1, 2, 7, 9), (2, 2), (2, 2), ceil=1),
    pool_case("maxpool_k3_s1_d2", "MaxPool", (1, 2, 9, 9), (3, 3), (1, 1), (1, 1, 1, 1), (2, 2)),
    pool_case("maxpool_k3_s2_ceil_p1", "MaxPool", (1, 2, 10, 8), (3, 3), (2, 2), (1, 1, 1, 1),
              ceil=1),
    pool_case("maxpool_1d", "MaxPool", (2, 3, 11), (3,), (2,), (1, 1)),
    pool_case("maxpool_3d", "MaxPool", (1, 2, 6, 7, 8), (2, 3, 3), (2, 2, 2), (0, 1, 1, 0, 1, 1)),
    pool_case("avgpool_k3_s2_p1_excl", "AveragePool", (2, 3, 9, 10), (3, 3), (2, 2),
              (1, 1, 1, 1), include_pad=0, fd=True),
    pool_case("avgpool_k3_s2_p1_incl", "AveragePool", (2, 3, 9, 10), (3, 3), (2, 2),
              (1, 1, 1, 1), include_pad=1),
    pool_case("avgpool_k2_s2_ceil_excl", "AveragePool", (1, 2, 7, 9), (2, 2), (2, 2),
              ceil=1, include_pad=0),
    pool_case("avgpool_k3_s2_ceil_p1_incl", "AveragePool", (1, 2, 10, 8), (3, 3), (2, 2),
              (1, 1, 1, 1), ceil=1, include_pad=1),
    pool_case("avgpool_k3_s1_p1_excl", "AveragePool", (1, 2, 6, 7), (3, 3), (1, 1),
              (1, 1, 1, 1), include_pad=0),
    pool_case("avgpool_1d", "AveragePool", (2, 3, 11), (3,), (2,), (1, 1), include_pad=0),
    pool_case("avgpool_3d", "AveragePool", (1, 2, 6, 7, 8), (2, 3, 3), (2, 2, 2),
              (0, 1, 1, 0, 1, 1), include_pad=1),
    Case("lppool_p2", "LpPool", [In("x", (1, 2, 8, 9))],
         lambda x: F.lp_pool2d(x, 2, 2, stride=2), {"kernel_shape": [2, 2], "strides": [2, 2],
                                                    "p": 2}),
    Case("lppool_p1_k3s1", "LpPool", [In("x", (1, 2, 6, 7))],
         lambda x: F.avg_pool2d(x.abs(), 3, 1) * 9, {"kernel_shape": [3, 3], "p": 1}),
]


def batch_norm_ref(x, scale, bias, mean, var, eps=1e-3):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    inv = (var + eps).rsqrt()
    return (x - mean.view(shape)) * (scale * inv).view(shape) + bias.view(shape)


X = (2, 3, 5, 6)
POSITIVE = {"low": 0.5, "high": 2.0}

POINTWISE_CASES = [
    Case("relu", "Relu", [In("x", X)], F.relu, fd_check=True),
    Case("leaky_relu", "LeakyRelu", [In("x", X)], lambda x: F.leaky_relu(x, 0.1), {"alpha": 0.1}),
    # a slope outside (0, 1): the Where form, not the max(mask, alpha) one
    Case("leaky_relu_steep", "LeakyRelu", [In("x", X)], lambda x: F.leaky_relu(x, 1.5),
         {"alpha": 1.5}),
    Case("prelu_channel", "PRelu", [In("x", X), In("slope", (3, 1, 1), init=True)],
         lambda x, s: torch.where(x > 0, x, x * s)),
    Case("prelu_scalar", "PRelu", [In("x", X), In("slope", (1,), init=True)],
         lambda x, s: torch.where(x > 0, x, x * s)),
    Case("sigmoid", "Sigmoid", [In("x", X)], torch.sigmoid),
    Case("hard_sigmoid_default", "HardSigmoid", [In("x", X, low=-4, high=4)],
         lambda x: torch.clamp(0.2 * x + 0.5, 0, 1)),
    Case("hard_sigmoid_torch", "HardSigmoid", [In("x", X, low=-4, high=4)], F.hardsigmoid,
         {"alpha": 1 / 6, "beta": 0.5}),
    Case("hard_swish", "HardSwish", [In("x", X, low=-5, high=5)], F.hardswish, fd_check=True),
    Case("tanh", "Tanh", [In("x", X)], torch.tanh),
    Case("clip_min_max", "Clip", [In("x", X), Const("lo", floats(-0.5)), Const("hi", floats(0.7))],
         lambda x: torch.clamp(x, -0.5, 0.7)),
    Case("clip_min_only", "Clip", [In("x", X), Const("lo", floats(-0.2))],
         lambda x: torch.clamp(x, min=-0.2)),
    Case("clip_max_only", "Clip", [In("x", X), None, Const("hi", floats(0.3))],
         lambda x: torch.clamp(x, max=0.3)),
    Case("clip_none", "Clip", [In("x", X)], lambda x: x),
    Case("elu", "Elu", [In("x", X)], lambda x: F.elu(x, 0.5), {"alpha": 0.5}),
    Case("selu", "Selu", [In("x", X)], F.selu),
    Case("softplus", "Softplus", [In("x", X)], F.softplus),
    Case("gelu", "Gelu", [In("x", X)], F.gelu, opset=20, fd_check=True),
    Case("gelu_tanh", "Gelu", [In("x", X)], lambda x: F.gelu(x, approximate="tanh"),
         {"approximate": "tanh"}, opset=20),
    Case("erf", "Erf", [In("x", X)], torch.erf),
    Case("identity", "Identity", [In("x", X)], lambda x: x),
    Case("dropout_inference", "Dropout", [In("x", X)], lambda x: x),
    Case("cast_to_double", "Cast", [In("x", X)], lambda x: x.double(),
         {"to": TensorProto.DOUBLE}),
    Case("exp", "Exp", [In("x", X)], torch.exp),
    Case("log", "Log", [In("x", X, **POSITIVE)], torch.log),
    Case("sqrt", "Sqrt", [In("x", X, **POSITIVE)], torch.sqrt),
    Case("neg", "Neg", [In("x", X)], torch.neg),
    Case("abs", "Abs", [In("x", X)], torch.abs),
    Case("reciprocal", "Reciprocal", [In("x", X, **POSITIVE)], torch.reciprocal),
    Case("batchnorm", "BatchNormalization",
         [In("x", X), In("scale", (3,), init=True), In("bias", (3,), init=True),
          In("mean", (3,), init=True), In("var", (3,), init=True, **POSITIVE)],
         batch_norm_ref, {"epsilon": 1e-3}, fd_check=True),
    Case("batchnorm_3d", "BatchNormalization",
         [In("x", (1, 2, 3, 4, 5)), In("scale", (2,), init=True), In("bias", (2,), init=True),
          Const("mean", floats(0.1, -0.2)), Const("var", floats(0.5, 2.0))],
         lambda x, s, b: batch_norm_ref(x, s, b, torch.tensor([0.1, -0.2], dtype=x.dtype),
                                        torch.tensor([0.5, 2.0], dtype=x.dtype)),
         {"epsilon": 1e-3}),
]

BROADCAST_SHAPES = [
    ("same", X, X),
    ("channel", X, (3, 1, 1)),
    ("scalar", X, (1,)),
    ("lead", (5, 6), X),
    ("both", (2, 1, 5, 1), (3, 1, 6)),
]
BINARY = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": torch.div,
    "Max": torch.maximum,
    "Min": torch.minimum,
}
BINARY_CASES = [
    Case(f"{op.lower()}_{tag}", op, [In("a", sa), In("b", sb, **(POSITIVE if op == "Div" else {}))],
         fn, fd_check=(tag == "both"))
    for op, fn in BINARY.items()
    for tag, sa, sb in BROADCAST_SHAPES
] + [
    Case("pow_channel", "Pow", [In("a", X, **POSITIVE), In("b", (3, 1, 1))], torch.pow,
         fd_check=True),
    Case("pow_const_int", "Pow", [In("a", X), Const("b", ints(3))], lambda a: a**3),
    Case("max3", "Max", [In("a", X), In("b", (3, 1, 1)), In("c", (1,))],
         lambda a, b, c: torch.maximum(torch.maximum(a, b), c)),
    Case("sum3", "Sum", [In("a", X), In("b", (3, 1, 1)), In("c", (6,))],
         lambda a, b, c: a + b + c),
    Case("mean2", "Mean", [In("a", X), In("b", (5, 1))], lambda a, b: (a + b) / 2),
    Case("where", "Where", [Const("cond", (np.arange(6) % 2 == 0)), In("a", X), In("b", (5, 1))],
         lambda a, b: torch.where(torch.tensor(np.arange(6) % 2 == 0), a, b)),
    Case("expand", "Expand", [In("x", (3, 1, 6)), Const("shape", ints(2, 3, 5, 6))],
         lambda x: x.expand(2, 3, 5, 6)),
]


def resize_case(id, x, mode, transform, nearest_mode, scales, torch_fn, sizes=None):
    attrs = {"mode": mode, "coordinate_transformation_mode": transform}
    if nearest_mode:
        attrs["nearest_mode"] = nearest_mode
    operands = [In("x", x), None,
                Const("scales", floats(*scales)) if sizes is None else None]
    if sizes is not None:
        operands.append(Const("sizes", ints(*sizes)))
    return Case(id, "Resize", operands, torch_fn, attrs)


def gather_nearest(x, rounding_index_h, rounding_index_w):
    return x[:, :, torch.tensor(rounding_index_h)][:, :, :, torch.tensor(rounding_index_w)]


STRUCTURE_CASES = [
    Case("concat_channels", "Concat", [In("a", (2, 3, 4, 5)), In("b", (2, 1, 4, 5)),
                                       In("c", (2, 2, 4, 5))],
         lambda a, b, c: torch.cat([a, b, c], 1), {"axis": 1}, fd_check=True),
    Case("concat_neg_axis", "Concat", [In("a", (2, 3, 4, 5)), In("b", (2, 3, 4, 2))],
         lambda a, b: torch.cat([a, b], -1), {"axis": -1}),
    Case("split_input", "Split", [In("x", (2, 4, 6, 5)), Const("split", ints(1, 3))],
         lambda x: torch.split(x, [1, 3], 1), {"axis": 1}, outputs=2),
    Case("split_num_outputs", "Split", [In("x", (2, 3, 6, 5))],
         lambda x: torch.split(x, 2, 2), {"axis": 2, "num_outputs": 3}, outputs=3, opset=18),
    Case("split_attr_opset12", "Split", [In("x", (2, 3, 6, 5))],
         lambda x: torch.split(x, [2, 4], -2), {"axis": -2, "split": [2, 4]}, outputs=2,
         opset=12),
    Case("pad_constant", "Pad", [In("x", X), Const("pads", ints(0, 0, 1, 2, 0, 0, 2, 1))],
         lambda x: F.pad(x, [2, 1, 1, 2]), fd_check=True),
    Case("pad_negative", "Pad", [In("x", X), Const("pads", ints(0, 0, -1, 2, 0, 0, 2, -2))],
         lambda x: F.pad(x, [2, -2, -1, 2])),
    Case("pad_edge", "Pad", [In("x", X), Const("pads", ints(0, 0, 2, 1, 0, 0, 1, 3))],
         lambda x: F.pad(x, [1, 3, 2, 1], mode="replicate"), {"mode": "edge"}, fd_check=True),
    Case("pad_reflect", "Pad", [In("x", X), Const("pads", ints(0, 0, 2, 1, 0, 0, 1, 3))],
         lambda x: F.pad(x, [1, 3, 2, 1], mode="reflect"), {"mode": "reflect"}, fd_check=True),
    Case("pad_reflect_one_side", "Pad", [In("x", (1, 2, 4, 5, 3)),
                                         Const("pads", ints(0, 0, 0, 3, 0, 0, 0, 0, 2, 1))],
         lambda x: F.pad(x, [0, 1, 3, 2, 0, 0], mode="reflect"), {"mode": "reflect"}),
    Case("pad_axes", "Pad", [In("x", X), Const("pads", ints(1, 3, 2, 0)), Const("value", floats(0)),
                             Const("axes", ints(2, -1))],
         lambda x: F.pad(x, [3, 0, 1, 2]), opset=18),
    Case("slice", "Slice", [In("x", X), Const("starts", ints(1, -4)), Const("ends", ints(4, 99)),
                            Const("axes", ints(2, 3))],
         lambda x: x[:, :, 1:4, 2:], fd_check=True),
    Case("slice_all_axes", "Slice", [In("x", (4, 5)), Const("starts", ints(-3, 0)),
                                     Const("ends", ints(-1, -2))],
         lambda x: x[-3:-1, 0:-2]),
    Case("resize_nearest_x2_asym_floor", "Resize",
         [In("x", X), None, Const("scales", floats(1, 1, 2, 2))],
         lambda x: F.interpolate(x, scale_factor=2, mode="nearest"),
         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
          "nearest_mode": "floor"}, fd_check=True),
    resize_case("resize_nearest_x2_half_pixel", X, "nearest", "half_pixel", None, (1, 1, 2, 2),
                lambda x: F.interpolate(x, scale_factor=2, mode="nearest")),
    resize_case("resize_nearest_x3x2_tf_half_pixel", X, "nearest", "tf_half_pixel_for_nn",
                "floor", (1, 1, 3, 2),
                lambda x: F.interpolate(x, scale_factor=(3, 2), mode="nearest")),
    resize_case("resize_nearest_sizes", X, "nearest", "asymmetric", "floor", None,
                lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), sizes=(2, 3, 10, 12)),
    resize_case("resize_nearest_round_prefer_ceil", X, "nearest", "asymmetric",
                "round_prefer_ceil", (1, 1, 2, 2),
                lambda x: gather_nearest(x, np.minimum((np.arange(10) + 1) // 2, 4),
                                         np.minimum((np.arange(12) + 1) // 2, 5))),
    resize_case("resize_linear_half_pixel", X, "linear", "half_pixel", None, (1, 1, 2, 2),
                lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)),
    resize_case("resize_linear_align_corners", X, "linear", "align_corners", None, None,
                lambda x: F.interpolate(x, size=(9, 11), mode="bilinear", align_corners=True),
                sizes=(2, 3, 9, 11)),
    Case("reshape", "Reshape", [In("x", X), Const("shape", ints(2, -1, 6))],
         lambda x: x.reshape(2, -1, 6)),
    Case("flatten", "Flatten", [In("x", X)], lambda x: x.flatten(1), {"axis": 1}),
    Case("transpose", "Transpose", [In("x", X)], lambda x: x.permute(0, 2, 3, 1),
         {"perm": [0, 2, 3, 1]}),
    Case("transpose_default", "Transpose", [In("x", (2, 3, 4))], lambda x: x.permute(2, 1, 0)),
    Case("squeeze", "Squeeze", [In("x", (2, 3, 1, 1)), Const("axes", ints(2, 3))],
         lambda x: x.squeeze(3).squeeze(2)),
    Case("unsqueeze", "Unsqueeze", [In("x", (2, 3)), Const("axes", ints(-1, 1))],
         lambda x: x.unsqueeze(1).unsqueeze(-1)),
]

HEAD_CASES = [
    Case("global_average_pool", "GlobalAveragePool", [In("x", X)],
         lambda x: x.mean((2, 3), keepdim=True), fd_check=True),
    Case("global_max_pool", "GlobalMaxPool", [In("x", X)], lambda x: x.amax((2, 3), keepdim=True)),
    Case("reduce_mean_attr", "ReduceMean", [In("x", X)], lambda x: x.mean((2, 3)),
         {"axes": [2, 3], "keepdims": 0}),
    Case("reduce_mean_input", "ReduceMean", [In("x", X), Const("axes", ints(-1))],
         lambda x: x.mean(-1, keepdim=True), opset=18),
    Case("reduce_mean_all", "ReduceMean", [In("x", X)], lambda x: x.mean().reshape(1, 1, 1, 1)),
    Case("reduce_sum_input", "ReduceSum", [In("x", X), Const("axes", ints(0, 2))],
         lambda x: x.sum((0, 2)), {"keepdims": 0}),
    Case("reduce_max_attr", "ReduceMax", [In("x", X)], lambda x: x.amax(1, keepdim=True),
         {"axes": [1]}),
    Case("reduce_max_input", "ReduceMax", [In("x", X), Const("axes", ints(2, 3))],
         lambda x: x.amax((2, 3)), {"keepdims": 0}, opset=18),
    Case("reduce_min_input", "ReduceMin", [In("x", X), Const("axes", ints(1))],
         lambda x: x.amin(1), {"keepdims": 0}, opset=18),
    Case("gemm_plain", "Gemm", [In("a", (4, 5)), In("b", (5, 3), init=True),
                                In("c", (3,), init=True)],
         lambda a, b, c: a @ b + c, fd_check=True),
    Case("gemm_transB_alpha_beta", "Gemm", [In("a", (4, 5)), In("b", (3, 5), init=True),
                                            In("c", (1, 3), init=True)],
         lambda a, b, c: 0.5 * a @ b.T + 2.0 * c, {"transB": 1, "alpha": 0.5, "beta": 2.0}),
    Case("gemm_transA_transB", "Gemm", [In("a", (5, 4)), In("b", (3, 5)), In("c", (4, 1))],
         lambda a, b, c: a.T @ b.T + c, {"transA": 1, "transB": 1}),
    Case("gemm_transA_noC", "Gemm", [In("a", (5, 4)), In("b", (5, 3))],
         lambda a, b: 1.5 * a.T @ b, {"transA": 1, "alpha": 1.5}),
    Case("matmul_2d", "MatMul", [In("a", (4, 5)), In("b", (5, 3), init=True)], torch.matmul),
    Case("matmul_batched_broadcast", "MatMul", [In("a", (2, 3, 4, 5)), In("b", (5, 6))],
         torch.matmul, fd_check=True),
    Case("matmul_batch_both", "MatMul", [In("a", (2, 1, 4, 5)), In("b", (3, 5, 2))],
         torch.matmul),
    Case("matmul_vec_mat", "MatMul", [In("a", (5,)), In("b", (2, 5, 3))], torch.matmul),
    Case("matmul_mat_vec", "MatMul", [In("a", (2, 4, 5)), In("b", (5,))], torch.matmul),
    Case("layer_norm_channels_last", "LayerNormalization",
         [In("x", (2, 5, 6, 4)), In("scale", (4,), init=True), In("bias", (4,), init=True)],
         lambda x, w, b: F.layer_norm(x, (4,), w, b, 1e-6), {"axis": -1, "epsilon": 1e-6},
         fd_check=True),
    Case("layer_norm_two_axes_no_bias", "LayerNormalization",
         [In("x", (2, 3, 5, 4)), In("scale", (5, 4))],
         lambda x, w: F.layer_norm(x, (5, 4), w), {"axis": 2}),
    Case("softmax", "Softmax", [In("x", X)], lambda x: torch.softmax(x, 1), {"axis": 1},
         fd_check=True),
    Case("log_softmax", "LogSoftmax", [In("x", (4, 7))], lambda x: torch.log_softmax(x, -1)),
]

CASES = (CONV_CASES + CONV_TRANSPOSE_CASES + POOL_CASES + POINTWISE_CASES + BINARY_CASES
         + STRUCTURE_CASES + HEAD_CASES)


# --------------------------------------------------------------------------------------------
# The harness


def make_model(case: Case) -> tuple[onnx.ModelProto, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The one-node model, the values of its graph inputs, and of its float initializers."""
    rng = np.random.default_rng(zlib.crc32(case.id.encode()))
    inputs, initializers, feeds, weights, names = [], [], {}, {}, []
    for operand in case.operands:
        if operand is None:
            names.append("")
            continue
        names.append(operand.name)
        if isinstance(operand, Const):
            initializers.append(numpy_helper.from_array(np.asarray(operand.value), operand.name))
            continue
        if operand.low is not None:
            value = rng.uniform(operand.low, operand.high, operand.shape).astype(np.float32)
        else:
            value = rng.standard_normal(operand.shape).astype(np.float32)
        if operand.init:
            initializers.append(numpy_helper.from_array(value, operand.name))
            weights[operand.name] = value
        else:
            inputs.append(helper.make_tensor_value_info(operand.name, TensorProto.FLOAT,
                                                        operand.shape))
            feeds[operand.name] = value
    while names and names[-1] == "":
        names.pop()
    out_names = [f"y{i}" for i in range(case.outputs)]
    node = helper.make_node(case.op, names, out_names, name=f"the_{case.op.lower()}",
                            **case.attrs)
    graph = helper.make_graph(
        [node], case.id, inputs,
        [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in out_names],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)])
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, feeds, weights


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    if expected.size == 0:
        return 0.0
    return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-30))


def torch_outputs(case: Case, values: list[torch.Tensor]) -> list[torch.Tensor]:
    result = case.torch_fn(*values)
    return list(result) if isinstance(result, (tuple, list)) else [result]


def run_case(case: Case):
    model, feeds, weights = make_model(case)
    wrt = [o.name for o in case.operands if isinstance(o, In)]
    backward = build_backward(model, wrt, keep_outputs=True)
    onnx.checker.check_model(backward.model, full_check=True)
    rng = np.random.default_rng(7)
    out_infos = {o.name: o for o in model.graph.output}
    cotangents = {}
    for out in backward.cotangents:
        dims = [d.dim_value for d in out_infos[out].type.tensor_type.shape.dim]
        elem = helper.tensor_dtype_to_np_dtype(out_infos[out].type.tensor_type.elem_type)
        cotangents[out] = rng.standard_normal(dims).astype(elem)
    run_feeds = {**feeds, **weights}
    run_feeds.update({backward.cotangents[o]: c for o, c in cotangents.items()})
    names = list(backward.gradients.values()) + list(backward.outputs.values())
    results = dict(zip(names, session(backward.model).run(names, run_feeds), strict=True))
    ort_grads = {w: results[g] for w, g in backward.gradients.items()}
    ort_outs = {o: results[n] for o, n in backward.outputs.items()}
    return model, feeds, weights, cotangents, ort_grads, ort_outs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_rule_matches_torch(case: Case) -> None:
    model, feeds, weights, cotangents, ort_grads, ort_outs = run_case(case)
    values = {**feeds, **weights}
    operands = [o for o in case.operands if isinstance(o, In)]
    tensors = [torch.tensor(values[o.name], dtype=torch.float64, requires_grad=True)
               for o in operands]
    outs = torch_outputs(case, tensors)
    out_names = [o.name for o in model.graph.output]
    for name, out in zip(out_names, outs, strict=True):
        assert relative_error(ort_outs[name], out.detach().numpy()) <= 1e-5, f"forward {name}"
    grads = torch.autograd.grad(
        outs, tensors,
        [torch.tensor(cotangents[n], dtype=out.dtype) for n, out in zip(out_names, outs,
                                                                          strict=True)],
        allow_unused=True,
    )
    for operand, grad in zip(operands, grads, strict=True):
        expected = np.zeros(operand.shape) if grad is None else grad.numpy()
        error = relative_error(ort_grads[operand.name], expected)
        assert error <= TOLERANCE, f"d{operand.name}: relative error {error:.2e}"


FD_CASES = [c for c in CASES if c.fd_check]


@pytest.mark.parametrize("case", FD_CASES, ids=[c.id for c in FD_CASES])
def test_inner_product_identity(case: Case) -> None:
    """⟨Jᵀc, t⟩ = ⟨c, J t⟩ with J t by central differences of the float64 reference forward."""
    model, feeds, weights, cotangents, ort_grads, _ = run_case(case)
    values = {**feeds, **weights}
    operands = [o for o in case.operands if isinstance(o, In)]
    rng = np.random.default_rng(11)
    directions = {o.name: rng.standard_normal(o.shape) for o in operands}
    eps = 1e-6

    def forward(sign: float) -> list[np.ndarray]:
        tensors = [torch.tensor(values[o.name] + sign * eps * directions[o.name],
                                dtype=torch.float64) for o in operands]
        return [t.numpy() for t in torch_outputs(case, tensors)]

    plus, minus = forward(1.0), forward(-1.0)
    out_names = [o.name for o in model.graph.output]
    jvp_side = sum(float(np.sum(cotangents[n] * (p - m) / (2 * eps)))
                   for n, p, m in zip(out_names, plus, minus, strict=True))
    vjp_side = sum(float(np.sum(ort_grads[o.name].astype(np.float64) * directions[o.name]))
                   for o in operands)
    scale = sum(float(np.abs(ort_grads[o.name]).sum() * np.abs(directions[o.name]).max())
                for o in operands)
    assert abs(vjp_side - jvp_side) <= 1e-5 * max(scale, 1e-12), (vjp_side, jvp_side)


def test_chunked_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The row-chunked im2col weight gradient equals the one-chunk one (and torch)."""
    monkeypatch.setattr(vjp_conv, "DW_CHUNK_BYTES", 1)
    monkeypatch.setattr(vjp_conv, "DW_MAX_CHUNKS", 1000)
    for case in CONV_CASES[:5]:
        test_rule_matches_torch(case)


def test_per_tap_weight_gradient(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-tap im2col formulation (dY not shifted) is also exact."""
    monkeypatch.setattr(vjp_conv, "DW_SHIFT_DY", False)
    monkeypatch.setattr(vjp_conv, "DW_TAPS_PER_GEMM", 2)
    for case in CONV_CASES:
        test_rule_matches_torch(case)


def test_dense_weight_gradient_layout_uses_fast_transposes() -> None:
    """An ungrouped Conv's weight gradient reaches W's layout through Transposes that ONNX
    Runtime runs fast (a leading-axes swap of whole rows, then a 2-D Transpose), never through
    one Transpose with the combined permutation (5-8x slower, benchmarks/weight_layout.py)."""
    for case in CONV_CASES:
        model, *_ = make_model(case)
        if any(a.name == "group" and a.i > 1 for a in model.graph.node[0].attribute):
            continue
        backward = build_backward(model, ["w"])
        after_gemm: set[str] = set()  # values computed from the Gemm products
        perms = []
        for n in backward.model.graph.node:  # in topological order
            if n.op_type == "Gemm" or after_gemm & set(n.input):
                after_gemm.update(n.output)
                perms += [tuple(a.ints) for a in n.attribute
                          if n.op_type == "Transpose" and a.name == "perm"]
        assert perms and set(perms) <= {(1, 0), (1, 0, 2)}, (case.id, perms)


def test_every_emitted_graph_uses_standard_ops() -> None:
    case = CONV_CASES[0]
    model, *_ = make_model(case)
    backward = build_backward(model, ["x", "w", "b"])
    assert {o.domain for o in backward.model.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in backward.model.graph.node)
