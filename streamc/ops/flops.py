"""The FLOP table: floating-point operations of one node, keyed by op type.

Contract of a rule: ``rule(node, shapes) -> int``, the operations the node performs given the
static shapes of its inputs and outputs (a multiply-add counts as two). Ops without a rule count
one operation per output element (:func:`node_flops`): they are memory-bound and small next to
convolutions and matrix products, which the table covers exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx

from streamc.ops.attrs import attributes
from streamc.ops.registry import OpTable

Shapes = Mapping[str, tuple[int | None, ...] | None]

FLOPS: OpTable = OpTable("FLOP count")


def numel(shape) -> int:
    """Elements of a static shape (0 when unknown)."""
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
    return 2 * numel(out) * numel(w[1:])


@FLOPS.register("ConvTranspose")
def conv_transpose_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    x = shapes.get(node.input[0])
    w = shapes.get(node.input[1])
    if not x or not w:
        return 0
    # Weights are (C_in, C_out / group, *kernel): each input element scatters into
    # (C_out / group) * prod(kernel) outputs.
    return 2 * numel(x) * numel(w[1:])


def _product_flops(node: onnx.NodeProto, shapes: Shapes, inner_axis: int) -> int:
    a = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if not a or not out:
        return 0
    return 2 * numel(out) * (a[inner_axis] or 0)


@FLOPS.register("MatMul")
def matmul_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    return _product_flops(node, shapes, -1)


@FLOPS.register("Gemm")
def gemm_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    return _product_flops(node, shapes, -2 if attributes(node).get("transA", 0) else -1)


@FLOPS.register("MaxPool", "AveragePool", "LpPool")
def pool_flops(node: onnx.NodeProto, shapes: Shapes) -> int:
    kernel = attributes(node).get("kernel_shape", [1])
    return numel(shapes.get(node.output[0])) * math.prod(kernel)


def node_flops(node: onnx.NodeProto, shapes: Shapes, opset: int | None = None) -> int:
    """FLOPs of ``node`` by its rule, or one per output element."""
    rule = FLOPS.get(node.op_type, opset, node.domain)
    if rule is not None:
        return rule(node, shapes)
    return sum(numel(shapes.get(o)) for o in node.output if o)
