"""Constant folding: the one folder that graph preparation and autodiff share.

:func:`constant_values` finds the value of every tensor that does not vary: initializers and
``Constant`` nodes, ``Shape`` of a statically shaped tensor, and nodes whose inputs are all
small constants (evaluated with ONNX's reference evaluator). :func:`inline_constants` then
replaces the nodes whose outputs are all known and small by initializers.

``protected`` tensors are never constants, and nothing computed from them is: autodiff protects
the tensors it differentiates, preparation the multi-element float initializers (weights that
may be trained, which folding would cut off from their gradient).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

from streamc.graph.load import dims, opset_version
from streamc.ops.attrs import attribute, constant_value, has_subgraph, is_default_domain
from streamc.ops.facts import NEVER_FOLD

#: Fold only what is this small (inputs evaluated, outputs inlined): folding is for shape
#: arithmetic, not for weights.
FOLD_LIMIT = 1 << 16


def constant_values(model: onnx.ModelProto, protected: Collection[str] = ()
                    ) -> dict[str, np.ndarray]:
    """Values of the constant tensors of ``model`` (see the module docstring)."""
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    opset = opset_version(model)
    values: dict[str, np.ndarray] = {
        i.name: numpy_helper.to_array(i) for i in graph.initializer if i.name not in protected}
    shapes = {vi.name: dims(vi) for vi in (*graph.input, *graph.value_info, *graph.output)}
    for node in graph.node:
        if not is_default_domain(node) or node.op_type in NEVER_FOLD:
            continue
        if all(o in values for o in node.output if o):
            continue
        if node.op_type == "Constant":
            value = constant_value(node)
            if value is not None and node.output[0] not in protected:
                values[node.output[0]] = value
            continue
        if node.op_type == "Shape":
            shape = shapes.get(node.input[0])
            if shape is not None and all(d is not None for d in shape):
                start, end = attribute(node, "start", 0), attribute(node, "end", None)
                values[node.output[0]] = np.array(shape[start:end], dtype=np.int64)
            continue
        inputs = [i for i in node.input if i]
        if (not inputs or any(i not in values for i in inputs) or has_subgraph(node)
                or sum(values[i].size for i in inputs) > FOLD_LIMIT):
            continue
        try:
            results = _evaluate(ReferenceEvaluator, node, {i: values[i] for i in inputs}, opset)
        except Exception:  # noqa: BLE001 - not foldable here: whoever needs it says so
            continue
        for name, value in zip(node.output, results):
            if name and name not in protected:
                values[name] = np.asarray(value)
    return values


def inline_constants(model: onnx.ModelProto, values: dict[str, np.ndarray]
                     ) -> tuple[onnx.ModelProto, bool]:
    """``model`` with every node whose outputs are all in ``values`` (and small, or a
    ``Constant``; and not graph outputs) replaced by initializers; returns (model, whether
    anything changed). The model is changed in place."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep, new_inits = [], []
    for node in graph.node:
        made = [o for o in node.output if o]
        small = node.op_type == "Constant" or all(
            o in values and values[o].size <= FOLD_LIMIT for o in made)
        if made and small and all(o in values for o in made) and outputs.isdisjoint(made):
            new_inits += [numpy_helper.from_array(np.asarray(values[o]), o) for o in made]
        else:
            keep.append(node)
    if not new_inits:
        return model, False
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(new_inits)
    return model, True


def drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """Remove initializers no node or output reads, and the inputs that only carried them."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    removed = {i.name for i in graph.initializer if i.name not in used}
    keep = [i for i in graph.initializer if i.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inputs = [vi for vi in graph.input if vi.name not in removed]
    del graph.input[:]
    graph.input.extend(inputs)


def _evaluate(evaluator_cls, node: onnx.NodeProto, const: dict[str, np.ndarray], opset: int
              ) -> list[np.ndarray]:
    inputs = [i for i in node.input if i]
    g = helper.make_graph(
        [node], "fold",
        [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(const[i].dtype),
                                       const[i].shape) for i in inputs],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None)
         for o in node.output if o],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    results = evaluator_cls(m).run(None, {i: const[i] for i in inputs})
    return [np.asarray(r) for r in results]
