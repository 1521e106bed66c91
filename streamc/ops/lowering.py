"""Lowering: normalisations over the whole image rewritten as whole-image reductions and local
arithmetic, so that the rest of streamc sees only reductions (:mod:`streamc.ops.reduction`) and
local ops.

- ``InstanceNormalization(x, scale, B)`` -> statistics ``E[x]``, ``E[x²]`` over the spatial axes
  and ``(x − μ)/σ`` in float64 (``E[x²] − E[x]²`` and the backward's whole-image gradient sums
  lose nothing to cancellation there), then ``·scale + B`` in float32;
- the GroupNorm torch exports before opset 18, ``Reshape(x, [N, G, -1])`` → InstanceNorm →
  ``Reshape(back)``, -> ``Reshape(x, [N, G, C/G, *spatial])`` (channels split, spatial axes
  kept), statistics over every axis but the first two, the same arithmetic, the reshape back;
- ``GroupNormalization`` (opset 18+), the same;
- ``LayerNormalization`` whose normalised axes include spatial ones, the same over those axes;
- linear ``Resize`` by integer factors with ``half_pixel`` coordinates (torch's
  ``interpolate(..., mode="bilinear"/"trilinear", align_corners=False)``), which clamps at the
  border: an ``edge`` Pad of one pixel, then a depthwise ``ConvTranspose`` (stride = factor)
  whose kernel is the interpolation's tent, cropped by its pads. Both are local ops, so the
  upsampling streams; the rewrite equals the Resize up to float32 rounding.

:func:`lower` rewrites a prepared model in place (shapes inferred, image size fixed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamc.ops.attrs import attribute


@dataclass
class _Emitter:
    """New nodes and initializers for one rewrite, with names scoped under the node."""

    prefix: str
    opset: int
    trainable: set[str] = field(default_factory=set)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[onnx.TensorProto] = field(default_factory=list)
    count: int = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{self.prefix}/{hint}_{self.count}"

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attrs) -> str:
        out = output or self.name(op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=self.name(op_type),
                                           **attrs))
        return out

    def const(self, value: np.ndarray, hint: str = "const") -> str:
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def reduce_mean(self, x: str, axes: Sequence[int]) -> str:
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const(np.array(axes, np.int64), "axes"),
                           keepdims=1)
        return self.op("ReduceMean", x, axes=list(axes), keepdims=1)


def _normalize(emit: _Emitter, x: str, axes: Sequence[int], epsilon: float,
               scale: str | None, bias: str | None, output: str | None) -> str:
    """``(x − E[x])/sqrt(Var[x] + ε)·scale + bias`` over ``axes``.

    The normalisation runs in float64 and only its result is cast back: the backward pass of
    ``x − E[x]`` and ``·1/σ`` sums the gradient over the whole image (Σg, Σg·x̂, nearly
    cancelling), which in float32 loses ~1e-3 of the gradient over a 256² map.

    The statistics and the normalisation cast ``x`` separately: the normalisation runs a stage
    after the statistics, and with its own Cast it reads ``x`` from the earlier stage (kept
    whole between the stages) rather than a float64 copy twice its size.
    """
    xd = emit.op("Cast", x, to=TensorProto.DOUBLE)
    mean = emit.reduce_mean(xd, axes)
    square = emit.reduce_mean(emit.op("Mul", xd, xd), axes)
    variance = emit.op("Sub", square, emit.op("Mul", mean, mean))
    eps = emit.const(np.array(epsilon, np.float64), "epsilon")
    inv = emit.op("Reciprocal", emit.op("Sqrt", emit.op("Add", variance, eps)))
    done = scale is None and bias is None
    centred = emit.op("Sub", emit.op("Cast", x, to=TensorProto.DOUBLE), mean)
    normalized = emit.op("Cast", emit.op("Mul", centred, inv),
                         to=TensorProto.FLOAT, output=output if done else None)
    if done:
        return normalized
    scaled = normalized if scale is None else emit.op(
        "Mul", normalized, scale, output=output if bias is None else None)
    return scaled if bias is None else emit.op("Add", scaled, bias, output=output)


def _per_channel(emit: _Emitter, value: str | None, rank: int, axis: int, model_inits,
                 identity: float) -> str | None:
    """A per-channel (or per-group) parameter reshaped to broadcast along ``axis`` of a rank
    ``rank`` tensor; None when it is a constant (not trainable) equal to ``identity``."""
    if not value:
        return None
    if value in model_inits and value not in emit.trainable:
        array = numpy_helper.to_array(model_inits[value])
        if np.all(array == identity):
            return None
    shape = [1] * rank
    shape[axis] = -1
    return emit.op("Reshape", value, emit.const(np.array(shape, np.int64), "shape"))


def _shape(shapes, tensor: str) -> tuple[int, ...] | None:
    shape = shapes.get(tensor)
    if shape is None or any(d is None for d in shape):
        return None
    return tuple(shape)


def lower(model: onnx.ModelProto, shapes: dict[str, tuple[int | None, ...] | None],
          trainable: set[str]) -> bool:
    """Rewrite ``model``'s whole-image normalisations in place (see the module docstring);
    ``shapes`` are its inferred shapes, ``trainable`` the initializers that must stay
    parameters. Returns whether anything changed."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    removed: set[int] = set()
    replacement: dict[int, list[onnx.NodeProto]] = {}
    new_inits: list[onnx.TensorProto] = []
    for index, node in enumerate(graph.node):
        if index in removed or node.domain not in ("", "ai.onnx"):
            continue
        emit = _Emitter(node.name or f"{node.op_type}_{index}", opset, set(trainable))
        done = _lower_node(node, emit, shapes, inits, producers, consumers, graph, removed)
        if done:
            replacement[index] = emit.nodes
            new_inits += emit.initializers
    if not replacement:
        return False
    nodes = []
    for index, node in enumerate(graph.node):
        if index in replacement:
            nodes += replacement[index]
        elif index not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    return True


def _lower_node(node, emit: _Emitter, shapes, inits, producers, consumers, graph,
                removed: set[int]) -> bool:
    if node.op_type == "InstanceNormalization":
        return _instance_norm(node, emit, shapes, inits, producers, consumers, graph, removed)
    if node.op_type == "GroupNormalization":
        return _group_norm(node, emit, shapes, inits)
    if node.op_type == "LayerNormalization":
        return _layer_norm(node, emit, shapes)
    if node.op_type == "Resize":
        return _linear_resize(node, emit, shapes)
    return False


def _instance_norm(node, emit, shapes, inits, producers, consumers, graph, removed) -> bool:
    x = node.input[0]
    shape = _shape(shapes, x)
    if shape is None or len(shape) < 3:
        return False
    epsilon = float(attribute(node, "epsilon", 1e-5))
    scale, bias = node.input[1], node.input[2]
    group = _group_pattern(node, shapes, producers, consumers)
    if group is not None:
        first, last, source, groups = group
        source_shape = _shape(shapes, source)
        grouped = [source_shape[0], groups, source_shape[1] // groups, *source_shape[2:]]
        rank = len(grouped)
        split = emit.op("Reshape", source, emit.const(np.array(grouped, np.int64), "shape"))
        y = _normalize(emit, split, list(range(2, rank)), epsilon,
                       _per_channel(emit, scale, rank, 1, inits, 1.0),
                       _per_channel(emit, bias, rank, 1, inits, 0.0), None)
        emit.op("Reshape", y, emit.const(np.array(source_shape, np.int64), "shape"),
                output=last.output[0])
        removed.update(_indices(graph, first, last))
        return True
    rank = len(shape)
    _normalize(emit, x, list(range(2, rank)), epsilon,
               _per_channel(emit, scale, rank, 1, inits, 1.0),
               _per_channel(emit, bias, rank, 1, inits, 0.0), node.output[0])
    return True


def _indices(graph, *nodes) -> set[int]:
    wanted = {id(n) for n in nodes}
    return {i for i, n in enumerate(graph.node) if id(n) in wanted}


def _group_pattern(node, shapes, producers, consumers):
    """(first Reshape, last Reshape, its input, groups) when ``node`` is the InstanceNorm of
    torch's GroupNorm export: Reshape(x, [N, G, -1]) -> node -> Reshape(to x's shape)."""
    first = producers.get(node.input[0])
    users = consumers.get(node.output[0], [])
    if first is None or first.op_type != "Reshape" or len(users) != 1:
        return None
    last = users[0]
    if last.op_type != "Reshape" or len(consumers.get(first.output[0], [])) != 1:
        return None
    source = first.input[0]
    source_shape, merged = _shape(shapes, source), _shape(shapes, first.output[0])
    if source_shape is None or merged is None or len(merged) != 3 or len(source_shape) < 3:
        return None
    if _shape(shapes, last.output[0]) != source_shape or merged[0] != source_shape[0]:
        return None
    groups = merged[1]
    if source_shape[1] % groups or merged[2] != math.prod(source_shape[1:]) // groups:
        return None
    return first, last, source, groups


def _group_norm(node, emit, shapes, inits) -> bool:
    x = node.input[0]
    shape = _shape(shapes, x)
    groups = attribute(node, "num_groups")
    if shape is None or len(shape) < 3 or not groups or shape[1] % groups:
        return False
    grouped = [shape[0], groups, shape[1] // groups, *shape[2:]]
    rank = len(grouped)
    split = emit.op("Reshape", x, emit.const(np.array(grouped, np.int64), "shape"))
    y = _normalize(emit, split, list(range(2, rank)), float(attribute(node, "epsilon", 1e-5)),
                   None, None, None)
    y = emit.op("Reshape", y, emit.const(np.array(shape, np.int64), "shape"))
    channel = [1, shape[1]] + [1] * (len(shape) - 2)
    scale = emit.op("Reshape", node.input[1], emit.const(np.array(channel, np.int64), "shape"))
    bias = emit.op("Reshape", node.input[2], emit.const(np.array(channel, np.int64), "shape"))
    emit.op("Add", emit.op("Mul", y, scale), bias, output=node.output[0])
    return True


def _layer_norm(node, emit, shapes) -> bool:
    """A LayerNormalization over two or more trailing axes (which include spatial ones): its
    statistics are whole-image reductions. Over the last axis only (channels-last) it stays a
    local op."""
    x = node.input[0]
    shape = _shape(shapes, x)
    if shape is None or len(shape) < 4:
        return False
    rank = len(shape)
    axis = int(attribute(node, "axis", -1)) % rank
    if axis > rank - 2 or any(o for o in node.output[1:]):
        return False  # over the last axis only: channels (a local op)
    axes = list(range(axis, rank))
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    _normalize(emit, x, axes, float(attribute(node, "epsilon", 1e-5)), node.input[1], bias,
               node.output[0])
    return True


#: Resize coordinate modes that map output ``o`` to input ``(o + 0.5)/f − 0.5`` for an integer
#: upsampling factor ``f`` (``pytorch_half_pixel`` differs only for an output of size 1).
_HALF_PIXEL = ("half_pixel", "pytorch_half_pixel")


def _linear_resize(node, emit: _Emitter, shapes) -> bool:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    mode = attrs.get("mode", b"nearest")
    transform = attrs.get("coordinate_transformation_mode", b"half_pixel")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    transform = transform.decode() if isinstance(transform, bytes) else transform
    if mode != "linear" or transform not in _HALF_PIXEL or attrs.get("antialias", 0):
        return False
    if attrs.get("axes") or attrs.get("keep_aspect_ratio_policy", b"stretch") not in (
            b"stretch", "stretch"):
        return False
    x = node.input[0]
    in_shape, out_shape = _shape(shapes, x), _shape(shapes, node.output[0])
    if in_shape is None or out_shape is None or len(in_shape) < 3:
        return False
    if in_shape[:2] != out_shape[:2]:
        return False
    factors = [o // i if i and o % i == 0 else 0 for o, i in zip(out_shape[2:], in_shape[2:])]
    if not all(factors):
        return False
    if transform == "pytorch_half_pixel" and any(o == 1 for o in out_shape[2:]):
        return False
    rank, channels = len(in_shape), in_shape[1]
    padded = emit.op("Pad", x, emit.const(np.array([0, 0] + [1] * (rank - 2) + [0, 0]
                                                   + [1] * (rank - 2), np.int64), "pads"),
                     mode="edge")
    kernel = np.ones((1,), np.float64)
    begins, ends = [], []
    for f in factors:
        offset = int(math.floor(1.5 * f + 0.5))
        t = np.arange(2 * f, dtype=np.float64)
        tent = np.maximum(0.0, 1.0 - np.abs((t - offset + 0.5 + f / 2) / f))
        kernel = np.multiply.outer(kernel, tent)
        begins.append(offset)
        ends.append(3 * f - offset)
    weight = np.broadcast_to(kernel.reshape(1, 1, *kernel.shape[1:]).astype(np.float32),
                             (channels, 1, *kernel.shape[1:])).copy()
    emit.op("ConvTranspose", padded, emit.const(weight, "tent"), output=node.output[0],
            group=channels, strides=factors, kernel_shape=[2 * f for f in factors],
            pads=begins + ends)
    return True
