"""The VJP table: one reverse-mode rule per ONNX op, written in standard ONNX ops.

Contract of a rule (``VjpRule.fn``)::

    fn(ctx: VjpContext, node: onnx.NodeProto, dys: list[str | None]) -> Sequence[str | None]

``dys`` holds one cotangent name per node output (None where the cotangent is zero; the driver
never calls a rule whose cotangents are all zero). The rule emits nodes through ``ctx`` and
returns one cotangent per node input, None where the input gets no gradient (integer inputs,
shapes, axes...). A returned cotangent has the input's shape, except in the slots listed in
``unbroadcast``: there it has the shape of output 0 and the driver sums the broadcast axes away.
Rules may emit cotangents for inputs that do not need them: the driver drops dead nodes.

Each rule also says which input slots hold trainable parameters (``trainable``), so that
:func:`streamc.passes.autodiff.trainable_initializers` can find the weights of a model, and may
rewrite its forward node before the backward pass (``prepare``: MaxPool gains an Indices output).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from streamc.errors import StreamcError
from streamc.ops.registry import OpTable

if TYPE_CHECKING:
    from streamc.passes.autodiff import VjpContext

ALL_SLOTS = -1  # `unbroadcast=ALL_SLOTS`: every returned cotangent has the output's shape
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

RuleFn = Callable[["VjpContext", onnx.NodeProto, list], Sequence]


@dataclass(frozen=True)
class VjpRule:
    """A VJP rule and what the driver needs to know about it (see the module docstring)."""

    fn: RuleFn
    trainable: tuple[int, ...] = ()
    unbroadcast: tuple[int, ...] | int = ()
    prepare: Callable[[VjpContext, onnx.NodeProto], onnx.NodeProto] | None = None
    trainable_if: Callable[[onnx.NodeProto, dict[str, onnx.NodeProto]], tuple[int, ...]] | None = (
        None
    )

    def unbroadcasts(self, slot: int) -> bool:
        return self.unbroadcast == ALL_SLOTS or slot in self.unbroadcast  # type: ignore[operator]

    def trainable_slots(
        self, node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]
    ) -> tuple[int, ...]:
        """Slots of ``node`` holding trainable parameters (``producers``: tensor -> node)."""
        if self.trainable_if is not None:
            return self.trainable_if(node, producers)
        return self.trainable


VJP: OpTable[VjpRule] = OpTable("VJP")


def vjp(
    *op_types: str,
    trainable: tuple[int, ...] = (),
    unbroadcast: tuple[int, ...] | int = (),
    prepare: Callable | None = None,
    trainable_if: Callable | None = None,
    since: int = 1,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator: register ``fn`` as the VJP rule of ``op_types``."""

    def decorate(fn: RuleFn) -> RuleFn:
        rule = VjpRule(fn, trainable, unbroadcast, prepare, trainable_if)
        for op_type in op_types:
            VJP.add(op_type, rule, since=since)
        return fn

    return decorate


def trainable_slots_table() -> dict[str, tuple[int, ...]]:
    """Op type -> statically trainable input slots (Add after MatMul is decided per node)."""
    return {op: rule.trainable for op, rule in VJP.items() if rule.trainable}


# --------------------------------------------------------------------------------------------
# Small helpers


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node`` (strings decoded), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else value
    return default


def _input(node: onnx.NodeProto, slot: int) -> str:
    return node.input[slot] if slot < len(node.input) else ""


def _spatial(ctx: VjpContext, name: str) -> tuple[int, ...]:
    return ctx.shape(name)[2:]


def _channel_shape(rank: int, channels: int) -> list[int]:
    return [1, channels] + [1] * (rank - 2)


def _normalize_axes(axes, rank: int) -> list[int]:
    return sorted(int(a) % rank for a in axes)


def _where_positive(ctx: VjpContext, x: str, yes: str, no: str) -> str:
    return ctx.op("Where", ctx.op("Greater", x, ctx.scalar(0.0, x)), yes, no)


def _scale(ctx: VjpContext, name: str, factor: float, like: str) -> str:
    return ctx.op("Mul", name, ctx.scalar(factor, like))


# --------------------------------------------------------------------------------------------
# Pointwise ops


@vjp("Relu")
def relu(ctx, node, dys):
    # Y > 0 exactly where X > 0: reading the output lets X die after the forward (X is
    # often a BatchNormalization output that nothing else in the backward pass needs).
    y = node.output[0]
    return [_where_positive(ctx, y, dys[0], ctx.scalar(0.0, y))]


@vjp("LeakyRelu")
def leaky_relu(ctx, node, dys):
    x, dy = node.input[0], dys[0]
    return [_where_positive(ctx, x, dy, _scale(ctx, dy, attr(node, "alpha", 0.01), x))]


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
    x, alpha, beta = node.input[0], attr(node, "alpha", 0.2), attr(node, "beta", 0.5)
    t = ctx.op("Add", _scale(ctx, x, alpha, x), ctx.scalar(beta, x))
    inside = ctx.op(
        "And", ctx.op("Greater", t, ctx.scalar(0.0, x)), ctx.op("Less", t, ctx.scalar(1.0, x))
    )
    return [ctx.op("Where", inside, _scale(ctx, dys[0], alpha, x), ctx.scalar(0.0, x))]


@vjp("HardSwish")
def hard_swish(ctx, node, dys):
    x, dy = node.input[0], dys[0]
    slope = ctx.op("Add", _scale(ctx, x, 1.0 / 3.0, x), ctx.scalar(0.5, x))
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
    x, low, high = node.input[0], _input(node, 1), _input(node, 2)
    masks = []
    if low:
        masks.append(ctx.op("GreaterOrEqual", x, low))
    if high:
        masks.append(ctx.op("LessOrEqual", x, high))
    if not masks:
        return [dys[0]]
    inside = masks[0] if len(masks) == 1 else ctx.op("And", *masks)
    return [ctx.op("Where", inside, dys[0], ctx.scalar(0.0, x))]


@vjp("Elu")
def elu(ctx, node, dys):
    x, y, dy = node.input[0], node.output[0], dys[0]
    negative = ctx.op("Mul", dy, ctx.op("Add", y, ctx.scalar(attr(node, "alpha", 1.0), x)))
    return [_where_positive(ctx, x, dy, negative)]


@vjp("Selu")
def selu(ctx, node, dys):
    x, y, dy = node.input[0], node.output[0], dys[0]
    alpha = attr(node, "alpha", 1.67326319217681884765625)
    gamma = attr(node, "gamma", 1.05070102214813232421875)
    negative = ctx.op("Mul", dy, ctx.op("Add", y, ctx.scalar(alpha * gamma, x)))
    return [_where_positive(ctx, x, _scale(ctx, dy, gamma, x), negative)]


@vjp("Softplus")
def softplus(ctx, node, dys):
    return [ctx.op("Mul", dys[0], ctx.op("Sigmoid", node.input[0]))]


@vjp("Erf")
def erf(ctx, node, dys):
    x = node.input[0]
    gauss = ctx.op("Exp", ctx.op("Neg", ctx.op("Mul", x, x)))
    return [ctx.op("Mul", dys[0], _scale(ctx, gauss, 2.0 / math.sqrt(math.pi), x))]


@vjp("Gelu", since=20)
def gelu(ctx, node, dys):
    x = node.input[0]
    c = lambda v: ctx.scalar(v, x)  # noqa: E731
    x2 = ctx.op("Mul", x, x)
    if attr(node, "approximate", "none") == "tanh":
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
            "Mul", c(0.5), ctx.op("Add", c(1.0), ctx.op("Erf", _scale(ctx, x, 0.5**0.5, x)))
        )
        pdf = _scale(ctx, ctx.op("Exp", _scale(ctx, x2, -0.5, x)), 1 / math.sqrt(2 * math.pi), x)
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
    return [ctx.op("Div", dys[0], _scale(ctx, node.output[0], 2.0, node.output[0]))]


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
    training = ctx.value(_input(node, 2))
    if (training is not None and bool(training)) or (
        _input(node, 2) and training is None
    ):
        raise StreamcError(
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


@vjp("Constant", "Shape", "Size", "ConstantOfShape")
def no_gradient(ctx, node, dys):
    return [None] * len(node.input)


# --------------------------------------------------------------------------------------------
# Broadcasting elementwise ops (the driver sums the broadcast axes away)


def _bias_after_matmul(node: onnx.NodeProto, producers: dict) -> tuple[int, ...]:
    """A constant Add operand is a trainable bias when the other operand comes from MatMul."""
    slots = []
    for slot, other in ((0, 1), (1, 0)):
        source = producers.get(node.input[other]) if other < len(node.input) else None
        if source is not None and source.op_type == "MatMul":
            slots.append(slot)
    return tuple(slots)


@vjp("Add", unbroadcast=ALL_SLOTS, trainable=(0, 1), trainable_if=_bias_after_matmul)
def add(ctx, node, dys):
    return [dys[0], dys[0]]


@vjp("Sub", unbroadcast=ALL_SLOTS)
def sub(ctx, node, dys):
    return [dys[0], ctx.op("Neg", dys[0])]


@vjp("Mul", unbroadcast=ALL_SLOTS)
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
    share = _scale(ctx, dys[0], 1.0 / len(node.input), node.output[0])
    return [share] * len(node.input)


@vjp("Where", unbroadcast=(1, 2))
def where(ctx, node, dys):
    cond, zero = node.input[0], ctx.scalar(0.0, node.output[0])
    return [None, ctx.op("Where", cond, dys[0], zero), ctx.op("Where", cond, zero, dys[0])]


@vjp("Expand", unbroadcast=(0,))
def expand(ctx, node, dys):
    return [dys[0], None]


# --------------------------------------------------------------------------------------------
# Shape ops


@vjp("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(ctx, node, dys):
    return [ctx.reshape(dys[0], ctx.shape(node.input[0]))] + [None] * (len(node.input) - 1)


@vjp("Transpose")
def transpose(ctx, node, dys):
    perm = attr(node, "perm") or list(reversed(range(ctx.rank(node.input[0]))))
    return [ctx.op("Transpose", dys[0], perm=[int(i) for i in np.argsort(perm)])]


@vjp("Concat")
def concat(ctx, node, dys):
    axis = attr(node, "axis") % ctx.rank(node.output[0])
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
    axis = attr(node, "axis", 0) % ctx.rank(x)
    parts = [
        dy if dy is not None else ctx.zeros(ctx.shape(out), like=x)
        for out, dy in zip(node.output, dys, strict=False)
    ]
    dx = parts[0] if len(parts) == 1 else ctx.op("Concat", *parts, axis=axis)
    return [dx, None]


@vjp("Pad")
def pad(ctx, node, dys):
    x, dy = node.input[0], dys[0]
    mode = attr(node, "mode", "constant")
    if mode != "constant":
        raise StreamcError(
            f"Pad node {node.name!r} uses mode {mode!r}; streamc differentiates only constant "
            "padding. Use zero padding in the model."
        )
    rank = ctx.rank(x)
    pads = [int(p) for p in ctx.require_value(node.input[1], "pads")]
    axes_value = ctx.value(_input(node, 3))
    axes = _normalize_axes(axes_value, rank) if axes_value is not None else list(range(rank))
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
    axes_value = ctx.value(_input(node, 3))
    axes = list(range(len(starts))) if axes_value is None else [int(a) % rank for a in axes_value]
    steps_value = ctx.value(_input(node, 4))
    steps = [int(s) for s in steps_value] if steps_value is not None else [1] * len(axes)
    if any(s != 1 for s in steps):
        raise StreamcError(
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


# --------------------------------------------------------------------------------------------
# Reductions and head ops


def _reduce_axes(ctx, node) -> list[int] | None:
    """Reduced axes (normalized), or None when the node is the identity."""
    rank = ctx.rank(node.input[0])
    axes = attr(node, "axes")
    if axes is None and _input(node, 1):
        axes = ctx.require_value(node.input[1], "axes").tolist()
    if not axes:
        return None if attr(node, "noop_with_empty_axes", 0) else list(range(rank))
    return _normalize_axes(axes, rank)


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
        dy = _scale(ctx, dy, 1.0 / math.prod(shape[a] for a in axes), x)
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
    area = math.prod(_spatial(ctx, x))
    return [ctx.op("Expand", _scale(ctx, dys[0], 1.0 / area, x), ctx.ints(ctx.shape(x)))]


@vjp("Softmax", since=13)
def softmax(ctx, node, dys):
    y, dy = node.output[0], dys[0]
    axis = attr(node, "axis", -1) % ctx.rank(y)
    dot = ctx.reduce_sum(ctx.op("Mul", dy, y), [axis], keepdims=True)
    return [ctx.op("Mul", y, ctx.op("Sub", dy, dot))]


@vjp("LogSoftmax", since=13)
def log_softmax(ctx, node, dys):
    y, dy = node.output[0], dys[0]
    axis = attr(node, "axis", -1) % ctx.rank(y)
    total = ctx.reduce_sum(dy, [axis], keepdims=True)
    return [ctx.op("Sub", dy, ctx.op("Mul", ctx.op("Exp", y), total))]


@vjp("Gemm", trainable=(1, 2), unbroadcast=(2,))
def gemm(ctx, node, dys):
    a, b = node.input[:2]
    dy = dys[0]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    trans_a, trans_b = attr(node, "transA", 0), attr(node, "transB", 0)
    if trans_a:  # A = A'ᵀ: dA = alpha·B'·dYᵀ
        da = ctx.op("Gemm", b, dy, alpha=alpha, transA=trans_b, transB=1)
    else:  # dA = alpha·dY·B'ᵀ
        da = ctx.op("Gemm", dy, b, alpha=alpha, transB=1 - trans_b)
    if trans_b:  # dB = alpha·dYᵀ·A'
        db = ctx.op("Gemm", dy, a, alpha=alpha, transA=1, transB=trans_a)
    else:  # dB = alpha·A'ᵀ·dY
        db = ctx.op("Gemm", a, dy, alpha=alpha, transA=1 - trans_a)
    dc = _scale(ctx, dy, beta, node.output[0]) if _input(node, 2) and beta != 1.0 else dy
    return [da, db, dc if _input(node, 2) else None]


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
    if attr(node, "training_mode", 0) or any(o for o in node.output[1:]):
        raise StreamcError(
            f"BatchNormalization node {node.name!r} is in training mode; streamc needs "
            "BatchNorm in inference form (export with model.eval() / freeze the statistics)."
        )
    x, scale, _bias, mean_, var = node.input[:5]
    dy = dys[0]
    rank, channels = ctx.rank(x), ctx.shape(x)[1]
    per_channel = _channel_shape(rank, channels)
    axes = [0, *range(2, rank)]
    eps = ctx.scalar(attr(node, "epsilon", 1e-5), var)
    inv = ctx.op("Reciprocal", ctx.op("Sqrt", ctx.op("Add", var, eps)))
    dx = ctx.op("Mul", dy, ctx.reshape(ctx.op("Mul", scale, inv), per_channel))
    centered = ctx.op("Sub", x, ctx.reshape(mean_, per_channel))
    dscale = ctx.op("Mul", ctx.reduce_sum(ctx.op("Mul", dy, centered), axes, keepdims=False), inv)
    dbias = ctx.reduce_sum(dy, axes, keepdims=False)
    scale_inv = ctx.op("Mul", scale, inv)
    dmean = ctx.op("Neg", ctx.op("Mul", dbias, scale_inv))
    dvar = ctx.op("Mul", _scale(ctx, scale_inv, -0.5, var), ctx.op("Mul", inv, dscale))
    return [dx, dscale, dbias, dmean, dvar]


# --------------------------------------------------------------------------------------------
# Windowed ops: Conv, ConvTranspose, pooling


@dataclass(frozen=True)
class Window:
    """Geometry of a sliding window along each spatial axis of one node."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads_begin: tuple[int, ...]
    pads_end: tuple[int, ...]
    in_size: tuple[int, ...]
    out_size: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.kernel)

    def span(self, axis: int) -> int:
        return self.dilations[axis] * (self.kernel[axis] - 1) + 1

    def trailing(self, axis: int) -> int:
        """Padded-input positions after the last window (negative: ceil_mode overhang)."""
        read = (self.out_size[axis] - 1) * self.strides[axis] + self.span(axis)
        return self.in_size[axis] + self.pads_begin[axis] + self.pads_end[axis] - read


def window(node: onnx.NodeProto, kernel: Sequence[int], in_size: Sequence[int],
           out_size: Sequence[int]) -> Window:
    """The :class:`Window` of a Conv or pooling node (auto_pad resolved to explicit pads)."""
    rank = len(kernel)
    strides = tuple(attr(node, "strides") or [1] * rank)
    dilations = tuple(attr(node, "dilations") or [1] * rank)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for a in range(rank):
            total = max((out_size[a] - 1) * strides[a] + dilations[a] * (kernel[a] - 1) + 1
                        - in_size[a], 0)
            small = total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
    elif auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    else:
        pads = attr(node, "pads") or [0] * (2 * rank)
        begin, end = pads[:rank], pads[rank:]
    return Window(tuple(kernel), strides, dilations, tuple(begin), tuple(end), tuple(in_size),
                  tuple(out_size))


def _flip_swap_weight(ctx, w: str, w_shape: Sequence[int], group: int) -> str:
    """(M, C/g, k...) -> (C, M/g, k...), spatially flipped: the weights of dX = Conv(dY, ·)."""
    m, cg, *kernel = w_shape
    rank = len(kernel)
    if group == 1:
        swapped = ctx.op("Transpose", w, perm=[1, 0, *range(2, rank + 2)])
    else:
        grouped = ctx.reshape(w, [group, m // group, cg, *kernel])
        grouped = ctx.op("Transpose", grouped, perm=[0, 2, 1, *range(3, rank + 3)])
        swapped = ctx.reshape(grouped, [group * cg, m // group, *kernel])
    axes = [2 + a for a in range(rank) if kernel[a] > 1]
    if not axes:
        return swapped
    return ctx.op("Slice", swapped, ctx.ints([-1] * len(axes)), ctx.ints([INT64_MIN] * len(axes)),
                  ctx.ints(axes), ctx.ints([-1] * len(axes)))


def conv_input_grad(ctx, dy: str, w: str, w_shape: Sequence[int], win: Window,
                    group: int) -> str:
    """dX of Y = Conv(X, W): a Conv with flipped weights (stride 1) or a ConvTranspose."""
    rank = win.rank
    spatial = list(range(2, rank + 2))
    if all(s == 1 for s in win.strides):
        begin = [win.span(a) - 1 - win.pads_begin[a] for a in range(rank)]
        end = [win.span(a) - 1 - win.pads_end[a] + win.trailing(a) for a in range(rank)]
        if any(b < 0 for b in begin) or any(e < 0 for e in end):
            dy = ctx.op("Slice", dy, ctx.ints([max(-b, 0) for b in begin]),
                        ctx.ints([win.out_size[a] - max(-end[a], 0) for a in range(rank)]),
                        ctx.ints(spatial))
        weights = _flip_swap_weight(ctx, w, w_shape, group)
        return ctx.op("Conv", dy, weights, dilations=list(win.dilations), group=group,
                      pads=[max(b, 0) for b in begin] + [max(e, 0) for e in end])
    pads_end, output_padding, extra = [], [], []
    for a in range(rank):
        target = win.pads_end[a] - win.trailing(a)
        if target >= 0:
            pads_end.append(target)
            output_padding.append(0)
            extra.append(0)
        else:
            pads_end.append(0)
            fits = -target < win.strides[a]
            output_padding.append(-target if fits else 0)
            extra.append(0 if fits else -target)
    dx = ctx.op("ConvTranspose", dy, w, strides=list(win.strides),
                dilations=list(win.dilations), group=group,
                pads=list(win.pads_begin) + pads_end,
                output_padding=output_padding if any(output_padding) else None)
    if any(extra):
        dx = ctx.op("Pad", dx, ctx.ints([0] * (rank + 2) + [0, 0] + extra))
    return dx


DW_CHUNK_BYTES = 16 << 20  # aim for this much im2col data per Gemm...
DW_MAX_CHUNKS = 8  # ...but split one image's rows into at most this many Gemms
DW_TAPS_PER_GEMM: int | None = None  # kernel taps stacked per Gemm (None: all of them)
DW_SHIFT_DY = True  # ungrouped convs: move last-axis taps onto dY (see _dense_weight_grad)


def conv_weight_grad(ctx, x: str, dy: str, x_shape: Sequence[int], w_shape: Sequence[int],
                     win: Window, group: int, like: str) -> str:
    """dW of Y = Conv(X, W) as Gemms over an im2col matrix built from contiguous slices.

    dW[m, c, o] = Σ_{n, j} dY[n, m, j] · Xpad[n, c, j·s + o·d]. The padded input is split once
    into its s^r stride phases (one Reshape + Transpose; nothing for stride 1), so that tap o
    reads phase (o·d mod s) at the unit-stride offset o·d // s. With every phase flattened over
    its spatial axes and dY zero-padded to the phase's row length, the view of tap o is one
    contiguous window of the flattened phase: k^r cheap Slices, one Concat, then one
    Gemm(P, dY, transB=1) per image and chunk of output rows (chunks keep P under
    ``DW_CHUNK_BYTES``). dtype of ``like`` sizes the chunks.
    """
    n, c, *_ = x_shape
    m, cg, *kernel = w_shape
    rank = win.rank
    taps = math.prod(kernel)
    s, d, out = win.strides, win.dilations, win.out_size
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(ctx.dtype(like))).itemsize
    # Phase grid: Q[a] positions per phase along axis a, plus one spare row on axis 0 so that
    # the last window of the flattened phase never runs past its end.
    reads = [(out[a] - 1) * s[a] + win.span(a) for a in range(rank)]  # padded extent read
    q = [-(-reads[a] // s[a]) for a in range(rank)]
    q[0] += 1
    begin = list(win.pads_begin)
    end = [q[a] * s[a] - begin[a] - win.in_size[a] for a in range(rank)]
    if any(e < 0 for e in end):  # the windows stop before the end of X: crop it
        x = ctx.op("Slice", x, ctx.ints([0] * rank),
                   ctx.ints([win.in_size[a] + min(end[a], 0) for a in range(rank)]),
                   ctx.ints(range(2, rank + 2)))
    if any(begin) or any(e > 0 for e in end):
        x = ctx.op("Pad", x, ctx.ints([0, 0, *begin, 0, 0, *(max(e, 0) for e in end)]))
    phases = math.prod(s)
    if phases > 1 and rank == 2 and s[0] == s[1]:  # (N, C, q0·s, q1·s) -> (N, s·s·C, q0, q1)
        x = ctx.op("SpaceToDepth", x, blocksize=s[0])  # much faster than the 6-D Transpose
    elif phases > 1:  # (N, C, q0·s0, ...) -> (N, s0, s1, ..., C, q0, q1, ...)
        split = [n, c] + [v for a in range(rank) for v in (q[a], s[a])]
        perm = [0] + [3 + 2 * a for a in range(rank)] + [1] + [2 + 2 * a for a in range(rank)]
        x = ctx.op("Transpose", ctx.reshape(x, split), perm=perm)
    row = math.prod(q[1:])  # flattened length of one row of a phase
    x = ctx.reshape(x, [n, phases * c, q[0] * row])
    # dY zero-padded to the phase rows: (N, M, out0, q1, ...) flattened. With dY shifted
    # (_dense_weight_grad), one leading zero row lets a shift look before the first row.
    shift_dy = group == 1 and DW_SHIFT_DY and rank >= 2
    lead = 1 if shift_dy else 0
    grow = [q[a] - out[a] for a in range(1, rank)]
    if lead or any(grow):
        dy = ctx.op("Pad", dy, ctx.ints([0, 0, lead] + [0] * (rank - 1) + [0, 0, 0] + grow))
    dy_length = (out[0] + lead) * row
    dy = ctx.reshape(dy, [n, m, dy_length])
    rows = max(1, DW_CHUNK_BYTES // max(taps * c * row * itemsize, 1), -(-out[0] // DW_MAX_CHUNKS))
    rows = min(rows, out[0])
    if group > 1 and cg == 1:
        rows = out[0]  # depthwise: no im2col matrix, only one product per tap
    images = []  # (X phases of one image (phases·C, q0·row), its dY (M, dy_length))
    for image in range(n):
        if n == 1:
            images.append((ctx.reshape(x, [phases * c, q[0] * row]),
                           ctx.reshape(dy, [m, dy_length])))
            continue
        pick = (ctx.ints([image]), ctx.ints([image + 1]), ctx.ints([0]))
        images.append((ctx.reshape(ctx.op("Slice", x, *pick), [phases * c, q[0] * row]),
                       ctx.reshape(ctx.op("Slice", dy, *pick), [m, dy_length])))
    if shift_dy:
        return _dense_weight_grad(ctx, images, rows, c, m, kernel, s, d, q, out[0])
    chunks = []  # (x rows of one image, dY rows, first output row, end output row)
    for x_n, dy_n in images:
        for r0 in range(0, out[0], rows):
            r1 = min(out[0], r0 + rows)
            dy_rows = dy_n if (r0, r1) == (0, out[0]) else ctx.op(
                "Slice", dy_n, ctx.ints([r0 * row]), ctx.ints([r1 * row]), ctx.ints([1]))
            chunks.append((x_n, dy_rows, r0, r1))
    partials = []
    for x_n, dy_rows, r0, r1 in chunks:
        views = []
        for offset in itertools.product(*(range(k) for k in kernel)):
            phase, shift = 0, r0 * row
            for a in range(rank):
                phase = phase * s[a] + (offset[a] * d[a]) % s[a]
                shift += (offset[a] * d[a]) // s[a] * math.prod(q[a + 1:])
            views.append(ctx.op("Slice", x_n, ctx.ints([phase * c, shift]),
                                ctx.ints([(phase + 1) * c, shift + (r1 - r0) * row]),
                                ctx.ints([0, 1])))
        partials.append(_weight_grad_product(ctx, views, dy_rows, c, m, group, taps))
    total = partials[0] if len(partials) == 1 else ctx.op("Sum", *partials)
    return _weight_grad_layout(ctx, total, w_shape, group, taps)


def _dense_weight_grad(ctx, images, rows: int, c: int, m: int, kernel: Sequence[int],
                       s: Sequence[int], d: Sequence[int], q: Sequence[int], out0: int) -> str:
    """Weight gradient of an ungrouped conv (rank >= 2), with the last-axis taps moved onto dY.

    Tap (o', j) (j along the last axis) reads X at window start base(o') + shift(j). Instead of
    one X window per tap, take one X window per o' (and last-axis phase) and shift dY by
    shift(j): Gemm(X windows (n_o'·C, L), shifted dY (n_j·M, L), transB=1) yields every
    (o', j) pair at once, copying the big input k_last times less, with a squarer Gemm.
    A shift never moves real dY values across a row: each dY row ends with at least
    shift(j) zero columns (q_last − out_last ≥ ⌊(k−1)·d/s⌋), and dY has a leading zero row.
    """
    rank = len(kernel)
    last = rank - 1
    row = math.prod(q[1:])
    lanes: dict[int, list[int]] = {}  # last-axis phase -> kernel indices j with that phase
    for j in range(kernel[last]):
        lanes.setdefault(j * d[last] % s[last], []).append(j)
    keys = list(itertools.product(*(range(k) for k in kernel[:last])))
    per_lane = {}
    for lane, js in lanes.items():
        shifts = [j * d[last] // s[last] for j in js]
        partials = []
        for x_n, dy_n in images:
            for r0 in range(0, out0, rows):
                length = (min(out0, r0 + rows) - r0) * row
                views = []
                for key in keys:
                    phase, base = 0, r0 * row
                    for a in range(last):
                        phase = phase * s[a] + key[a] * d[a] % s[a]
                        base += key[a] * d[a] // s[a] * math.prod(q[a + 1:])
                    phase = phase * s[last] + lane
                    views.append(ctx.op("Slice", x_n, ctx.ints([phase * c, base]),
                                        ctx.ints([(phase + 1) * c, base + length]),
                                        ctx.ints([0, 1])))
                patches = views[0] if len(views) == 1 else ctx.op("Concat", *views, axis=0)
                start = row + r0 * row  # skip the leading zero row
                shifted = [ctx.op("Slice", dy_n, ctx.ints([start - sh]),
                                  ctx.ints([start - sh + length]), ctx.ints([1]))
                           for sh in shifts]
                moved = shifted[0] if len(shifted) == 1 else ctx.op("Concat", *shifted, axis=0)
                partials.append(ctx.op("Gemm", patches, moved, transB=1))  # (keys·C, js·M)
        total = partials[0] if len(partials) == 1 else ctx.op("Sum", *partials)
        grid = ctx.reshape(total, [len(keys), c, len(js), m])
        per_lane[lane] = ctx.op("Transpose", grid, perm=[3, 1, 0, 2])  # (M, C, keys, js)
    order = [j for lane in lanes for j in lanes[lane]]
    joined = per_lane[0] if len(lanes) == 1 else ctx.op("Concat", *per_lane.values(), axis=3)
    if order != sorted(order):
        joined = ctx.op("Gather", joined, ctx.ints(list(np.argsort(order))), axis=3)
    return ctx.reshape(joined, [m, c, *kernel])


def _weight_grad_product(ctx, views: list[str], dy: str, c: int, m: int, group: int,
                         taps: int) -> str:
    """Σ over positions of dY ⊗ tap views, laid out as (taps, C, M/g) (or per group)."""
    cg, mg = c // group, m // group
    if group == 1:  # (taps·C, L) · (M, L)ᵀ -> (taps·C, M), DW_TAPS_PER_GEMM taps at a time
        step = DW_TAPS_PER_GEMM or taps
        products = []
        for first in range(0, taps, step):
            batch = views[first : first + step]
            patches = batch[0] if len(batch) == 1 else ctx.op("Concat", *batch, axis=0)
            products.append(ctx.op("Gemm", patches, dy, transB=1))
        return products[0] if len(products) == 1 else ctx.op("Concat", *products, axis=0)
    length_dy = ctx.reshape(dy, [group, mg, -1])
    if cg == 1:  # depthwise: (C, 1, L) ⊙ (C, M/g, L) summed over L, per tap
        columns = [ctx.reduce_sum(ctx.op("Mul", ctx.op("Unsqueeze", v, ctx.ints([1])),
                                         length_dy), [2], keepdims=False) for v in views]
        return ctx.op("Concat", *[ctx.op("Unsqueeze", col, ctx.ints([0])) for col in columns],
                      axis=0)  # (taps, C, M/g)
    patches = ctx.op("Concat", *[ctx.reshape(v, [1, group, cg, -1]) for v in views], axis=0)
    patches = ctx.reshape(ctx.op("Transpose", patches, perm=[1, 0, 2, 3]), [group, taps * cg, -1])
    product = ctx.op("MatMul", patches, ctx.op("Transpose", length_dy, perm=[0, 2, 1]))
    return product  # (g, taps·Cg, M/g)


def _weight_grad_layout(ctx, total: str, w_shape: Sequence[int], group: int, taps: int) -> str:
    """From the product layout of :func:`_weight_grad_product` to W's (M, C/g, k...)."""
    m, cg, *kernel = w_shape
    mg = m // group
    if group == 1:  # (taps, C, M) -> (M, C, taps)
        moved = ctx.op("Transpose", ctx.reshape(total, [taps, cg, m]), perm=[2, 1, 0])
    elif cg == 1:  # (taps, C, M/g) -> (C, M/g, taps) = (M, 1, taps)
        moved = ctx.op("Transpose", total, perm=[1, 2, 0])
    else:  # (g, taps, Cg, M/g) -> (g, M/g, Cg, taps)
        moved = ctx.op("Transpose", ctx.reshape(total, [group, taps, cg, mg]), perm=[0, 3, 2, 1])
    return ctx.reshape(moved, w_shape)


@vjp("Conv", trainable=(1, 2))
def conv(ctx, node, dys):
    x, w = node.input[:2]
    dy = dys[0]
    x_shape, w_shape = ctx.shape(x), ctx.shape(w)
    group = attr(node, "group", 1)
    win = window(node, w_shape[2:], x_shape[2:], _spatial(ctx, node.output[0]))
    dx = conv_input_grad(ctx, dy, w, w_shape, win, group)
    dw = conv_weight_grad(ctx, x, dy, x_shape, w_shape, win, group, like=w)
    db = None
    if _input(node, 2):
        db = ctx.reduce_sum(dy, [0, *range(2, len(x_shape))], keepdims=False)
    return [dx, dw, db]


def _conv_transpose_window(ctx, node, x_shape, w_shape) -> Window:
    """The Conv whose adjoint this ConvTranspose is: input = Y's grid, output = X's grid."""
    kernel = w_shape[2:]
    rank = len(kernel)
    y_size = _spatial(ctx, node.output[0])
    strides = attr(node, "strides") or [1] * rank
    dilations = attr(node, "dilations") or [1] * rank
    out_pad = attr(node, "output_padding") or [0] * rank
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if attr(node, "output_shape") is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for a in range(rank):
            total = (strides[a] * (x_shape[2 + a] - 1) + out_pad[a]
                     + (kernel[a] - 1) * dilations[a] + 1 - y_size[a])
            half = total // 2
            begin.append(half if auto_pad == "SAME_UPPER" else total - half)
            end.append(total - begin[-1])
    elif auto_pad == "VALID":
        begin, end = [0] * rank, [0] * rank
    else:
        pads = attr(node, "pads") or [0] * (2 * rank)
        begin, end = pads[:rank], pads[rank:]
    return Window(tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), tuple(end),
                  tuple(y_size), tuple(x_shape[2:]))


@vjp("ConvTranspose", trainable=(1, 2))
def conv_transpose(ctx, node, dys):
    """ConvTranspose(X, W) is the adjoint of Conv(·, W): dX = Conv(dY, W), dW by roles swapped."""
    x, w = node.input[:2]
    dy = dys[0]
    x_shape, w_shape = ctx.shape(x), ctx.shape(w)
    group = attr(node, "group", 1)
    win = _conv_transpose_window(ctx, node, x_shape, w_shape)
    if any(p < 0 for p in win.pads_begin + win.pads_end):
        raise StreamcError(
            f"ConvTranspose node {node.name!r}: its output_shape implies negative padding, "
            "which streamc cannot differentiate; use explicit pads and output_padding."
        )
    # Conv over dY with the ConvTranspose's weights gives dX.
    dx = ctx.op("Conv", dy, w, strides=list(win.strides), dilations=list(win.dilations),
                group=group, pads=list(win.pads_begin + win.pads_end))
    # ⟨dY, ConvT_W(X)⟩ = ⟨Conv_W(dY), X⟩: dW is the Conv weight gradient with input dY, cot X.
    dw = conv_weight_grad(ctx, dy, x, ctx.shape(node.output[0]), w_shape, win, group, like=w)
    db = None
    if _input(node, 2):
        db = ctx.reduce_sum(dy, [0, *range(2, len(x_shape))], keepdims=False)
    return [dx, dw, db]


def _pool_window(ctx, node) -> Window:
    x = node.input[0]
    return window(node, attr(node, "kernel_shape"), _spatial(ctx, x),
                  _spatial(ctx, node.output[0]))


def _window_sum_transpose(ctx, dy: str, x: str, win: Window) -> str:
    """Adjoint of a windowed sum (ones kernel, one group per channel)."""
    channels = ctx.shape(x)[1]
    ones = ctx.const(np.ones([channels, 1, *win.kernel]), like=x)
    return conv_input_grad(ctx, dy, ones, [channels, 1, *win.kernel], win, group=channels)


def _with_indices(ctx, node: onnx.NodeProto) -> onnx.NodeProto:
    """MaxPool rewritten so that it also outputs Indices (row-major, flattened over N·C·...)."""
    if len(node.output) > 1 and node.output[1]:
        if attr(node, "storage_order", 0):
            raise StreamcError(
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


def _window_counts(win: Window, axis: int, include_pad: bool) -> np.ndarray:
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
    include_pad = bool(attr(node, "count_include_pad", 0))
    for a in range(win.rank):
        counts = _window_counts(win, a, include_pad)
        if np.all(counts == counts[0]):
            dy = _scale(ctx, dy, 1.0 / counts[0], x)
        else:
            shape = [win.out_size[a]] + [1] * (win.rank - 1 - a)
            dy = ctx.op("Mul", dy, ctx.const((1.0 / counts).reshape(shape), like=x))
    return [_window_sum_transpose(ctx, dy, x, win)]


@vjp("LpPool")
def lp_pool(ctx, node, dys):
    """Y = (Σ|X|^p)^(1/p) per window: dX = X·|X|^(p−2) · Σ_windows dY·Y^(1−p)."""
    x, y, dy = node.input[0], node.output[0], dys[0]
    p = float(attr(node, "p", 2))
    win = _pool_window(ctx, node)
    if p == 1:
        return [ctx.op("Mul", ctx.op("Sign", x), _window_sum_transpose(ctx, dy, x, win))]
    per_window = ctx.op("Mul", dy, ctx.op("Pow", y, ctx.scalar(1.0 - p, y)))
    spread = _window_sum_transpose(ctx, per_window, x, win)
    local = x if p == 2 else ctx.op("Mul", x, ctx.op("Pow", ctx.op("Abs", x),
                                                     ctx.scalar(p - 2.0, x)))
    return [ctx.op("Mul", local, spread)]


# --------------------------------------------------------------------------------------------
# Resize / Upsample


def _source_coordinate(mode: str, j: np.ndarray, scale: float, n_in: int, n_out: int
                       ) -> np.ndarray:
    if mode == "half_pixel":
        return (j + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (j + 0.5) / scale - 0.5 if n_out > 1 else np.zeros_like(j, dtype=np.float64)
    if mode == "align_corners":
        return j * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros_like(j, dtype=np.float64)
    if mode == "asymmetric":
        return j / scale
    if mode == "tf_half_pixel_for_nn":
        return (j + 0.5) / scale
    if mode == "half_pixel_symmetric":
        adjustment = n_out / (scale * n_in)
        offset = n_in / 2 * (1 - adjustment)
        return offset + (j + 0.5) / scale - 0.5
    raise ValueError(mode)


def _nearest(x: np.ndarray, rounding: str) -> np.ndarray:
    if rounding == "round_prefer_floor":
        return np.ceil(x - 0.5)
    if rounding == "round_prefer_ceil":
        return np.floor(x + 0.5)
    if rounding == "floor":
        return np.floor(x)
    if rounding == "ceil":
        return np.ceil(x)
    raise ValueError(rounding)


def resize_matrix(mode: str, transform: str, rounding: str, n_in: int, n_out: int,
                  scale: float) -> np.ndarray:
    """The (n_out, n_in) matrix of a 1-D nearest or linear Resize along one axis."""
    j = np.arange(n_out, dtype=np.float64)
    source = _source_coordinate(transform, j, scale, n_in, n_out)
    matrix = np.zeros((n_out, n_in))
    if mode == "nearest":
        index = np.clip(_nearest(source, rounding), 0, n_in - 1).astype(np.int64)
        matrix[np.arange(n_out), index] = 1.0
        return matrix
    source = np.clip(source, 0, n_in - 1)
    low = np.floor(source).astype(np.int64)
    high = np.minimum(low + 1, n_in - 1)
    frac = source - low
    np.add.at(matrix, (np.arange(n_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def _resize_grad(ctx, node, dy: str, scales: Sequence[float] | None, mode: str, transform: str,
                 rounding: str) -> str:
    x, y = node.input[0], node.output[0]
    in_shape, out_shape = ctx.shape(x), ctx.shape(y)
    rank = len(in_shape)
    if mode not in ("nearest", "linear"):
        raise StreamcError(
            f"{node.op_type} node {node.name!r} uses mode {mode!r}; streamc differentiates "
            "nearest and linear resizing only."
        )
    block_axes, matrices = {}, {}
    for a in range(rank):
        n_in, n_out = in_shape[a], out_shape[a]
        scale = scales[a] if scales is not None else n_out / n_in
        matrix = resize_matrix(mode, transform, rounding, n_in, n_out, scale)
        if n_in == n_out and np.array_equal(matrix, np.eye(n_in)):
            continue
        factor = n_out // n_in
        if (mode == "nearest" and n_out == factor * n_in
                and np.array_equal(matrix, np.repeat(np.eye(n_in), factor, axis=0))):
            block_axes[a] = factor
        else:
            matrices[a] = matrix
    if block_axes:  # nearest by an integer factor: sum the f×f... blocks
        split_shape, summed = [], []
        for a in range(rank):
            if a in block_axes:
                split_shape += [in_shape[a], block_axes[a]]
                summed.append(len(split_shape) - 1)
            else:
                split_shape.append(out_shape[a])
        dy = ctx.reduce_sum(ctx.reshape(dy, split_shape), summed, keepdims=False)
    for a, matrix in matrices.items():  # any other separable map: a MatMul along the axis
        perm = [*range(a), *range(a + 1, rank), a]
        moved = dy if a == rank - 1 else ctx.op("Transpose", dy, perm=perm)
        moved = ctx.op("MatMul", moved, ctx.const(matrix, like=x))
        dy = moved if a == rank - 1 else ctx.op("Transpose", moved,
                                                perm=[int(i) for i in np.argsort(perm)])
    return dy


@vjp("Resize")
def resize(ctx, node, dys):
    x = node.input[0]
    if attr(node, "antialias", 0) or attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        raise StreamcError(
            f"Resize node {node.name!r} uses antialias or keep_aspect_ratio_policy; streamc does "
            "not differentiate them."
        )
    scales = ctx.value(_input(node, 2))
    scales = [float(s) for s in scales] if scales is not None and scales.size else None
    axes = attr(node, "axes")
    if scales is not None and axes is not None:
        full = [1.0] * ctx.rank(x)
        for axis, s in zip(axes, scales, strict=False):
            full[axis % ctx.rank(x)] = s
        scales = full
    transform = attr(node, "coordinate_transformation_mode", "half_pixel")
    if transform == "tf_crop_and_resize":
        raise StreamcError(
            f"Resize node {node.name!r} uses tf_crop_and_resize; streamc cannot differentiate it."
        )
    dx = _resize_grad(ctx, node, dys[0], scales, attr(node, "mode", "nearest"), transform,
                      attr(node, "nearest_mode", "round_prefer_floor"))
    return [dx, None, None, None]


@vjp("Upsample")
def upsample(ctx, node, dys):
    scales = attr(node, "scales")
    if scales is None:
        scales = ctx.require_value(node.input[1], "scales").tolist()
    mode = attr(node, "mode", "nearest")
    dx = _resize_grad(ctx, node, dys[0], [float(s) for s in scales],
                      "linear" if mode in ("linear", "bilinear") else mode, "asymmetric", "floor")
    return [dx, None]


#: Op type -> input slots holding trainable parameters (a constant operand of an Add is, in
#: addition, a trainable bias when the other operand comes from a MatMul: see
#: :meth:`VjpRule.trainable_slots`).
TRAINABLE_SLOTS: dict[str, tuple[int, ...]] = {
    op: slots for op, slots in trainable_slots_table().items() if op != "Add"
}
