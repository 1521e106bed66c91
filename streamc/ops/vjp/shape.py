"""VJP rules of shape ops: Reshape and friends, Transpose, Concat, Split, Pad, Slice."""

from __future__ import annotations

import numpy as np

from streamc.errors import UnsupportedModelError
from streamc.ops.attrs import attribute
from streamc.ops.vjp.common import input_at, normalize_axes
from streamc.ops.vjp.table import vjp

# --------------------------------------------------------------------------------------------
# Shape ops


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx, node, dys):
    return [ctx.reshape(dys[0], ctx.shape(node.input[0]))] + [None] * (len(node.input) - 1)


@vjp("Transpose")
def transpose(ctx, node, dys):
    perm = attribute(node, "perm") or list(reversed(range(ctx.rank(node.input[0]))))
    return [ctx.op("Transpose", dys[0], perm=[int(i) for i in np.argsort(perm)])]


@vjp("Concat")
def concat(ctx, node, dys):
    axis = attribute(node, "axis") % ctx.rank(node.output[0])
    live = [i for i, x in enumerate(node.input) if x and ctx.shape(x)[axis] > 0]
    if len(live) == 1:
        parts = [dys[0]]
    else:
        sizes = [ctx.shape(node.input[i])[axis] for i in live]
        parts = ctx.ops("Split", dys[0], ctx.ints(sizes), outputs=len(live), axis=axis)
    result: list[str | None] = [None] * len(node.input)
    for i, part in zip(live, parts, strict=False):
        result[i] = part
    return result


@vjp("Split")
def split(ctx, node, dys):
    x = node.input[0]
    axis = attribute(node, "axis", 0) % ctx.rank(x)
    parts = [
        dy if dy is not None else ctx.zeros(ctx.shape(out), like=x)
        for out, dy in zip(node.output, dys, strict=False)
    ]
    dx = parts[0] if len(parts) == 1 else ctx.op("Concat", *parts, axis=axis)
    return [dx, None]


@vjp("Pad")
def pad(ctx, node, dys):
    x, dy = node.input[0], dys[0]
    mode = attribute(node, "mode", "constant")
    if mode != "constant":
        raise UnsupportedModelError(
            f"Pad node {node.name!r} uses mode {mode!r}; streamc differentiates only constant "
            "padding. Use zero padding in the model."
        )
    rank = ctx.rank(x)
    pads = [int(p) for p in ctx.require_value(node.input[1], "pads")]
    axes_value = ctx.value(input_at(node, 3))
    axes = normalize_axes(axes_value, rank) if axes_value is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    out_shape = ctx.shape(node.output[0])
    cut = [a for a in range(rank) if begin[a] > 0 or end[a] > 0]
    if cut:
        dy = ctx.op(
            "Slice",
            dy,
            ctx.ints([max(begin[a], 0) for a in cut]),
            ctx.ints([out_shape[a] - max(end[a], 0) for a in cut]),
            ctx.ints(cut),
        )
    if any(b < 0 for b in begin) or any(e < 0 for e in end):
        dy = ctx.op("Pad", dy, ctx.ints([max(-b, 0) for b in begin] + [max(-e, 0) for e in end]))
    return [dy, None, None, None]


@vjp("Slice")
def slice_(ctx, node, dys):
    x = node.input[0]
    shape = ctx.shape(x)
    rank = len(shape)
    starts = ctx.require_value(node.input[1], "starts")
    ends = ctx.require_value(node.input[2], "ends")
    axes_value = ctx.value(input_at(node, 3))
    axes = list(range(len(starts))) if axes_value is None else [int(a) % rank for a in axes_value]
    steps_value = ctx.value(input_at(node, 4))
    steps = [int(s) for s in steps_value] if steps_value is not None else [1] * len(axes)
    if any(s != 1 for s in steps):
        raise UnsupportedModelError(
            f"Slice node {node.name!r} has steps {steps}; streamc differentiates only Slice with "
            "step 1."
        )
    begin, end = [0] * rank, [0] * rank
    for axis, start, stop in zip(axes, starts, ends, strict=False):
        dim = shape[axis]
        start, stop = int(start), int(stop)
        start = min(max(start + dim if start < 0 else start, 0), dim)
        stop = min(max(stop + dim if stop < 0 else stop, 0), dim)
        stop = max(stop, start)
        begin[axis], end[axis] = start, dim - stop
    if any(begin) or any(end):
        return [ctx.op("Pad", dys[0], ctx.ints(begin + end)), None, None, None, None]
    return [dys[0], None, None, None, None]
