"""VJP rules of reductions and head ops: Reduce*, global pools, softmax, Gemm, MatMul,
BatchNormalization (inference form)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from streamc.errors import UnsupportedModelError
from streamc.ops.attrs import attribute
from streamc.ops.vjp.common import channel_shape, input_at, normalize_axes, scaled, spatial
from streamc.ops.vjp.table import vjp

# --------------------------------------------------------------------------------------------
# Reductions and head ops


def _reduce_axes(ctx, node) -> list[int] | None:
    """Reduced axes (normalized), or None when the node is the identity."""
    rank = ctx.rank(node.input[0])
    axes = attribute(node, "axes")
    if axes is None and input_at(node, 1):
        axes = ctx.require_value(node.input[1], "axes").tolist()
    if not axes:
        return None if attribute(node, "noop_with_empty_axes", 0) else list(range(rank))
    return normalize_axes(axes, rank)


def _kept_shape(shape: Sequence[int], axes: Sequence[int]) -> list[int]:
    return [1 if a in axes else d for a, d in enumerate(shape)]


@vjp("ReduceSum", "ReduceMean")
def reduce_sum(ctx, node, dys):
    x = node.input[0]
    shape = ctx.shape(x)
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dys[0], None]
    dy = ctx.reshape(dys[0], _kept_shape(shape, axes))
    if node.op_type == "ReduceMean":
        dy = scaled(ctx, dy, 1.0 / math.prod(shape[a] for a in axes), x)
    return [ctx.op("Expand", dy, ctx.ints(shape)), None]


def _extremum_grad(ctx, x: str, y: str, dy: str, axes: Sequence[int]) -> str:
    """Cotangent of a max/min reduction: shared equally among the tied extreme positions."""
    kept = _kept_shape(ctx.shape(x), axes)
    mask = ctx.op("Cast", ctx.op("Equal", x, ctx.reshape(y, kept)), to=ctx.dtype(x))
    count = ctx.reduce_sum(mask, axes, keepdims=True)
    return ctx.op("Mul", mask, ctx.op("Div", ctx.reshape(dy, kept), count))


@vjp("ReduceMax", "ReduceMin")
def reduce_max(ctx, node, dys):
    axes = _reduce_axes(ctx, node)
    if axes is None:
        return [dys[0], None]
    return [_extremum_grad(ctx, node.input[0], node.output[0], dys[0], axes), None]


@vjp("GlobalMaxPool")
def global_max_pool(ctx, node, dys):
    axes = list(range(2, ctx.rank(node.input[0])))
    return [_extremum_grad(ctx, node.input[0], node.output[0], dys[0], axes)]


@vjp("GlobalAveragePool")
def global_average_pool(ctx, node, dys):
    x = node.input[0]
    area = math.prod(spatial(ctx, x))
    return [ctx.op("Expand", scaled(ctx, dys[0], 1.0 / area, x), ctx.ints(ctx.shape(x)))]


@vjp("Softmax", since=13)
def softmax(ctx, node, dys):
    y, dy = node.output[0], dys[0]
    axis = attribute(node, "axis", -1) % ctx.rank(y)
    dot = ctx.reduce_sum(ctx.op("Mul", dy, y), [axis], keepdims=True)
    return [ctx.op("Mul", y, ctx.op("Sub", dy, dot))]


@vjp("LogSoftmax", since=13)
def log_softmax(ctx, node, dys):
    y, dy = node.output[0], dys[0]
    axis = attribute(node, "axis", -1) % ctx.rank(y)
    total = ctx.reduce_sum(dy, [axis], keepdims=True)
    return [ctx.op("Sub", dy, ctx.op("Mul", ctx.op("Exp", y), total))]


@vjp("Gemm", trainable=(1, 2), unbroadcast=(2,))
def gemm(ctx, node, dys):
    a, b = node.input[:2]
    dy = dys[0]
    alpha, beta = attribute(node, "alpha", 1.0), attribute(node, "beta", 1.0)
    trans_a, trans_b = attribute(node, "transA", 0), attribute(node, "transB", 0)
    if trans_a:  # A = A'ᵀ: dA = alpha·B'·dYᵀ
        da = ctx.op("Gemm", b, dy, alpha=alpha, transA=trans_b, transB=1)
    else:  # dA = alpha·dY·B'ᵀ
        da = ctx.op("Gemm", dy, b, alpha=alpha, transB=1 - trans_b)
    if trans_b:  # dB = alpha·dYᵀ·A'
        db = ctx.op("Gemm", dy, a, alpha=alpha, transA=1, transB=trans_a)
    else:  # dB = alpha·A'ᵀ·dY
        db = ctx.op("Gemm", a, dy, alpha=alpha, transA=1 - trans_a)
    dc = scaled(ctx, dy, beta, node.output[0]) if input_at(node, 2) and beta != 1.0 else dy
    return [da, db, dc if input_at(node, 2) else None]


@vjp("MatMul", trainable=(1,))
def matmul(ctx, node, dys):
    a, b = node.input[:2]
    a_shape, b_shape, y_shape = ctx.shape(a), ctx.shape(b), ctx.shape(node.output[0])
    a2_shape = (1, *a_shape) if len(a_shape) == 1 else a_shape
    b2_shape = (*b_shape, 1) if len(b_shape) == 1 else b_shape
    batch = np.broadcast_shapes(a2_shape[:-2], b2_shape[:-2])
    y2_shape = (*batch, a2_shape[-2], b2_shape[-1])
    a2 = a if a2_shape == a_shape else ctx.reshape(a, a2_shape)
    b2 = b if b2_shape == b_shape else ctx.reshape(b, b2_shape)
    dy = dys[0] if y2_shape == y_shape else ctx.reshape(dys[0], y2_shape)

    def swap_last(name: str, rank: int) -> str:
        return ctx.op("Transpose", name, perm=[*range(rank - 2), rank - 1, rank - 2])

    da = ctx.op("MatMul", dy, swap_last(b2, len(b2_shape)))
    db = ctx.op("MatMul", swap_last(a2, len(a2_shape)), dy)
    da = ctx.unbroadcast(da, (*batch, a2_shape[-2], a2_shape[-1]), a2_shape)
    db = ctx.unbroadcast(db, (*batch, b2_shape[-2], b2_shape[-1]), b2_shape)
    if a2_shape != a_shape:
        da = ctx.reshape(da, a_shape)
    if b2_shape != b_shape:
        db = ctx.reshape(db, b_shape)
    return [da, db]


@vjp("BatchNormalization", trainable=(1, 2))
def batch_norm(ctx, node, dys):
    """Inference form: Y = scale·(X − mean)/√(var + ε) + B (running statistics, frozen)."""
    if attribute(node, "training_mode", 0) or any(o for o in node.output[1:]):
        raise UnsupportedModelError(
            f"BatchNormalization node {node.name!r} is in training mode; streamc needs "
            "BatchNorm in inference form (export with model.eval() / freeze the statistics)."
        )
    x, scale, _bias, mean_, var = node.input[:5]
    dy = dys[0]
    rank, channels = ctx.rank(x), ctx.shape(x)[1]
    per_channel = channel_shape(rank, channels)
    axes = [0, *range(2, rank)]
    eps = ctx.scalar(attribute(node, "epsilon", 1e-5), var)
    inv = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", var, eps)))
    dx = ctx.op("Mul", dy, ctx.reshape(ctx.op("Mul", scale, inv), per_channel))
    centered = ctx.op("Sub", x, ctx.reshape(mean_, per_channel))
    dscale = ctx.op("Mul", ctx.reduce_sum(ctx.op("Mul", dy, centered), axes, keepdims=False), inv)
    dbias = ctx.reduce_sum(dy, axes, keepdims=False)
    scale_inv = ctx.op("Mul", scale, inv)
    dmean = ctx.op("Neg", ctx.op("Mul", dbias, scale_inv))
    dvar = ctx.op("Mul", scaled(ctx, scale_inv, -0.5, var), ctx.op("Mul", inv, dscale))
    return [dx, dscale, dbias, dmean, dvar]


@vjp("LayerNormalization", trainable=(1, 2), unbroadcast=(1, 2), since=17)
def layer_norm(ctx, node, dys):
    """Y = (X − μ)/σ·scale + B over the axes from ``axis`` on:
    dX = (g − mean(g) − x̂·mean(g·x̂))/σ with g = dY·scale, x̂ = (X − μ)/σ."""
    x, scale = node.input[:2]
    dy = dys[0]
    rank = ctx.rank(x)
    axes = list(range(int(attribute(node, "axis", -1)) % rank, rank))
    eps = ctx.scalar(attribute(node, "epsilon", 1e-5), x)
    count = math.prod(ctx.shape(x)[a] for a in axes)

    def mean(name: str) -> str:  # ReduceSum takes axes as an input from opset 13, ReduceMean 18
        return ctx.op("Mul", ctx.reduce_sum(name, axes), ctx.scalar(1.0 / count, x))

    centered = ctx.op("Sub", x, mean(x))
    variance = mean(ctx.op("Mul", centered, centered))
    inv = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", variance, eps)))
    xhat = ctx.op("Mul", centered, inv)
    g = ctx.op("Mul", dy, scale)
    mean_g = mean(g)
    mean_gx = mean(ctx.op("Mul", g, xhat))
    dx = ctx.op("Mul", inv, ctx.op("Sub", ctx.op("Sub", g, mean_g), ctx.op("Mul", xhat, mean_gx)))
    db = dy if input_at(node, 2) else None
    return [dx, ctx.op("Mul", dy, xhat), db]
