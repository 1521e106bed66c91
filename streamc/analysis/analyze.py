"""``streamc.analyze``: the locality split and per-tensor receptive fields of a model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import onnx

from streamc.analysis.regions import (
    Box,
    Field,
    alignment,
    needed_regions,
    receptive_fields,
    spatial_extent,
)
from streamc.analysis.split import Split, Stop, split_graph
from streamc.graph import Graph, choose_image_input, load_model, prepare


@dataclass
class PrefixTensor:
    """One prefix tensor as ``streamc inspect`` reports it."""

    name: str
    op: str
    shape: tuple[int | None, ...] | None
    stride: tuple[Fraction, ...]
    receptive_field: tuple[int, ...]
    offset: tuple[int, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "shape": list(self.shape) if self.shape is not None else None,
            "stride": [_fraction_json(s) for s in self.stride],
            "receptive_field": list(self.receptive_field),
            "offset": list(self.offset),
        }


@dataclass(frozen=True)
class StreamedShare:
    """How much of the model the grid covers: its share of the forward FLOPs and of the
    activation bytes (every tensor a node computes, the model's outputs included), at the
    analysed size. What is not streamed runs on whole tensors in the head or global graphs."""

    flops: float
    activations: float

    def sentence(self) -> str:
        return (f"{self.flops:.0%} of the forward FLOPs and {self.activations:.0%} of the "
                "activation memory stream tile by tile")


@dataclass
class Analysis:
    """Everything the compiler needs to know about a model before tiling it."""

    model: onnx.ModelProto
    graph: Graph
    split: Split
    image_shape: tuple[int | None, ...]
    tensors: dict[str, PrefixTensor] = field(default_factory=dict)
    alignment: tuple[int, ...] = ()
    #: the model as loaded, before its size was fixed and its constants folded
    source: onnx.ModelProto | None = field(default=None, repr=False)
    reduce_final: bool = True
    #: grid tensors after which the grid was ended early (``split_graph``'s ``grid_end``)
    grid_end: tuple[str, ...] = ()

    @property
    def input_name(self) -> str:
        return self.split.input_name

    @property
    def n_spatial(self) -> int:
        return self.split.n_spatial

    @property
    def image_size(self) -> tuple[int | None, ...]:
        return tuple(self.image_shape[2:])

    @property
    def prefix(self) -> list[str]:
        return self.split.prefix

    @property
    def head(self) -> list[str]:
        return self.split.head

    @property
    def cut_tensors(self) -> list[str]:
        return self.split.cut_tensors

    @property
    def reduced_ends(self) -> dict[str, str]:
        """The tensors the head's final reductions reduce tile by tile (never whole), and the
        op type reducing each."""
        return {r.tensor: self.graph.nodes[r.node].op_type for r in self.split.final_reductions}

    @property
    def ends(self) -> list[str]:
        """Where the grid ends: the cut tensors, then :attr:`reduced_ends`."""
        return list(dict.fromkeys(self.cut_tensors + list(self.reduced_ends)))

    @property
    def targets(self) -> list[str]:
        """Every grid tensor some stage keeps regions of (outputs and reduced tensors)."""
        seen: dict[str, None] = {}
        for stage in self.split.stage_io:
            seen.update(dict.fromkeys(stage.targets))
        return list(seen)

    @property
    def stops(self) -> list[Stop]:
        return self.split.stops

    def extent(self, tensor: str) -> tuple[int, ...] | None:
        """Spatial size of a grid tensor (None when the image size is symbolic)."""
        return spatial_extent(self.graph, tensor, self.split.layout(tensor))

    def regions_for(self, cut_boxes: Mapping[str, Box], runnable: bool = False,
                    stage: int | None = None) -> dict[str, Box]:
        """Region of every grid tensor needed to compute ``cut_boxes`` of the given tensors
        (within ``stage`` only, when given: see :func:`needed_regions`).

        ``runnable``: widen regions so that every op in the cone reads at least one input
        position (what a tile graph computes; see :func:`needed_regions`).
        """
        return needed_regions(self.graph, self.split, cut_boxes, runnable=runnable,
                              stage=stage)

    def streamed_share(self) -> StreamedShare | None:
        """The grid's share of the model (None when the image size is symbolic)."""
        from streamc.ops.flops import node_flops, numel

        grid = set(self.prefix)
        flops = [0, 0]
        activations = [0, 0]
        opset = self.graph.opset
        for name, node in self.graph.nodes.items():
            streamed = name in grid
            flops[streamed] += node_flops(node, self.graph.shapes, opset)
            for out in node.output:
                shape = self.graph.shapes.get(out)
                if out and (shape is None or None in shape):
                    return None  # a symbolic size: no share to give
                activations[streamed] += numel(shape) if out else 0
        if not sum(flops) or not sum(activations):
            return None
        return StreamedShare(flops[1] / sum(flops), activations[1] / sum(activations))

    def stage_lines(self) -> list[str]:
        """One line per stage: its nodes, the whole tensors it keeps and the reductions that
        end it (``streamc inspect``)."""
        split = self.split
        lines = []
        for k, stage in enumerate(split.stage_io):
            line = f"stage {k}: {len(stage.nodes)} grid nodes"
            if stage.reductions:
                reduced = ", ".join(f"{self.graph.nodes[r.node].op_type} {r.node!r}"
                                    for r in stage.reductions)
                line += f"; whole-image reductions: {reduced}"
            kept = [t for t in stage.outputs if t not in self.cut_tensors]
            if kept:
                line += f"; keeps {len(kept)} tensor{'s' if len(kept) > 1 else ''} whole"
            lines.append(line)
        if split.global_nodes:
            lines.append(f"global graphs: {len(split.global_nodes)} nodes on per-sample "
                         "statistics between the stages")
        return lines

    def to_dict(self) -> dict:
        share = self.streamed_share()
        head_ops: dict[str, int] = {}
        reduced = self.reduced_ends
        for name in self.head:
            op = self.graph.nodes[name].op_type
            head_ops[op] = head_ops.get(op, 0) + 1
        return {
            "input": self.input_name,
            "image_shape": list(self.image_shape),
            "prefix_nodes": len(self.prefix),
            "head_nodes": len(self.head),
            "head_ops": head_ops,
            "cut_tensors": [dict(self.tensors[t].to_dict(), reduced=reduced.get(t))
                            for t in self.ends],
            "stages": len(self.split.stage_io),
            "global_nodes": len(self.split.global_nodes),
            "reductions": [{"node": r.node, "tensor": r.tensor, "output": r.output,
                            "stage": r.stage} for r in self.split.reductions],
            "streamed_share": None if share is None else {"flops": share.flops,
                                                          "activations": share.activations},
            "alignment": list(self.alignment),
            "stopped_by": [
                {"node": s.node, "op": s.op, "tensor": s.tensor, "reason": s.reason}
                for s in self.stops
            ],
            "tensors": [t.to_dict() for t in self.tensors.values()],
        }


def _fraction_json(value: Fraction) -> int | str:
    return value.numerator if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _runtime_sizes(graph: Graph, split: Split) -> bool:
    """Give every prefix tensor the spatial size that the runtime computes; True if any changed.

    Where a window finds no room, ONNX shape inference (onnx 1.23) departs from the
    arithmetic of the locality rules: a pool whose kernel is larger than its padded input gets
    size 1 (ORT agrees, torch refuses; the rules say 0, which the compiler reports as an image
    too small for the network), and before opset 22 a ``ceil_mode`` window that would start in
    the end padding is kept (ORT and torch drop it; :func:`~streamc.graph.prepare` already
    infers through a stand-in). Sizes are recomputed from the rules along the prefix, so the
    cut tensors, the head's inputs and every tile's regions follow them.
    """
    changed = False
    for name in split.prefix:
        node = graph.nodes[name]
        op = split.local_ops[name]
        if not op.grid_inputs:
            continue
        grid = node.input[op.grid_inputs[0]]
        source = spatial_extent(graph, grid, split.layout(grid))
        if source is None:
            continue
        sizes = tuple(axis.out_size(n) for axis, n in zip(op.axes, source))
        for out in node.output:
            shape = graph.shape(out) if out else None
            layout = split.layout(out)
            if shape is None or len(shape) <= max(layout):
                continue
            if tuple(shape[p] for p in layout) == sizes:
                continue
            shape = list(shape)
            for p, size in zip(layout, sizes):
                shape[p] = size
            graph.shapes[out] = tuple(shape)
            changed = True
    return changed


def analyze(
    model: str | Path | onnx.ModelProto,
    image: Sequence[int] | None = None,
    input: str | None = None,
    reduce_final: bool = True,
    grid_end: str | Sequence[str] = (),
) -> Analysis:
    """Analyse ``model``: locality split, cut tensors, receptive fields, alignment.

    ``image`` fixes the spatial size ((H, W) or (D, H, W)); without it the model's own sizes
    are used, and symbolic ones stay symbolic (strides and receptive fields do not need them).
    ``reduce_final``, ``grid_end``: see :func:`~streamc.analysis.split.split_graph`.
    """
    return analyze_checked(load_model(model), image, input, reduce_final, grid_end)


def analyze_checked(
    proto: onnx.ModelProto,
    image: Sequence[int] | None = None,
    input: str | None = None,
    reduce_final: bool = True,
    grid_end: str | Sequence[str] = (),
) -> Analysis:
    """:func:`analyze` for a model that :func:`~streamc.graph.load_model` has already checked."""
    input_name = choose_image_input(proto, input)
    prepared = prepare(proto, image, input_name, batch=1)
    return _analysis_of(prepared, proto, input_name, reduce_final, _names(grid_end))


def with_grid_end(analysis: Analysis, grid_end: str | Sequence[str]) -> Analysis:
    """``analysis`` of the same prepared model with the grid ended after ``grid_end``."""
    return _analysis_of(analysis.model, analysis.source, analysis.input_name,
                        analysis.reduce_final, _names(grid_end))


def _names(tensors: str | Sequence[str]) -> tuple[str, ...]:
    return (tensors,) if isinstance(tensors, str) else tuple(tensors)


def grid_end_candidates(analysis: Analysis) -> list[str]:
    """Where the grid can end early, shallowest first: for each cumulative stride below the
    deepest, the last tensor at that stride through which everything after it passes (ending
    the grid there leaves it the head's only grid input). Empty for a multi-stage grid."""
    if analysis.split.stages > 1:
        return []
    levels: dict[tuple, list[str]] = {}
    for name in analysis.split.prefix_tensors[1:]:
        levels.setdefault(analysis.tensors[name].stride, []).append(name)
    ends = [analysis.tensors[t].stride for t in analysis.ends if t in analysis.tensors]
    if not ends:
        return []
    deepest = max(ends)
    found = []
    for stride, names in levels.items():
        if stride == deepest or any(a > b for a, b in zip(stride, deepest)):
            continue
        for name in reversed(names):
            split = split_graph(analysis.graph, analysis.input_name, analysis.reduce_final,
                                (name,))
            if split.cut_tensors == [name] and split.prefix:
                found.append(name)
                break
    order = {t: k for k, t in enumerate(analysis.split.prefix_tensors)}
    return sorted(found, key=order.__getitem__)


def _analysis_of(prepared: onnx.ModelProto, proto: onnx.ModelProto | None, input_name: str,
                 reduce_final: bool, grid_end: tuple[str, ...]) -> Analysis:
    graph = Graph.from_model(prepared)
    split = split_graph(graph, input_name, reduce_final, grid_end)
    for _ in range(len(split.prefix) + 1):
        if not _runtime_sizes(graph, split):
            break
        # rules that read sizes (auto_pad SAME) again
        split = split_graph(graph, input_name, reduce_final, grid_end)
    fields: dict[str, Field] = receptive_fields(graph, split)
    tensors = {}
    for tensor in split.prefix_tensors:
        f = fields[tensor]
        producer = graph.producer.get(tensor)
        op = graph.nodes[producer].op_type if producer else "input"
        tensors[tensor] = PrefixTensor(tensor, op, graph.shape(tensor), f.stride,
                                     f.receptive_field, f.offset)
    return Analysis(
        model=prepared,
        graph=graph,
        split=split,
        image_shape=tuple(graph.shape(input_name) or ()),
        tensors=tensors,
        alignment=alignment({t: f.stride for t, f in fields.items()}, split.n_spatial),
        source=proto,
        reduce_final=reduce_final,
        grid_end=grid_end,
    )
