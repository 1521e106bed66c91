"""Which initializers of a model are trainable: those that feed a slot the VJP table marks
trainable (directly or through shape-only ops), or a trainable slot of an op that preparation
lowers into simpler ops (:data:`LOWERED_TRAINABLE_SLOTS`)."""

from __future__ import annotations

import math

import onnx

from streamc.ops.facts import FLOAT_TYPES, PASS_THROUGH
from streamc.ops.vjp.table import VJP

#: Trainable input slots of ops that :mod:`streamc.ops.lowering` rewrites before analysis
#: (the rewritten graph no longer shows them: the scale becomes a Mul operand).
LOWERED_TRAINABLE_SLOTS = {"InstanceNormalization": (1, 2), "GroupNormalization": (1, 2)}


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Float initializers that feed a slot marked trainable (weights, biases...).

    Conv/ConvTranspose W and B, BatchNormalization scale and bias, Gemm B and C, PRelu slope,
    LayerNormalization/InstanceNormalization/GroupNormalization scale and bias, a constant
    MatMul operand, the bias Add that follows a MatMul, and a per-channel (more than one
    element) Mul or Add constant: layer scale, GroupNorm's affine. BatchNormalization mean and
    variance, shape tensors and other constants are not trainable. Order: first use.
    """
    graph = model.graph
    sizes = {i.name: math.prod(i.dims) for i in graph.initializer if i.data_type in FLOAT_TYPES}
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, None] = {}
    for node in graph.node:
        rule = VJP.get(node.op_type, None, node.domain)
        slots = rule.trainable_slots(node, producers) if rule is not None else ()
        slots = slots or LOWERED_TRAINABLE_SLOTS.get(node.op_type, ())
        scales = rule.scales if rule is not None else ()
        for slot in sorted({*slots, *scales}):
            if slot >= len(node.input):
                continue
            source = node.input[slot]
            # Look through shape-only ops: torch feeds PReLU's slope through an Unsqueeze.
            while source in producers and producers[source].op_type in PASS_THROUGH:
                source = producers[source].input[0]
            if source in sizes and (slot in slots or sizes[source] > 1):
                found.setdefault(source)
    return list(found)
