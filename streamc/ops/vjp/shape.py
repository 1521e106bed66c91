"""VJP rules of shape ops: Reshape and friends, Transpose, Concat, Split, Pad, Slice."""

from __future__ import annotations

from collections.abc import Sequence

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
    """Constant: the interior of dY (negative pads crop, so their cotangent is zero-padded).
    Edge: each padded row's cotangent also goes to the border row it repeats. Reflect: to the
    row it mirrors. Both are separable, so axes are undone one at a time."""
    x, dy = node.input[0], dys[0]
    mode = attribute(node, "mode", "constant")
    if isinstance(mode, bytes):
        mode = mode.decode()
    if mode not in ("constant", "edge", "reflect"):
        raise UnsupportedModelError(
            f"Pad node {node.name!r} uses mode {mode!r}; streamc differentiates constant, edge "
            "and reflect padding."
        )
    rank = ctx.rank(x)
    pads = [int(p) for p in ctx.require_value(node.input[1], "pads")]
    axes_value = ctx.value(input_at(node, 3))
    axes = normalize_axes(axes_value, rank) if axes_value is not None else list(range(rank))
    begin, end = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[i + len(axes)]
    if mode != "constant":
        return [_unpad_repeated(ctx, dy, ctx.shape(x), begin, end, mode), None, None, None]
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


def _unpad_repeated(ctx, dy: str, shape: Sequence[int], begin: Sequence[int],
                    end: Sequence[int], mode: str) -> str:
    """The cotangent of an edge or reflect Pad of a tensor of ``shape`` (pads >= 0)."""
    for axis in reversed(range(len(shape))):
        b, e, n = begin[axis], end[axis], shape[axis]
        if not b and not e:
            continue
        terms = [_rows(ctx, dy, axis, b, b + n)]
        if mode == "edge":
            if b:
                terms.append(_placed(ctx, ctx.reduce_sum(_rows(ctx, dy, axis, 0, b), [axis]),
                                     len(shape), axis, 0, n - 1))
            if e:
                last = ctx.reduce_sum(_rows(ctx, dy, axis, b + n, b + n + e), [axis])
                terms.append(_placed(ctx, last, len(shape), axis, n - 1, 0))
        else:  # reflect: padded row -j mirrors row j, row n-1+j mirrors row n-1-j
            if b:
                terms.append(_placed(ctx, _rows(ctx, dy, axis, b - 1, -(2**63), -1),
                                     len(shape), axis, 1, n - 1 - b))
            if e:
                terms.append(_placed(ctx, _rows(ctx, dy, axis, b + n + e - 1, b + n - 1, -1),
                                     len(shape), axis, n - 1 - e, 1))
        dy = ctx.add_all(terms)
    return dy


def _rows(ctx, x: str, axis: int, start: int, stop: int, step: int = 1) -> str:
    return ctx.op("Slice", x, ctx.ints([start]), ctx.ints([stop]), ctx.ints([axis]),
                  ctx.ints([step]))


def _placed(ctx, part: str, rank: int, axis: int, lead: int, trail: int) -> str:
    """``part`` (of rank ``rank``) zero-padded by ``lead`` and ``trail`` rows along ``axis``."""
    widths = [0] * (2 * rank)
    widths[axis], widths[rank + axis] = lead, trail
    return ctx.op("Pad", part, ctx.ints(widths))


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
