"""The op tables in streamc/ops agree with each other and with ONNX's own operator schemas.

Every per-op fact lives in one table in ``streamc/ops``; these tests fail when one table knows
an op that another one that must know it lacks, or names an op or slot ONNX does not have.
"""

from __future__ import annotations

import onnx
import pytest
from onnx import defs

from streamc.ops import facts
from streamc.ops.flops import FLOPS
from streamc.ops.locality import LOCALITY
from streamc.ops.memory import ALIAS_OPS, INPLACE_OPS, SAVED, WORKSPACE
from streamc.ops.registry import OpTable
from streamc.ops.vjp import VJP, trainable_slots_table

TABLES: dict[str, OpTable] = {"locality": LOCALITY, "VJP": VJP, "saved": SAVED,
                              "FLOP": FLOPS, "workspace": WORKSPACE}
SETS = {"ALIAS_OPS": ALIAS_OPS, "INPLACE_OPS": INPLACE_OPS, "NEVER_FOLD": facts.NEVER_FOLD,
        "PASS_THROUGH": facts.PASS_THROUGH, "CEIL_MODE_POOLS": facts.CEIL_MODE_POOLS,
        "BIAS_AFTER": facts.BIAS_AFTER, "ALIAS_NODES": facts.ALIAS_NODES,
        "IDENTITY_OUTPUT_UNSAFE_READERS": facts.IDENTITY_OUTPUT_UNSAFE_READERS,
        "BUFFER_SLOTS": {op for op, _ in facts.BUFFER_SLOTS}}


def test_every_local_op_has_a_vjp_rule() -> None:
    missing = sorted(set(LOCALITY.op_types()) - set(VJP.op_types()))
    assert not missing, f"ops with a locality rule but no VJP rule: {missing}"


def test_saved_covers_exactly_the_differentiable_ops() -> None:
    vjp, saved = set(VJP.op_types()), set(SAVED.op_types())
    assert not vjp - saved, f"VJP rules without a saved-for-backward rule: {sorted(vjp - saved)}"
    assert not saved - vjp, f"saved-for-backward rules of ops autodiff cannot differentiate: " \
                            f"{sorted(saved - vjp)}"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_table_ops_are_onnx_ops(name: str) -> None:
    unknown = [op for op in TABLES[name].op_types() if not defs.has(op)]
    assert not unknown, f"the {name} table names ops ONNX does not define: {unknown}"


@pytest.mark.parametrize("name", sorted(SETS))
def test_fact_sets_name_onnx_ops(name: str) -> None:
    unknown = sorted(op for op in SETS[name] if not defs.has(op))
    assert not unknown, f"{name} names ops ONNX does not define: {unknown}"


def test_trainable_slots_are_float_inputs_of_their_op() -> None:
    table = trainable_slots_table()
    assert table, "no VJP rule declares a trainable slot"
    for op, slots in table.items():
        schema = defs.get_schema(op)
        for slot in slots:
            assert slot < len(schema.inputs), (op, slot)
            constraint = schema.inputs[slot].type_str
            allowed = next((c.allowed_type_strs for c in schema.type_constraints
                            if c.type_param_str == constraint), [constraint])
            assert "tensor(float)" in allowed, (op, slot, allowed)


def test_trainable_slots_of_the_layers_torch_exports() -> None:
    table = trainable_slots_table()
    expected = {"Conv": (1, 2), "ConvTranspose": (1, 2), "BatchNormalization": (1, 2),
                "Gemm": (1, 2), "PRelu": (1,), "MatMul": (1,)}
    assert {op: table.get(op) for op in expected} == expected
    # BatchNorm's running statistics are buffers, not trainable.
    assert not set(table["BatchNormalization"]) & {s for op, s in facts.BUFFER_SLOTS
                                                   if op == "BatchNormalization"}


def test_inplace_and_alias_ops_have_one_output_shape_rule() -> None:
    # A view or an in-place write shares input 0's buffer: such an op must have an input 0.
    for op in ALIAS_OPS | INPLACE_OPS:
        assert defs.get_schema(op).inputs, op


def test_registry_names_the_table_op_and_node() -> None:
    node = onnx.helper.make_node("LRN", ["x"], ["y"], name="the_lrn", size=3)
    with pytest.raises(Exception, match=r"VJP rule for op LRN.*'the_lrn'"):
        VJP.lookup(node.op_type, 17, node.domain, node.name)
