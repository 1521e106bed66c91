"""VJP rules of broadcasting elementwise ops (the driver sums the broadcast axes away)."""

from __future__ import annotations

from streamc.ops.vjp.common import scaled
from streamc.ops.vjp.table import ALL_SLOTS, bias_after_matmul, vjp


@vjp("Add", unbroadcast=ALL_SLOTS, trainable=(0, 1), trainable_if=bias_after_matmul, scales=(0, 1))
def add(ctx, node, dys):
    return [dys[0], dys[0]]


@vjp("Sub", unbroadcast=ALL_SLOTS)
def sub(ctx, node, dys):
    return [dys[0], ctx.op("Neg", dys[0])]


@vjp("Mul", unbroadcast=ALL_SLOTS, scales=(0, 1))
def mul(ctx, node, dys):
    a, b = node.input[:2]
    return [ctx.op("Mul", dys[0], b), ctx.op("Mul", dys[0], a)]


@vjp("Div", unbroadcast=ALL_SLOTS)
def div(ctx, node, dys):
    b, y = node.input[1], node.output[0]
    return [ctx.op("Div", dys[0], b), ctx.op("Neg", ctx.op("Div", ctx.op("Mul", dys[0], y), b))]


@vjp("Pow", unbroadcast=ALL_SLOTS)
def pow_(ctx, node, dys):
    a, b = node.input[:2]
    y, dy = node.output[0], dys[0]
    float_exponent = ctx.dtype(b) == ctx.dtype(a)
    bf = b if float_exponent else ctx.op("Cast", b, to=ctx.dtype(a))
    zero = ctx.scalar(0.0, a)
    da = ctx.op("Mul", dy, ctx.op("Mul", bf, ctx.op("Pow", a, ctx.op("Sub", bf, ctx.scalar(1, a)))))
    da = ctx.op("Where", ctx.op("Equal", bf, zero), zero, da)
    if not float_exponent:
        return [da, None]
    db = ctx.op("Mul", ctx.op("Mul", dy, y), ctx.op("Log", a))
    return [da, ctx.op("Where", ctx.op("Equal", a, zero), zero, db)]


@vjp("Max", "Min", unbroadcast=ALL_SLOTS)
def extremum(ctx, node, dys):
    """Ties share the cotangent equally (as torch.maximum / torch.amax do)."""
    if len(node.input) == 1:
        return [dys[0]]
    y = node.output[0]
    masks = [ctx.op("Cast", ctx.op("Equal", x, y), to=ctx.dtype(y)) for x in node.input]
    count = ctx.op("Sum", *masks)
    share = ctx.op("Div", dys[0], count)
    return [ctx.op("Mul", share, m) for m in masks]


@vjp("Sum", unbroadcast=ALL_SLOTS)
def sum_(ctx, node, dys):
    return [dys[0]] * len(node.input)


@vjp("Mean", unbroadcast=ALL_SLOTS)
def mean(ctx, node, dys):
    share = scaled(ctx, dys[0], 1.0 / len(node.input), node.output[0])
    return [share] * len(node.input)


@vjp("Where", unbroadcast=(1, 2))
def where(ctx, node, dys):
    cond, zero = node.input[0], ctx.scalar(0.0, node.output[0])
    return [None, ctx.op("Where", cond, dys[0], zero), ctx.op("Where", cond, zero, dys[0])]


@vjp("Expand", unbroadcast=(0,))
def expand(ctx, node, dys):
    return [dys[0], None]
