"""Locality rules of ops that move, split or merge axes, or work along the channel axes only:
Transpose, Reshape/Flatten/Squeeze/Unsqueeze, MatMul over channels, LayerNormalization over
channels, reductions and Softmax over channels.

They make channels-last blocks local (ConvNeXt's ``LayerNorm2d`` is Transpose →
LayerNormalization → Transpose, its pointwise layers are MatMul on (N, H, W, C)) and the
channel-splitting Reshape of GroupNorm. Each rule says where the spatial axes of its output are
(``LocalOp.layout``); the tile graphs slice every tensor at its own spatial positions.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamc.ops import tiling
from streamc.ops.attrs import attributes
from streamc.ops.locality import (
    LOCALITY,
    LocalityContext,
    LocalOp,
    NotLocal,
    _check_grid_slots,
    _pointwise_axes,
    reduce_axes,
)


def _static_shape(ctx: LocalityContext, tensor: str) -> tuple[int, ...]:
    shape = ctx.graph.shape(tensor)
    if shape is None or any(d is None for d in shape):
        raise NotLocal(f"the shape of {tensor!r} is not static (fix the image size with --image)")
    return tuple(int(d) for d in shape)


@LOCALITY.register("Transpose")
def transpose(node, ctx: LocalityContext) -> LocalOp:
    _check_grid_slots(node, ctx, (0,))
    rank = len(_static_shape(ctx, node.input[0]))
    perm = list(attributes(node).get("perm") or reversed(range(rank)))
    if perm[0] != 0:
        raise NotLocal("it moves the batch axis")
    layout = tuple(perm.index(p) for p in ctx.layout(node.input[0]))
    return LocalOp(_pointwise_axes(ctx), (0,), layout=layout)


def reshape_layout(in_shape: Sequence[int], out_shape: Sequence[int],
                   layout: Sequence[int]) -> tuple[int, ...]:
    """Where the spatial axes (at ``layout`` of ``in_shape``) are after a reshape to
    ``out_shape``; NotLocal unless the reshape keeps the batch axis and each spatial axis whole
    and only splits or merges the other axes."""
    if not in_shape or not out_shape or in_shape[0] != out_shape[0]:
        raise NotLocal("it changes the batch axis")
    spatial = set(layout)
    result: dict[int, int] = {}
    i = j = 1
    while i < len(in_shape) or j < len(out_shape):
        first_i, first_j = i, j
        pi = pj = 1
        if i < len(in_shape):
            pi, i = pi * in_shape[i], i + 1
        if j < len(out_shape):
            pj, j = pj * out_shape[j], j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi, i = pi * in_shape[i], i + 1
            elif j < len(out_shape):
                pj, j = pj * out_shape[j], j + 1
            else:
                raise NotLocal("its shapes do not factor")
        ins = [a for a in range(first_i, i) if in_shape[a] != 1 or a in spatial]
        hits = [a for a in ins if a in spatial]
        if not hits:
            continue
        outs = [b for b in range(first_j, j) if out_shape[b] != 1]
        if len(ins) != 1 or len(outs) > 1:
            raise NotLocal("it merges or splits a spatial axis")
        target = outs[0] if outs else first_j
        if out_shape[target] != in_shape[hits[0]]:
            raise NotLocal("it changes the size of a spatial axis")
        result[hits[0]] = target
    return tuple(result[p] for p in layout)


@LOCALITY.register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(node, ctx: LocalityContext) -> LocalOp:
    in_shape = _static_shape(ctx, node.input[0])
    out_shape = _static_shape(ctx, node.output[0])
    for slot, name in enumerate(node.input[1:], start=1):
        if name and ctx.is_grid(name):
            raise NotLocal(f"its input {slot} depends on the image")
    layout = reshape_layout(in_shape, out_shape, ctx.layout(node.input[0]))
    if node.op_type != "Reshape":
        return LocalOp(_pointwise_axes(ctx), (0,), layout=layout)
    return LocalOp(_pointwise_axes(ctx), (0,), tiling.RESHAPE,
                   attrs={"shape": out_shape, "layout": layout}, layout=layout)


@LOCALITY.register("MatMul")
def matmul(node, ctx: LocalityContext) -> LocalOp:
    """X @ W over the last axis of X, W constant: a pointwise linear layer (channels-last)."""
    if len(node.input) < 2 or ctx.is_grid(node.input[1]) or node.input[1] in ctx.globals:
        raise NotLocal("its second operand is not a constant matrix")
    x_shape = _static_shape(ctx, node.input[0])
    w_shape = _static_shape(ctx, node.input[1])
    layout = ctx.layout(node.input[0])
    if len(x_shape) - 1 in layout:
        raise NotLocal("it multiplies along a spatial axis")
    if len(w_shape) > 2:
        raise NotLocal("its matrix is batched")
    return LocalOp(_pointwise_axes(ctx), (0,), layout=layout)  # the last axis is not spatial


def _channel_axes(node, ctx: LocalityContext, axes: Sequence[int]) -> tuple[int, ...]:
    rank = len(_static_shape(ctx, node.input[0]))
    axes = tuple(sorted(int(a) % rank for a in axes))
    if 0 in axes or set(axes) & set(ctx.layout(node.input[0])):
        raise NotLocal(f"it works along axes {list(axes)}; only channel axes keep it local")
    return axes


@LOCALITY.register("LayerNormalization")
def layer_norm(node, ctx: LocalityContext) -> LocalOp:
    rank = len(_static_shape(ctx, node.input[0]))
    axis = int(attributes(node).get("axis", -1)) % rank
    _channel_axes(node, ctx, range(axis, rank))
    if any(o for o in node.output[1:]) and any(o in ctx.graph.consumers for o in node.output[1:]):
        raise NotLocal("its mean or inverse standard deviation output is used")
    _check_grid_slots(node, ctx, (0,))
    return LocalOp(_pointwise_axes(ctx), (0,))


@LOCALITY.register("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def channel_reduce(node, ctx: LocalityContext) -> LocalOp:
    attrs = attributes(node)
    axes = reduce_axes(node, ctx)
    if not axes:
        raise NotLocal("it reduces every axis, the spatial ones included")
    axes = _channel_axes(node, ctx, axes)
    layout = ctx.layout(node.input[0])
    if not attrs.get("keepdims", 1):
        layout = tuple(p - sum(1 for a in axes if a < p) for p in layout)
    return LocalOp(_pointwise_axes(ctx), (0,), layout=layout)


@LOCALITY.register("Softmax", "LogSoftmax")
def softmax(node, ctx: LocalityContext) -> LocalOp:
    rank = len(_static_shape(ctx, node.input[0]))
    _channel_axes(node, ctx, [int(attributes(node).get("axis", -1))])
    if ctx.graph.opset < 13 and int(attributes(node).get("axis", 1)) % rank != rank - 1:
        raise NotLocal("before opset 13 it works on every axis from its axis on")
    return LocalOp(_pointwise_axes(ctx), (0,))
