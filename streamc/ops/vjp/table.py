"""The VJP table: one reverse-mode rule per ONNX op, written in standard ONNX ops.

Contract of a rule (``VjpRule.fn``)::

    fn(ctx: VjpContext, node: onnx.NodeProto, dys: list[str | None]) -> Sequence[str | None]

``dys`` holds one cotangent name per node output (None where the cotangent is zero; the driver
never calls a rule whose cotangents are all zero). The rule emits nodes through ``ctx``
(:class:`~streamc.ops.vjp.context.VjpContext`) and returns one cotangent per node input, None
where the input gets no gradient (integer inputs, shapes, axes...). A returned cotangent has the
input's shape, except in the slots listed in ``unbroadcast``: there it has the shape of output 0
and the driver sums the broadcast axes away. Rules may emit cotangents for inputs that do not
need them: the driver drops dead nodes.

Each rule also says which input slots hold trainable parameters (``trainable``; ``scales``: slots
where a constant of more than one element is a trainable per-channel scale or shift, as layer
scale and GroupNorm's affine Mul/Add, while a single value, ``x * 0.5``, stays a constant), so that
:func:`streamc.passes.autodiff.trainable_initializers` can find the weights of a model, and may
rewrite its forward node before the backward pass (``prepare``: MaxPool gains an Indices output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import onnx

from streamc.ops.facts import BIAS_AFTER
from streamc.ops.registry import OpTable

if TYPE_CHECKING:
    from streamc.ops.vjp.context import VjpContext

ALL_SLOTS = -1  # `unbroadcast=ALL_SLOTS`: every returned cotangent has the output's shape

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
    scales: tuple[int, ...] = ()

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
    scales: tuple[int, ...] = (),
    since: int = 1,
) -> Callable[[RuleFn], RuleFn]:
    """Decorator: register ``fn`` as the VJP rule of ``op_types``."""

    def decorate(fn: RuleFn) -> RuleFn:
        rule = VjpRule(fn, trainable, unbroadcast, prepare, trainable_if, scales)
        for op_type in op_types:
            VJP.add(op_type, rule, since=since)
        return fn

    return decorate


def trainable_slots_table() -> dict[str, tuple[int, ...]]:
    """Op type -> statically trainable input slots (Add after MatMul is decided per node)."""
    return {op: rule.trainable for op, rule in VJP.items() if rule.trainable}


def bias_after_matmul(node: onnx.NodeProto, producers: dict) -> tuple[int, ...]:
    """A constant Add operand is a trainable bias when the other operand comes from MatMul."""
    slots = []
    for slot, other in ((0, 1), (1, 0)):
        source = producers.get(node.input[other]) if other < len(node.input) else None
        if source is not None and source.op_type in BIAS_AFTER:
            slots.append(slot)
    return tuple(slots)
