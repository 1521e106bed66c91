"""VJP rules of pointwise ops (activations, unary math, identity-like ops)."""

from __future__ import annotations

import math

from onnx import TensorProto

from streamc.errors import UnsupportedModelError
from streamc.ops.attrs import attribute
from streamc.ops.vjp.common import input_at, masked, scaled, where_positive
from streamc.ops.vjp.table import ALL_SLOTS, vjp

# --------------------------------------------------------------------------------------------
# Pointwise ops


@vjp("Relu")
def relu(ctx, node, dys):
    # Y > 0 exactly where X > 0: reading the output lets X die after the forward (X is
    # often a BatchNormalization output that nothing else in the backward pass needs).
    y = node.output[0]
    return [masked(ctx, ctx.op("Greater", y, ctx.scalar(0.0, y)), dys[0], y)]


@vjp("LeakyRelu")
def leaky_relu(ctx, node, dys):
    x, dy, alpha = node.input[0], dys[0], attribute(node, "alpha", 0.01)
    if 0.0 < alpha < 1.0:
        # dy · max(float(x > 0), alpha): exactly dy or dy · alpha, without ORT's slow Where
        # (6-9x faster for 16-256 MiB, bitwise equal: benchmarks/vjp_mask.py).
        mask = ctx.op("Cast", ctx.op("Greater", x, ctx.scalar(0.0, x)), to=ctx.dtype(x))
        return [ctx.op("Mul", dy, ctx.op("Max", mask, ctx.scalar(alpha, x)))]
    return [where_positive(ctx, x, dy, scaled(ctx, dy, alpha, x))]


@vjp("PRelu", trainable=(1,), unbroadcast=ALL_SLOTS)
def prelu(ctx, node, dys):
    x, slope = node.input[:2]
    dy, zero = dys[0], ctx.scalar(0.0, x)
    positive = ctx.op("Greater", x, zero)
    return [
        ctx.op("Where", positive, dy, ctx.op("Mul", dy, slope)),
        ctx.op("Where", positive, zero, ctx.op("Mul", dy, x)),
    ]


@vjp("Sigmoid")
def sigmoid(ctx, node, dys):
    y = node.output[0]
    one_minus = ctx.op("Sub", ctx.scalar(1.0, y), y)
    return [ctx.op("Mul", dys[0], ctx.op("Mul", y, one_minus))]


@vjp("HardSigmoid")
def hard_sigmoid(ctx, node, dys):
    x, alpha, beta = node.input[0], attribute(node, "alpha", 0.2), attribute(node, "beta", 0.5)
    t = ctx.op("Add", scaled(ctx, x, alpha, x), ctx.scalar(beta, x))
    inside = ctx.op(
        "And", ctx.op("Greater", t, ctx.scalar(0.0, x)), ctx.op("Less", t, ctx.scalar(1.0, x))
    )
    return [ctx.op("Where", inside, scaled(ctx, dys[0], alpha, x), ctx.scalar(0.0, x))]


@vjp("HardSwish")
def hard_swish(ctx, node, dys):
    x, dy = node.input[0], dys[0]
    slope = ctx.op("Add", scaled(ctx, x, 1.0 / 3.0, x), ctx.scalar(0.5, x))
    below_three = ctx.op("LessOrEqual", x, ctx.scalar(3.0, x))
    middle = ctx.op("Where", below_three, slope, ctx.scalar(1.0, x))
    grad = ctx.op("Where", ctx.op("Less", x, ctx.scalar(-3.0, x)), ctx.scalar(0.0, x), middle)
    return [ctx.op("Mul", dy, grad)]


@vjp("Tanh")
def tanh(ctx, node, dys):
    y = node.output[0]
    return [ctx.op("Mul", dys[0], ctx.op("Sub", ctx.scalar(1.0, y), ctx.op("Mul", y, y)))]


@vjp("Clip")
def clip(ctx, node, dys):
    x, low, high = node.input[0], input_at(node, 1), input_at(node, 2)
    masks = []
    if low:
        masks.append(ctx.op("GreaterOrEqual", x, low))
    if high:
        masks.append(ctx.op("LessOrEqual", x, high))
    if not masks:
        return [dys[0]]
    inside = masks[0] if len(masks) == 1 else ctx.op("And", *masks)
    return [masked(ctx, inside, dys[0], x)]


@vjp("Elu")
def elu(ctx, node, dys):
    x, y, dy = node.input[0], node.output[0], dys[0]
    negative = ctx.op("Mul", dy, ctx.op("Add", y, ctx.scalar(attribute(node, "alpha", 1.0), x)))
    return [where_positive(ctx, x, dy, negative)]


@vjp("Selu")
def selu(ctx, node, dys):
    x, y, dy = node.input[0], node.output[0], dys[0]
    alpha = attribute(node, "alpha", 1.67326319217681884765625)
    gamma = attribute(node, "gamma", 1.05070102214813232421875)
    negative = ctx.op("Mul", dy, ctx.op("Add", y, ctx.scalar(alpha * gamma, x)))
    return [where_positive(ctx, x, scaled(ctx, dy, gamma, x), negative)]


@vjp("Softplus")
def softplus(ctx, node, dys):
    return [ctx.op("Mul", dys[0], ctx.op("Sigmoid", node.input[0]))]


@vjp("Erf")
def erf(ctx, node, dys):
    x = node.input[0]
    gauss = ctx.op("Exp", ctx.op("Neg", ctx.op("Mul", x, x)))
    return [ctx.op("Mul", dys[0], scaled(ctx, gauss, 2.0 / math.sqrt(math.pi), x))]


@vjp("Gelu", since=20)
def gelu(ctx, node, dys):
    x = node.input[0]
    c = lambda v: ctx.scalar(v, x)  # noqa: E731
    x2 = ctx.op("Mul", x, x)
    if attribute(node, "approximate", "none") == "tanh":
        k0, k1 = math.sqrt(2.0 / math.pi), 0.044715
        u = ctx.op("Mul", c(k0), ctx.op("Add", x, ctx.op("Mul", c(k1), ctx.op("Mul", x2, x))))
        t = ctx.op("Tanh", u)
        du = ctx.op("Mul", c(k0), ctx.op("Add", c(1.0), ctx.op("Mul", c(3 * k1), x2)))
        sech2 = ctx.op("Sub", c(1.0), ctx.op("Mul", t, t))
        grad = ctx.op(
            "Add",
            ctx.op("Mul", c(0.5), ctx.op("Add", c(1.0), t)),
            ctx.op("Mul", ctx.op("Mul", c(0.5), x), ctx.op("Mul", sech2, du)),
        )
    else:
        cdf = ctx.op(
            "Mul", c(0.5), ctx.op("Add", c(1.0), ctx.op("Erf", scaled(ctx, x, 0.5**0.5, x)))
        )
        pdf = scaled(ctx, ctx.op("Exp", scaled(ctx, x2, -0.5, x)), 1 / math.sqrt(2 * math.pi), x)
        grad = ctx.op("Add", cdf, ctx.op("Mul", x, pdf))
    return [ctx.op("Mul", dys[0], grad)]


@vjp("Exp")
def exp(ctx, node, dys):
    return [ctx.op("Mul", dys[0], node.output[0])]


@vjp("Log")
def log(ctx, node, dys):
    return [ctx.op("Div", dys[0], node.input[0])]


@vjp("Sqrt")
def sqrt(ctx, node, dys):
    return [ctx.op("Div", dys[0], scaled(ctx, node.output[0], 2.0, node.output[0]))]


@vjp("Neg")
def neg(ctx, node, dys):
    return [ctx.op("Neg", dys[0])]


@vjp("Abs")
def abs_(ctx, node, dys):
    return [ctx.op("Mul", dys[0], ctx.op("Sign", node.input[0]))]


@vjp("Reciprocal")
def reciprocal(ctx, node, dys):
    y = node.output[0]
    return [ctx.op("Neg", ctx.op("Mul", dys[0], ctx.op("Mul", y, y)))]


@vjp("Identity")
def identity(ctx, node, dys):
    return [dys[0]]


@vjp("Dropout")
def dropout(ctx, node, dys):
    training = ctx.value(input_at(node, 2))
    if (training is not None and bool(training)) or (
        input_at(node, 2) and training is None
    ):
        raise UnsupportedModelError(
            f"Dropout node {node.name!r} runs in training mode; export the model in eval mode "
            "(model.eval()) so that Dropout is the identity."
        )
    return [dys[0], None, None]


@vjp("Cast")
def cast(ctx, node, dys):
    x = node.input[0]
    if ctx.dtype(x) not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16,
                            TensorProto.BFLOAT16):
        return [None]
    return [ctx.op("Cast", dys[0], to=ctx.dtype(x))]


@vjp("Constant", "Shape", "Size", "ConstantOfShape", "Greater", "Less", "Equal", "GreaterOrEqual",
     "LessOrEqual", "And", "Or", "Not")
def no_gradient(ctx, node, dys):
    return [None] * len(node.input)
