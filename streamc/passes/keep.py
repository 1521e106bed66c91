"""Keep a tile's activations from its forward run instead of recomputing them in its backward.

A tile backward graph (:mod:`streamc.passes.autodiff`) recomputes the forward nodes its rules
read, from the tile's crops. That recompute is free to skip for the tile whose backward runs
right after its forward: the last tile of the last stage in grid order (the first tile of the
backward pass under halo reuse), and every stage's tile when the grid is one tile (then the
step has no recompute at all: conventional training). Which units keep is
:func:`kept_units`'s choice.

Contract: :func:`split_recompute` takes a tile graph and its backward graph and returns
:class:`KeptGraphs`: the tile graph with extra outputs, the *residuals* (the recomputed values
the backward rules read), and the backward graph without the recompute, reading the residuals
as inputs. Fed the same inputs and the residuals of the same forward run, the pair gives what
the tile graph and its backward graph give. Both keep the original names, so every spec of the
class (cotangents, gradients) holds for them too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper, shape_inference

from streamc.ops.attrs import captured_names
from streamc.passes.autodiff import BackwardGraph, live_nodes


@dataclass
class KeptGraphs:
    """A tile class's graphs for a unit that keeps its activations (see the module docstring)."""

    forward: onnx.ModelProto
    backward: BackwardGraph
    residuals: list[str]
    #: first outputs of the recomputed nodes moved into the forward graph, when only some
    #: were (``split_recompute``'s ``keep``); None: every one
    moved: frozenset[str] | None = None


@dataclass
class Kept:
    """The result of the keep pass: the (stage, tile) units that keep their activations and the
    graphs of their classes (class id -> graphs)."""

    units: list[tuple[int, int]] = field(default_factory=list)
    graphs: dict[int, KeptGraphs] = field(default_factory=dict)


def kept_units(class_of: Sequence[Sequence[int | None]], grid_order: bool,
               count: int | None = None) -> list[tuple[int, int]]:
    """The (stage, tile) units that keep their activations. ``class_of[tile][stage]``: the
    tile's class in the stage (None: no part); ``grid_order``: the backward pass runs the tiles
    in reverse grid order (halo reuse).

    By default (``count=None``) the units whose backward follows their forward with nothing but
    later units' work in between, which keeping costs no more memory than recomputing: the last
    tile of the last stage when tiles run in grid order, and when every stage has one tile, each
    of them. ``count=N`` instead keeps the N tiles of the last stage whose backward runs first
    (the last N in grid order, the first N otherwise): each holds its residuals from its forward
    to its backward, memory traded for its recompute."""
    stages = max((len(row) for row in class_of), default=0)
    per_stage = [[i for i, row in enumerate(class_of) if k < len(row) and row[k] is not None]
                 for k in range(stages)]
    if count is not None:
        if count < 0:
            raise ValueError(f"count={count}: a number of tiles, 0 or more")
        last = per_stage[-1] if per_stage else []
        chosen = last[max(len(last) - count, 0):] if grid_order else last[:count]
        return [(stages - 1, i) for i in chosen]
    if per_stage and all(len(tiles) == 1 for tiles in per_stage):
        return [(k, tiles[0]) for k, tiles in enumerate(per_stage)]
    if grid_order and per_stage and per_stage[-1]:
        return [(stages - 1, per_stage[-1][-1])]
    return []


def split_recompute(forward: onnx.ModelProto, backward: BackwardGraph,
                    keep: Callable[[onnx.NodeProto], bool] | None = None) -> KeptGraphs:
    """Split ``backward``'s recompute off into ``forward`` (see the module docstring).

    ``keep``: only the recomputed nodes it accepts move to the forward graph; the backward
    graph recomputes the others, reading what it needs of the moved ones' values as residuals
    (a *partial* keep: the deep, small activations kept, the large shallow ones recomputed).

    A backward node is recomputed forward work when the tile graph has a node of the same op
    giving its first output from the same inputs, and every input is the tile graph's (an
    input, an initializer, or another such node's output). Constants are not kept: they cost
    nothing to make again."""
    fgraph, bgraph = forward.graph, backward.model.graph
    twins = {n.output[0]: n for n in fgraph.node if n.output}
    available = {i.name for i in fgraph.input} | {t.name for t in fgraph.initializer} | {""}
    recomputed: list[onnx.NodeProto] = []
    for node in bgraph.node:
        twin = twins.get(node.output[0]) if node.output else None
        if twin is None or twin.op_type != node.op_type or list(twin.input) != list(node.input):
            continue
        if node.op_type == "Constant" or captured_names(node):
            available.update(node.output)
            continue
        if all(i in available for i in node.input):
            available.update(node.output)
            if keep is None or keep(node):
                recomputed.append(node)
    if not recomputed:
        return KeptGraphs(forward, backward, [])
    done = {id(n) for n in recomputed}
    rest, _ = live_nodes([n for n in bgraph.node if id(n) not in done],
                         [o.name for o in bgraph.output])
    read_later = {i for n in rest for i in (*n.input, *captured_names(n))}
    read_later |= {o.name for o in bgraph.output}
    residuals = [o for n in recomputed for o in n.output if o and o in read_later]
    kept_forward, types = _forward_with(forward, recomputed, residuals)
    moved = None if keep is None else frozenset(n.output[0] for n in recomputed)
    return KeptGraphs(kept_forward, _backward_from(backward, rest, residuals, types), residuals,
                      moved)


def _forward_with(forward: onnx.ModelProto, recomputed: list[onnx.NodeProto],
                  residuals: list[str]) -> tuple[onnx.ModelProto, dict[str, onnx.TypeProto]]:
    """The tile graph giving ``residuals`` too, and the types of its values; a node that the
    backward graph rewrote to give more (MaxPool's indices) is taken in its rewritten form."""
    richer = {n.output[0]: n for n in recomputed}
    model = onnx.ModelProto()
    model.CopyFrom(forward)
    graph = model.graph
    nodes = [richer[n.output[0]] if n.output and n.output[0] in richer
             and len(richer[n.output[0]].output) > len(n.output) else n for n in graph.node]
    del graph.node[:]
    graph.node.extend(nodes)
    types = _value_types(model)
    present = {o.name for o in graph.output}
    for name in residuals:
        if name not in present:
            graph.output.append(_typed(name, types))
    return model, types


def _backward_from(backward: BackwardGraph, nodes: list[onnx.NodeProto],
                   residuals: list[str], types: dict[str, onnx.TypeProto]) -> BackwardGraph:
    """The backward graph of ``nodes`` (the recompute removed), the residuals its inputs."""
    source = backward.model.graph
    model = onnx.ModelProto(ir_version=backward.model.ir_version, producer_name="streamc")
    model.opset_import.extend(backward.model.opset_import)
    graph = model.graph
    graph.name = f"{source.name}_kept"
    graph.node.extend(nodes)
    read = {i for n in nodes for i in (*n.input, *captured_names(n))}
    read |= {o.name for o in source.output}
    cotangents = set(backward.cotangents.values())
    graph.input.extend(i for i in source.input if i.name in read or i.name in cotangents)
    graph.input.extend(_typed(name, types) for name in residuals)
    graph.output.extend(source.output)
    graph.initializer.extend(t for t in source.initializer if t.name in read)
    return BackwardGraph(model, dict(backward.cotangents), dict(backward.gradients),
                         dict(backward.outputs))


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    inferred = shape_inference.infer_shapes(model)
    graph = inferred.graph
    return {v.name: v.type for v in (*graph.input, *graph.value_info, *graph.output)}


def _typed(name: str, types: dict[str, onnx.TypeProto]) -> onnx.ValueInfoProto:
    value = helper.make_empty_tensor_value_info(name)
    value.type.CopyFrom(types[name])
    return value
