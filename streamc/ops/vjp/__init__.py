"""The VJP table (:data:`VJP`): one reverse-mode rule per ONNX op, in standard ONNX ops.

The table and its contract are in :mod:`streamc.ops.vjp.table`, the emitter rules write with in
:mod:`streamc.ops.vjp.context`; the rules themselves are grouped by op family in the other
modules of this package, which register into the table when imported here.
"""

from streamc.ops.vjp import conv, elementwise, pointwise, pool, reduce, resize, shape
from streamc.ops.vjp.context import TensorType, VjpContext
from streamc.ops.vjp.table import ALL_SLOTS, VJP, VjpRule, trainable_slots_table, vjp

__all__ = [
    "ALL_SLOTS",
    "VJP",
    "TensorType",
    "VjpContext",
    "VjpRule",
    "conv",
    "elementwise",
    "pointwise",
    "pool",
    "reduce",
    "resize",
    "shape",
    "trainable_slots_table",
    "vjp",
]
