"""FLOP counts of ONNX graphs, node by node from the FLOP table (:mod:`streamc.ops.flops`).

Backward graphs are counted from their forward graph (:func:`backward_flops`): the recomputed
forward, plus, for every node on a path from a differentiated tensor, one forward's worth of
FLOPs per input that receives a gradient (for a convolution: dX and dW each cost what the
forward costs). Counting the emitted backward graph itself would need shape inference over a
graph ten times larger, for the same figure up to the cheap elementwise ops.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx

from streamc.graph import dims, opset_version
from streamc.ops.flops import node_flops


def count_flops(model: onnx.ModelProto, only: Collection[str] | None = None) -> int:
    """Total FLOPs of a graph with static shapes (inferred here if the model lacks them);
    ``only``: of the nodes whose first output it names."""
    if not model.graph.value_info:
        model = onnx.shape_inference.infer_shapes(model)
    shapes = _shapes(model.graph)
    opset = opset_version(model)
    return sum(node_flops(node, shapes, opset) for node in model.graph.node
               if only is None or (node.output and node.output[0] in only))

def _shapes(graph: onnx.GraphProto) -> dict[str, tuple[int | None, ...] | None]:
    shapes = {vi.name: dims(vi) for vi in (*graph.input, *graph.value_info, *graph.output)}
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
        cost = node_flops(node, shapes, opset)
        total += cost  # the recomputed forward
        receiving = sum(1 for i in node.input if i in needs_grad)
        if receiving:
            total += cost * receiving
            needs_grad.update(o for o in node.output if o)
    return total
