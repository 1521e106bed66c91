"""The reduction table: ops that reduce a tensor over the whole image, computed tile by tile.

A *whole-image reduction* reads a grid tensor and reduces every spatial axis (and possibly
others, such as the channels of a group). Inside a network (squeeze-and-excitation, instance and
group normalisation) its result is needed before the layers after it can run, so it ends a
stage of the program: each tile computes a *partial* reduction over the region of the tensor it
owns (the owned regions partition the tensor, so nothing is counted twice), the partials are
combined once all tiles have run (:attr:`Reduction.combine` over the tiles), and the next stage
reads the result.

Contract of a rule: ``rule(node, ctx) -> ReductionRule``, or raise
:class:`~streamc.ops.locality.NotLocal` when the node does not reduce every spatial axis of its
grid input. ``ctx`` is the :class:`~streamc.ops.locality.LocalityContext` of the locality rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from streamc.ops.attrs import attribute
from streamc.ops.locality import LocalityContext, NotLocal, reduce_axes
from streamc.ops.registry import OpTable


@dataclass(frozen=True)
class ReductionRule:
    """How one reduction node is computed from tiles.

    ``partial``: the ONNX reduce op each tile applies to its owned region (``ReduceSum``,
    ``ReduceMax``, ``ReduceMin``); ``combine``: the reduce op applied across tiles (the same);
    ``mean``: divide the combined value by the number of reduced elements; ``axes``: the reduced
    axes of the input (normalised, sorted); ``keepdims``: whether the node keeps them.
    """

    partial: str
    mean: bool
    axes: tuple[int, ...]
    keepdims: bool

    @property
    def combine(self) -> str:
        return self.partial


REDUCTIONS: OpTable[object] = OpTable("whole-image reduction")


def _covers_space(axes: tuple[int, ...], ctx: LocalityContext, tensor: str) -> None:
    spatial = set(ctx.layout(tensor))
    if not spatial <= set(axes):
        raise NotLocal(f"it reduces axes {list(axes)}, not every spatial axis "
                       f"{sorted(spatial)} of its input")


def _reduce_axes(node: onnx.NodeProto, ctx: LocalityContext) -> tuple[int, ...]:
    rank = len(ctx.graph.shape(node.input[0]) or ())
    axes = reduce_axes(node, ctx)
    if not axes:
        if attribute(node, "noop_with_empty_axes", 0):
            raise NotLocal("it reduces nothing")
        axes = list(range(rank))
    return tuple(sorted(int(a) % rank for a in axes))


def _reduce(partial: str, mean: bool):
    def rule(node: onnx.NodeProto, ctx: LocalityContext) -> ReductionRule:
        axes = _reduce_axes(node, ctx)
        _covers_space(axes, ctx, node.input[0])
        if 0 in axes:
            raise NotLocal("it reduces the batch axis")
        return ReductionRule(partial, mean, axes, bool(attribute(node, "keepdims", 1)))

    return rule


REDUCTIONS.add("ReduceSum", _reduce("ReduceSum", False))
REDUCTIONS.add("ReduceMean", _reduce("ReduceSum", True))
REDUCTIONS.add("ReduceMax", _reduce("ReduceMax", False))
REDUCTIONS.add("ReduceMin", _reduce("ReduceMin", False))


def _global_pool(partial: str, mean: bool):
    def rule(node: onnx.NodeProto, ctx: LocalityContext) -> ReductionRule:
        layout = ctx.layout(node.input[0])
        if tuple(layout) != tuple(range(2, 2 + ctx.n_spatial)):
            raise NotLocal("its input is not in channels-first layout")
        return ReductionRule(partial, mean, tuple(layout), True)

    return rule


REDUCTIONS.add("GlobalAveragePool", _global_pool("ReduceSum", True))
REDUCTIONS.add("GlobalMaxPool", _global_pool("ReduceMax", False))
