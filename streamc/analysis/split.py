"""Locality split: the spatially local prefix, the cut tensors that leave it, and the head."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamc.errors import UnsupportedModelError
from streamc.graph import Graph
from streamc.ops.locality import (
    LOCALITY,
    LocalityContext,
    LocalOp,
    NotLocal,
    Refuse,
    nonlocal_reason,
)


@dataclass
class Stop:
    """A node that consumes a prefix tensor but is not local, so the prefix ends before it."""

    node: str
    op: str
    tensor: str
    reason: str

    def sentence(self) -> str:
        return f"node {self.node!r} ({self.op}) reading {self.tensor!r}: {self.reason}"


@dataclass
class Split:
    """Result of the locality split.

    ``prefix``: local node names in topological order. ``local_ops``: how each acts on the grid.
    ``cut_tensors``: prefix tensors read by the head or returned as graph outputs, in order of
    production. ``head``: the image-dependent nodes after the cut. ``constant_nodes``: nodes that
    do not depend on the image (computed weights, for example); passes copy those they need.
    ``stops``: every non-local node that reads a prefix tensor.
    """

    input_name: str
    n_spatial: int
    prefix: list[str] = field(default_factory=list)
    local_ops: dict[str, LocalOp] = field(default_factory=dict)
    cut_tensors: list[str] = field(default_factory=list)
    head: list[str] = field(default_factory=list)
    constant_nodes: list[str] = field(default_factory=list)
    stops: list[Stop] = field(default_factory=list)
    prefix_tensors: list[str] = field(default_factory=list)


def image_dependent_tensors(graph: Graph, input_name: str) -> set[str]:
    """Every tensor whose value depends on the image input."""
    dependent = {input_name}
    for name in graph.order:
        node = graph.nodes[name]
        if any(i in dependent for i in node.input if i):
            dependent.update(o for o in node.output if o)
    return dependent


def split_graph(graph: Graph, input_name: str) -> Split:
    """Split ``graph`` at the first non-local op on every path from the image."""
    shape = graph.shape(input_name)
    if shape is None or len(shape) < 4:
        raise UnsupportedModelError(
            f"input {input_name!r} has shape {shape}; an image input needs N x C and at least "
            "two spatial axes."
        )
    n_spatial = len(shape) - 2
    dependent = image_dependent_tensors(graph, input_name)
    ctx = LocalityContext(graph, dependent, n_spatial)
    result = Split(input_name=input_name, n_spatial=n_spatial)
    in_prefix = {input_name}
    result.prefix_tensors.append(input_name)
    for name in graph.order:
        node = graph.nodes[name]
        grid = [i for i in node.input if i and i in dependent]
        if not grid:
            result.constant_nodes.append(name)
            continue
        if all(i in in_prefix for i in grid):
            rule = LOCALITY.get(node.op_type, graph.opset, node.domain)
            reason = None
            if rule is None:
                reason = nonlocal_reason(node)
            else:
                try:
                    op = rule(node, ctx)
                except Refuse as exc:
                    raise UnsupportedModelError(
                        f"node {name!r} ({node.op_type}) cannot be streamed: {exc}."
                    ) from None
                except NotLocal as exc:
                    reason = str(exc)
            if reason is None:
                result.prefix.append(name)
                result.local_ops[name] = op
                for out in node.output:
                    if out:
                        in_prefix.add(out)
                        result.prefix_tensors.append(out)
                continue
            result.stops.append(Stop(name, node.op_type, grid[0], reason))
        result.head.append(name)
    if not result.prefix:
        stop = result.stops[0] if result.stops else None
        detail = f": {stop.sentence()}" if stop else ""
        raise UnsupportedModelError(
            "the model has no spatially local prefix to stream: the first op reading the image "
            f"is not local{detail}. streamc needs convolutions, pooling or pointwise ops first."
        )
    head_inputs = {i for n in result.head for i in graph.nodes[n].input if i}
    outputs = set(graph.outputs)
    for tensor in result.prefix_tensors:
        if tensor in head_inputs or tensor in outputs:
            result.cut_tensors.append(tensor)
    return result
