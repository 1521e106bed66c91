"""The locality table: which ops are spatially local, and how each one maps regions.

Contract of a rule: ``rule(node, ctx) -> LocalOp``. It reads the node's attributes and the
shapes/constants in ``ctx`` and returns how the node acts on the spatial grid, or raises
:class:`NotLocal` with a sentence saying why this node is not local (training-mode
normalisation, a spatial Concat, a non-integer Resize...). Ops without a rule are not local.

Rules are N-dimensional: one :data:`~streamc.ops.geometry.AxisMap` per spatial axis (2-D
images and 3-D volumes alike).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Protocol

import numpy as np
import onnx

from streamc.errors import UnsupportedModelError
from streamc.ops import tiling
from streamc.ops.attrs import attributes
from streamc.ops.geometry import (
    IDENTITY,
    AxisMap,
    Transposed,
    Upsample,
    Window,
    is_block_upsampling,
    node_windows,
    resize_matrix,
)
from streamc.ops.registry import OpTable
from streamc.ops.tiling import TileRule


class NotLocal(Exception):
    """Raised by a locality rule: the node is not spatially local, and why (one sentence)."""


class Refuse(NotLocal):
    """Raised by a locality rule for a node that must not silently end the prefix either: the
    model was exported wrongly (training-mode BatchNorm or Dropout) and the user must fix it."""


@dataclass(frozen=True)
class LocalOp:
    """How one node acts on the spatial grid.

    ``axes``: one map per spatial axis. ``grid_inputs``: input slots that carry the image grid
    (the others must be constants, or per-sample tensors that do not vary over space).
    ``tiling``: how the node runs on a tile (:mod:`streamc.ops.tiling`). ``attrs``: what the
    tiling rule needs of the node beyond ``axes`` (a Pad's full pads, a Reshape's shape).
    ``layout``: the positions of the spatial axes in the node's outputs, when they differ from
    its first grid input's (Transpose, Reshape, reductions over channels).
    """

    axes: tuple[AxisMap, ...]
    grid_inputs: tuple[int, ...] = (0,)
    tiling: TileRule = tiling.POINTWISE
    attrs: dict = field(default_factory=dict, compare=False)
    layout: tuple[int, ...] | None = None


class GraphView(Protocol):
    """What locality rules read of a graph (:class:`streamc.graph.Graph` provides it)."""

    opset: int
    constants: Mapping[str, np.ndarray]
    consumers: Mapping[str, list[str]]

    def shape(self, tensor: str) -> tuple[int | None, ...] | None: ...


@dataclass
class LocalityContext:
    """What a rule may look at: the graph, the image-dependent tensors, the spatial rank, where
    the spatial axes of each grid tensor are (``layouts``; channels-first when absent), and
    which image-dependent tensors are per-sample values without spatial extent (``globals``:
    results of whole-image reductions, which broadcast over space like constants)."""

    graph: GraphView
    image_dependent: set[str]
    n_spatial: int
    layouts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    globals: set[str] = field(default_factory=set)

    def layout(self, tensor: str) -> tuple[int, ...]:
        """Positions of the spatial axes of grid tensor ``tensor``."""
        return self.layouts.get(tensor, tuple(range(2, 2 + self.n_spatial)))

    def spatial_shape(self, tensor: str) -> tuple[int | None, ...] | None:
        shape = self.graph.shape(tensor)
        layout = self.layout(tensor)
        if shape is None or len(shape) <= max(layout):
            return None
        return tuple(shape[p] for p in layout)

    def constant(self, tensor: str) -> np.ndarray | None:
        return self.graph.constants.get(tensor)

    def is_grid(self, tensor: str) -> bool:
        return tensor in self.image_dependent and tensor not in self.globals


LOCALITY: OpTable = OpTable("locality")

_NONLOCAL_HINTS = {
    "InstanceNormalization": "it normalises over the whole spatial extent; replace it by a "
    "frozen per-channel affine map (BatchNorm in eval mode) or keep it in the head",
    "GroupNormalization": "it normalises over the whole spatial extent; freeze it into a "
    "per-channel affine map or keep it in the head",
    "LayerNormalization": "over spatial axes it reads the whole image; keep it in the head",
    "LpNormalization": "it reads the whole axis it normalises",
    "GlobalAveragePool": "it reads the whole image (it usually starts the head)",
    "GlobalMaxPool": "it reads the whole image (it usually starts the head)",
    "GlobalLpPool": "it reads the whole image (it usually starts the head)",
}


def nonlocal_reason(node: onnx.NodeProto) -> str:
    """Why an op that has no locality rule is not local (for messages)."""
    hint = _NONLOCAL_HINTS.get(node.op_type)
    if hint:
        return f"{node.op_type} is not spatially local: {hint}"
    return (
        f"{node.op_type} is not in streamc's table of spatially local ops "
        "(it may mix positions across the image)"
    )


def _windows(node, ctx: LocalityContext, kernel: Sequence[int]):
    """The node's windows (see :func:`~streamc.ops.geometry.node_windows`), as NotLocal
    sentences when its attributes are malformed."""
    sizes = ctx.spatial_shape(node.input[0])
    try:
        return node_windows(node, kernel, sizes)
    except ValueError as exc:
        if "needs the input size" in str(exc):
            raise UnsupportedModelError(
                f"node {node.name!r} ({node.op_type}) uses auto_pad SAME with stride > 1, "
                "whose padding depends on the image size: pass --image."
            ) from None
        raise NotLocal(str(exc)) from None


def _spatial_attr(values: Sequence[int] | None, n: int, default: int, what: str) -> list[int]:
    if values is None or len(values) == 0:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise NotLocal(f"its {what} has {len(values)} entries for {n} spatial axes")
    return values


def _kernel_from_weight(node, ctx: LocalityContext, first_spatial_dim: int = 2) -> list[int]:
    w_shape = ctx.graph.shape(node.input[1])
    if w_shape is None or any(d is None for d in w_shape[first_spatial_dim:]):
        raise NotLocal("its weight shape is unknown")
    return list(w_shape[first_spatial_dim:])


def _check_grid_slots(node, ctx: LocalityContext, grid: Sequence[int]) -> None:
    for slot, name in enumerate(node.input):
        if name and slot not in grid and name in ctx.image_dependent:
            raise NotLocal(
                f"its input {slot} ({name!r}) depends on the image, so the op's parameters "
                "vary with the image content"
            )


def channels_first(node, ctx: LocalityContext) -> None:
    """Refuse a node whose first input is not in channels-first (N, C, spatial...) layout:
    its op's attributes address spatial axes by position."""
    if ctx.layout(node.input[0]) != tuple(range(2, 2 + ctx.n_spatial)):
        raise NotLocal(f"its input {node.input[0]!r} is not channels-first (N, C, spatial...)")


@LOCALITY.register("Conv")
def conv(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    kernel = _spatial_attr(attrs.get("kernel_shape") or _kernel_from_weight(node, ctx),
                           ctx.n_spatial, 1, "kernel_shape")
    axes = _windows(node, ctx, kernel)
    _check_grid_slots(node, ctx, (0,))
    return LocalOp(axes, (0,), tiling.WINDOW)


@LOCALITY.register("ConvTranspose")
def conv_transpose(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    n = ctx.n_spatial
    kernel = list(attrs.get("kernel_shape") or _kernel_from_weight(node, ctx))
    strides = _spatial_attr(attrs.get("strides"), n, 1, "strides")
    dilations = _spatial_attr(attrs.get("dilations"), n, 1, "dilations")
    out_pad = _spatial_attr(attrs.get("output_padding"), n, 0, "output_padding")
    if attrs.get("output_shape"):
        raise NotLocal("output_shape is not supported; export with explicit pads")
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "", "VALID"):
        raise NotLocal("auto_pad SAME is not supported for ConvTranspose; use explicit pads")
    pads = attrs.get("pads") or [0] * (2 * n)
    _check_grid_slots(node, ctx, (0,))
    axes = tuple(
        Transposed(kernel[i], strides[i], dilations[i], pads[i], pads[i + n], out_pad[i])
        for i in range(n)
    )
    return LocalOp(axes, (0,), tiling.TRANSPOSED)


def _pool(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    kernel = _spatial_attr(attrs.get("kernel_shape"), ctx.n_spatial, 1, "kernel_shape")
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    if len(node.output) > 1 and node.output[1] and node.output[1] in ctx.graph.consumers:
        raise NotLocal("its Indices output is used, and indices are positions in the whole image")
    axes = _windows(node, ctx, kernel)
    sizes = ctx.spatial_shape(node.input[0])
    if sizes is not None and None not in sizes and all(
        axis.span >= size and axis.out_size(size) == 1 for axis, size in zip(axes, sizes)
    ):
        raise NotLocal(
            "its window covers the whole feature map: it is a global pooling (an exported "
            "AdaptiveMaxPool/AdaptiveAvgPool to size 1), which starts the head"
        )
    if ceil_mode and node.op_type == "AveragePool" and attrs.get("count_include_pad", 0):
        sizes = ctx.spatial_shape(node.input[0])
        for axis, size in zip(axes, sizes or ()):
            if size is not None and axis.out_size(size) != replace(
                    axis, ceil_mode=False).out_size(size):
                raise NotLocal(
                    "AveragePool with ceil_mode=1 and count_include_pad=1 has a last window "
                    "that overhangs the padding, whose divisor streamc cannot reproduce per tile"
                )
    return LocalOp(axes, (0,), tiling.WINDOW)


LOCALITY.add("MaxPool", _pool)
LOCALITY.add("AveragePool", _pool)
LOCALITY.add("LpPool", _pool)


def _pointwise_axes(ctx: LocalityContext) -> tuple[AxisMap, ...]:
    return (IDENTITY,) * ctx.n_spatial


@LOCALITY.register(
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu",
    "Softplus", "Gelu", "Erf", "Identity", "Cast", "Sqrt", "Reciprocal", "Neg", "Exp", "Log",
    "Abs",
)
def unary(node, ctx: LocalityContext) -> LocalOp:
    return LocalOp(_pointwise_axes(ctx), (0,))


@LOCALITY.register("Dropout")
def dropout(node, ctx: LocalityContext) -> LocalOp:
    attrs = attributes(node)
    if len(node.input) > 2 and node.input[2]:
        training = ctx.constant(node.input[2])
        if training is None or bool(np.asarray(training).item()):
            raise Refuse("Dropout runs in training mode; export the model in eval mode "
                         "(model.eval())")
    if attrs.get("is_test", 1) == 0 and ctx.graph.opset < 7:
        raise Refuse("Dropout runs in training mode; export the model in eval mode "
                     "(model.eval())")
    if len(node.output) > 1 and node.output[1] in ctx.graph.consumers:
        raise NotLocal("its mask output is used")
    return LocalOp(_pointwise_axes(ctx), (0,))


@LOCALITY.register("BatchNormalization")
def batch_norm(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    if attrs.get("training_mode", 0) or sum(1 for o in node.output if o) > 1:
        raise Refuse(
            "BatchNormalization runs in training mode (batch statistics over the whole image); "
            "export the model in eval mode (model.eval()) so it uses running statistics"
        )
    _check_grid_slots(node, ctx, (0,))
    return LocalOp(_pointwise_axes(ctx), (0,))


def _check_broadcast_constant(node, ctx: LocalityContext, slot: int,
                              out_rank: int | None = None,
                              layout: tuple[int, ...] | None = None) -> None:
    """Input ``slot`` (a constant or a per-sample tensor) must not vary over space where it
    broadcasts onto a grid tensor of rank ``out_rank`` with spatial axes at ``layout``."""
    name = node.input[slot]
    shape = ctx.graph.shape(name)
    if shape is None:
        raise NotLocal(f"the shape of its input {name!r} is unknown")
    layout = layout or tuple(range(2, 2 + ctx.n_spatial))
    out_rank = out_rank or ctx.n_spatial + 2
    if len(shape) > out_rank:
        raise NotLocal(f"its input {name!r} has more axes than the image")
    lead = out_rank - len(shape)  # right-aligned broadcasting
    spatial = [shape[p - lead] for p in layout if p >= lead]
    if any(d != 1 for d in spatial):
        raise NotLocal(
            f"its input {name!r} (shape {list(shape)}) varies over space; only per-channel, "
            "per-sample or scalar operands keep the op local"
        )


def _elementwise(node, ctx: LocalityContext, constant_slots_ok: bool = True) -> LocalOp:
    grid = [slot for slot, name in enumerate(node.input) if name and ctx.is_grid(name)]
    if not grid:
        raise NotLocal("it has no input on the image grid")
    first = node.input[grid[0]]
    layout, shape = ctx.layout(first), ctx.graph.shape(first)
    if shape is None:
        raise NotLocal(f"the shape of its input {first!r} is unknown")
    sizes = ctx.spatial_shape(first)
    for slot, name in enumerate(node.input):
        if not name or slot == grid[0]:
            continue
        if slot in grid:
            other = ctx.graph.shape(name)
            if ctx.layout(name) != layout or other is None or len(other) != len(shape):
                raise NotLocal(f"its grid inputs {first!r} and {name!r} have different layouts")
            if ctx.spatial_shape(name) != sizes:
                raise NotLocal(
                    f"its input {name!r} (spatial size {list(ctx.spatial_shape(name))}) is "
                    f"broadcast over space to {list(sizes)}")
        elif constant_slots_ok or name in ctx.globals:
            _check_broadcast_constant(node, ctx, slot, len(shape), layout)
        else:
            raise NotLocal(f"its input {name!r} is a constant where a grid tensor is needed")
    return LocalOp(_pointwise_axes(ctx), tuple(grid))


@LOCALITY.register("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min")
def binary(node, ctx: LocalityContext) -> LocalOp:
    return _elementwise(node, ctx)


@LOCALITY.register("PRelu")
def prelu(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    _check_grid_slots(node, ctx, (0,))
    _check_broadcast_constant(node, ctx, 1)
    return LocalOp(_pointwise_axes(ctx), (0,))


@LOCALITY.register("Where", "Greater", "Less", "Equal", "GreaterOrEqual", "LessOrEqual", "And",
                   "Or", "Not")
def elementwise_other(node, ctx: LocalityContext) -> LocalOp:
    return _elementwise(node, ctx)


@LOCALITY.register("Clip")
def clip(node, ctx: LocalityContext) -> LocalOp:
    _check_grid_slots(node, ctx, (0,))
    return LocalOp(_pointwise_axes(ctx), (0,))


def _channel_axis(node, ctx: LocalityContext, default: int | None = None) -> None:
    """The node's ``axis`` attribute must name a channel axis (neither batch nor spatial)."""
    axis = attributes(node).get("axis", default)
    if axis is None:
        raise NotLocal("it has no axis")
    rank = len(ctx.graph.shape(node.input[0]) or ()) or ctx.n_spatial + 2
    if axis < 0:
        axis += rank
    if axis == 0 or axis in ctx.layout(node.input[0]):
        raise NotLocal(f"it works along axis {axis}; only a channel axis keeps it local")


@LOCALITY.register("Concat")
def concat(node, ctx: LocalityContext) -> LocalOp:
    _channel_axis(node, ctx)
    return _elementwise(node, ctx, constant_slots_ok=False)


@LOCALITY.register("Split")
def split(node, ctx: LocalityContext) -> LocalOp:
    _channel_axis(node, ctx, default=0)
    _check_grid_slots(node, ctx, (0,))
    return LocalOp(_pointwise_axes(ctx), (0,))


def reduce_axes(node, ctx: LocalityContext) -> list[int] | None:
    """The axes a Reduce* node names (its ``axes`` attribute, or its constant ``axes`` input
    from opset 18); None when it names none."""
    axes = attributes(node).get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = ctx.constant(node.input[1])
        if value is None:
            raise NotLocal("its axes are not constant")
        axes = [int(a) for a in value.ravel()]
    return None if axes is None else [int(a) for a in axes]


#: Pad modes a tile reproduces: at the image border its crop starts (ends) where the image
#: does, so repeating or mirroring the crop's border repeats or mirrors the image's.
PAD_MODES = ("constant", "edge", "reflect")


@LOCALITY.register("Pad")
def pad(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    mode = attrs.get("mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in PAD_MODES:
        raise NotLocal(f"Pad mode {mode!r} wraps the image around; use 'constant', 'edge' or "
                       "'reflect'")
    rank = ctx.n_spatial + 2
    if ctx.graph.opset < 11:
        pads = list(attrs.get("pads", []))
    else:
        pads_value = ctx.constant(node.input[1]) if len(node.input) > 1 else None
        if pads_value is None:
            raise NotLocal("its pads are not constant (fix the image size with --image)")
        pads = [int(v) for v in np.asarray(pads_value).ravel()]
        if len(node.input) > 3 and node.input[3]:
            axes_value = ctx.constant(node.input[3])
            if axes_value is None:
                raise NotLocal("its axes are not constant")
            axes = [int(a) + rank if int(a) < 0 else int(a) for a in np.asarray(axes_value)]
            full = [0] * (2 * rank)
            for i, a in enumerate(axes):
                full[a] = pads[i]
                full[a + rank] = pads[i + len(axes)]
            pads = full
    if len(pads) != 2 * rank:
        raise NotLocal(f"its pads have {len(pads)} entries for a rank-{rank} tensor")
    if pads[0] or pads[rank]:
        raise NotLocal("it pads the batch axis")
    if mode != "constant" and min(pads) < 0:
        raise NotLocal(f"it crops (negative pads) in mode {mode!r}")
    for slot in (1, 2, 3):
        if len(node.input) > slot and node.input[slot] in ctx.image_dependent:
            raise NotLocal("its pads or value depend on the image")
    axes = tuple(Window(1, 1, 1, pads[2 + i], pads[2 + i + rank]) for i in range(ctx.n_spatial))
    return LocalOp(axes, (0,), tiling.PAD, attrs={"pads": pads})


def _upsample_axes(node, ctx: LocalityContext, factors: Sequence[float], mode: str,
                   nearest: str) -> tuple[AxisMap, ...]:
    rank = ctx.n_spatial + 2
    if len(factors) != rank:
        raise NotLocal(f"it has {len(factors)} scales for a rank-{rank} tensor")
    if factors[0] != 1 or factors[1] != 1:
        raise NotLocal("it resizes the batch or channel axis")
    axes: list[AxisMap] = []
    for f in factors[2:]:
        if f < 1 or abs(f - round(f)) > 1e-6:
            raise NotLocal(f"its scale {f} is not an integer upsampling factor")
        f = int(round(f))
        # The map must be j -> floor(j / f) everywhere (checked on a few periods).
        n_in = 7
        try:
            matrix = resize_matrix("nearest", mode, nearest, n_in, n_in * f, float(f))
        except ValueError as exc:
            raise NotLocal(str(exc)) from None
        if not is_block_upsampling(matrix, f):
            raise NotLocal(
                f"coordinate_transformation_mode={mode!r} with nearest_mode={nearest!r} does not "
                "map output j to input floor(j/f)"
            )
        axes.append(IDENTITY if f == 1 else Upsample(f))
    return tuple(axes)


@LOCALITY.register("Resize")
def resize(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    mode = attrs.get("mode", "nearest")
    if mode == "linear":
        # Preparation lowers the streamable form (see streamc.ops.lowering): this one is not.
        raise NotLocal(
            "linear Resize streams only as an integer upsampling with half_pixel coordinates "
            "(torch's align_corners=False) at a fixed image size (give --image); "
            f"this one has coordinate_transformation_mode "
            f"{attrs.get('coordinate_transformation_mode', 'half_pixel')!r}"
        )
    if mode != "nearest":
        raise NotLocal(
            f"Resize mode {mode!r} is not supported; nearest and linear upsampling by an "
            "integer factor are (cubic interpolation reads two neighbours on each side)"
        )
    if attrs.get("antialias", 0) or attrs.get("axes") or attrs.get("keep_aspect_ratio_policy",
                                                                      "stretch") != "stretch":
        raise NotLocal("antialias, axes and keep_aspect_ratio_policy are not supported")
    in_shape = ctx.graph.shape(node.input[0])
    out_shape = ctx.graph.shape(node.output[0])
    factors = None
    if ctx.graph.opset < 11:
        scales = ctx.constant(node.input[1]) if len(node.input) > 1 else None
        factors = None if scales is None else [float(v) for v in scales]
    else:
        scales = ctx.constant(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scales is not None and scales.size:
            factors = [float(v) for v in scales]
        elif (
            len(node.input) > 3 and node.input[3] and in_shape and out_shape
            and None not in in_shape and None not in out_shape
        ):
            factors = [o / i for o, i in zip(out_shape, in_shape)]
    if factors is None:
        raise NotLocal("its scales are not constant (fix the image size with --image)")
    for slot in range(1, len(node.input)):
        if node.input[slot] in ctx.image_dependent:
            raise NotLocal("its scales depend on the image")
    axes = _upsample_axes(
        node, ctx, factors, attrs.get("coordinate_transformation_mode", "half_pixel"),
        attrs.get("nearest_mode", "round_prefer_floor"),
    )
    return LocalOp(axes, (0,), tiling.RESIZE)


@LOCALITY.register("Upsample")
def upsample(node, ctx: LocalityContext) -> LocalOp:
    channels_first(node, ctx)
    attrs = attributes(node)
    if attrs.get("mode", "nearest") != "nearest":
        raise NotLocal("only nearest Upsample by an integer factor is supported")
    if "scales" in attrs:
        factors = list(attrs["scales"])
    else:
        scales = ctx.constant(node.input[1]) if len(node.input) > 1 else None
        if scales is None:
            raise NotLocal("its scales are not constant")
        factors = [float(v) for v in scales]
    axes = _upsample_axes(node, ctx, factors, "asymmetric", "floor")
    return LocalOp(axes, (0,), tiling.RESIZE)


def cumulative_scale(op: LocalOp) -> tuple[Fraction, ...]:
    """Input steps per output step, per axis, of one op."""
    return tuple(axis.scale for axis in op.axes)


# The rules of ops that move, split or merge axes register into the same table.
from streamc.ops import layout as _layout  # noqa: E402, F401
