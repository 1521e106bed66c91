"""VJP rules of pooling: MaxPool through its Indices, AveragePool and LpPool through the adjoint
of a windowed sum."""

from __future__ import annotations

import math

import numpy as np
import onnx

from streamc.errors import UnsupportedModelError
from streamc.ops.attrs import attribute
from streamc.ops.geometry import NodeWindow
from streamc.ops.vjp.common import scaled, spatial
from streamc.ops.vjp.conv import conv_input_grad, node_window
from streamc.ops.vjp.table import vjp


def _pool_window(ctx, node) -> NodeWindow:
    x = node.input[0]
    return node_window(node, attribute(node, "kernel_shape"), spatial(ctx, x),
                  spatial(ctx, node.output[0]))


def _window_sum_transpose(ctx, dy: str, x: str, win: NodeWindow) -> str:
    """Adjoint of a windowed sum (ones kernel, one group per channel)."""
    channels = ctx.shape(x)[1]
    ones = ctx.const(np.ones([channels, 1, *win.kernel]), like=x)
    return conv_input_grad(ctx, dy, ones, [channels, 1, *win.kernel], win, group=channels)


def _with_indices(ctx, node: onnx.NodeProto) -> onnx.NodeProto:
    """MaxPool rewritten so that it also outputs Indices (row-major, flattened over N·C·...)."""
    if len(node.output) > 1 and node.output[1]:
        if attribute(node, "storage_order", 0):
            raise UnsupportedModelError(
                f"MaxPool node {node.name!r} returns column-major Indices (storage_order=1); "
                "streamc needs storage_order=0."
            )
        return node
    rewritten = onnx.NodeProto()
    rewritten.CopyFrom(node)
    del rewritten.output[:]
    rewritten.output.extend([node.output[0], ctx.fresh("indices")])
    return rewritten


@vjp("MaxPool", prepare=_with_indices)
def max_pool(ctx, node, dys):
    x = node.input[0]
    size = math.prod(ctx.shape(x))
    flat = ctx.op("ScatterElements", ctx.zeros([size], like=x),
                  ctx.reshape(node.output[1], [-1]), ctx.reshape(dys[0], [-1]),
                  axis=0, reduction="add")
    return [ctx.reshape(flat, ctx.shape(x))]


def _window_counts(win: NodeWindow, axis: int, include_pad: bool) -> np.ndarray:
    """Per output position along ``axis``: how many taps the average divides by."""
    counts = []
    for j in range(win.out_size[axis]):
        start = j * win.strides[axis] - win.pads_begin[axis]
        taps = [start + t * win.dilations[axis] for t in range(win.kernel[axis])]
        if include_pad:
            limit = win.in_size[axis] + win.pads_end[axis]
            counts.append(sum(1 for p in taps if p < limit))
        else:
            counts.append(sum(1 for p in taps if 0 <= p < win.in_size[axis]))
    return np.asarray(counts, dtype=np.float64)


@vjp("AveragePool")
def average_pool(ctx, node, dys):
    x, dy = node.input[0], dys[0]
    win = _pool_window(ctx, node)
    include_pad = bool(attribute(node, "count_include_pad", 0))
    for a in range(win.rank):
        counts = _window_counts(win, a, include_pad)
        if np.all(counts == counts[0]):
            dy = scaled(ctx, dy, 1.0 / counts[0], x)
        else:
            shape = [win.out_size[a]] + [1] * (win.rank - 1 - a)
            dy = ctx.op("Mul", dy, ctx.const((1.0 / counts).reshape(shape), like=x))
    return [_window_sum_transpose(ctx, dy, x, win)]


@vjp("LpPool")
def lp_pool(ctx, node, dys):
    """Y = (Σ|X|^p)^(1/p) per window: dX = X·|X|^(p−2) · Σ_windows dY·Y^(1−p)."""
    x, y, dy = node.input[0], node.output[0], dys[0]
    p = float(attribute(node, "p", 2))
    win = _pool_window(ctx, node)
    if p == 1:
        return [ctx.op("Mul", ctx.op("Sign", x), _window_sum_transpose(ctx, dy, x, win))]
    per_window = ctx.op("Mul", dy, ctx.op("Pow", y, ctx.scalar(1.0 - p, y)))
    spread = _window_sum_transpose(ctx, per_window, x, win)
    local = x if p == 2 else ctx.op("Mul", x, ctx.op("Pow", ctx.op("Abs", x),
                                                     ctx.scalar(p - 2.0, x)))
    return [ctx.op("Mul", local, spread)]
