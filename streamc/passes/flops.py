"""FLOP counts of ONNX graphs, one rule per op type.

Contract of a rule: ``rule(node, shapes) -> int``, the floating-point operations the node
performs given the static shapes of its inputs and outputs (a multiply-add counts as two). Ops
without a rule count one operation per output element: they are memory-bound and small next to
convolutions and matrix products, which the table covers exactly.

Backward graphs are counted from their forward graph (:func:`backward_flops`): the recomputed
forward, plus, for every node on a path from a differentiated tensor, one forward's worth of
FLOPs per input that receives a gradient (for a convolution: dX and dW each cost what the
forward costs). Counting the emitted backward graph itself would need shape inference over a
graph ten times larger, for the same figure up to the cheap elementwise ops.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx

from streamc.graph import attributes, opset_version
from streamc.ops.registry import OpTable

Shapes = Mapping[str, tuple[int | None, ...] | None]

FLOPS: OpTable = OpTable("FLOP count")


def _numel(shape) -> int:
    if not shape or any(d is None for d in shape):
        return 0
    return math.prod(shape)


@FLOPS.register("Conv")
def conv_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    out = shapes.get(node.output[0])
    w = shapes.get(node.input[1])
    if not out or not w:
        return 0
    # Each output element: (C_in / group) * prod(kernel) multiply-adds.
    return 2 * _numel(out) * _numel(w[1:])


@FLOPS.register("ConvTranspose")
def conv_transpose_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    x = shapes.get(node.input[0])
    w = shapes.get(node.input[1])
    if not x or not w:
        return 0
    # Weights are (C_in, C_out / group, *kernel): each input element scatters into
    # (C_out / group) * prod(kernel) outputs.
    return 2 * _numel(x) * _numel(w[1:])


@FLOPS.register("MatMul", "Gemm")
def matmul_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if not a or not out:
        return 0
    attrs = attributes(node)
    inner = a[-2] if node.op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
    return 2 * _numel(out) * (inner or 0)


@FLOPS.register("MaxPool", "AveragePool", "LpPool")
def pool_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    kernel = attributes(node).get("kernel_shape", [1])
    return _numel(shapes.get(node.output[0])) * math.prod(kernel)


def count_flops(model: onnx.ModelProto) -> int:
    """Total FLOPs of a graph with static shapes (inferred here if the model lacks them)."""
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    shapes = _shapes(model.graph)
    opset = opset_version(model)
    total = 0
    for node in model.graph.node:
        rule = FLOPS.get(node.op_type, opset, node.domain)
        if rule is not None:
            total += rule(node, shapes)
        else:
            total += sum(_numel(shapes.get(o)) for o in node.output if o)
    return total

def _shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...] | None]:
    shapes = {
        vi.name: tuple(d.dim_value if d.HasField("dim_value") else None
                       for d in vi.type.tensor_type.shape.dim)
        for vi in (*graph.input, *graph.value_info, *graph.output)
    }
    shapes.update({t.name: tuple(t.dims) for t in graph.initializer})
    return shapes


def backward_flops(model: onnx.ModelProto, wrt: set[str]) -> int:
    """FLOPs of the backward graph of ``model`` with respect to ``wrt`` (recompute included)."""
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    shapes = _shapes(model.graph)
    opset = opset_version(model)
    needs_grad = set(wrt)
    total = 0
    for node in model.graph.node:
        rule = FLOPS.get(node.op_type, opset, node.domain)
        cost = rule(node, shapes) if rule is not None else sum(
            _numel(shapes.get(o)) for o in node.output if o)
        total += cost  # the recomputed forward
        receiving = sum(1 for i in node.input if i in needs_grad)
        if receiving:
            total += cost * receiving
            needs_grad.update(o for o in node.output if o)
    return total
