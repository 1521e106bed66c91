"""Reverse-mode autodiff pass: emit a backward graph in standard ONNX ops.

Stock ONNX Runtime has no gradient operators, so :func:`build_backward` writes the backward pass
out of ordinary ONNX ops (opset >= 17) that any ONNX Runtime build can run. The per-op rules live
in :mod:`streamc.ops.vjp` (one table, ``VJP``); this module does the bookkeeping that is common
to every op:

* recompute the forward nodes that are needed (and only those),
* walk the forward nodes in reverse topological order, calling each node's VJP rule,
* sum fan-out (a tensor read by several nodes gets the sum of their cotangents),
* undo broadcasting (ReduceSum over broadcast axes, then Reshape),
* skip zero cotangents and tensors that do not depend on a ``wrt`` tensor,
* drop every emitted node that no requested output depends on (dead-code elimination).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx
from onnx import helper

from streamc.errors import UnsupportedModelError
from streamc.graph import FLOAT_TYPES, constant_values, dims, inline_constants, opset_version
from streamc.ops.attrs import captured_names, constant_value
from streamc.ops.vjp import VJP, TensorType, VjpContext, VjpRule
from streamc.ops.vjp.context import node_label
from streamc.ops.vjp.trainable import trainable_initializers

MIN_OPSET = 17

__all__ = ["BackwardGraph", "build_backward", "trainable_initializers"]


@dataclass
class BackwardGraph:
    """The result of :func:`build_backward`.

    ``model`` takes the forward graph's non-initializer inputs, then every ``wrt`` initializer
    (as a graph input of the same name), then one cotangent per forward output; it returns the
    gradients, then (with ``keep_outputs``) the forward outputs.
    """

    model: onnx.ModelProto
    cotangents: dict[str, str]  # forward output name -> input name of its cotangent in `model`
    gradients: dict[str, str]  # wrt tensor name -> output name of its gradient in `model`
    outputs: dict[str, str] = field(default_factory=dict)  # forward output -> output in `model`


def build_backward(
    model: onnx.ModelProto,
    wrt: Sequence[str],
    outputs: Sequence[str] | None = None,
    keep_outputs: bool = False,
    name: str = "backward",
) -> BackwardGraph:
    """Emit the graph computing ``Jᵀ·c`` of ``outputs`` with respect to the ``wrt`` tensors.

    ``model`` needs fully static shapes. ``wrt`` may name initializers, graph inputs or
    intermediate tensors; ``outputs`` defaults to all graph outputs. A ``wrt`` tensor that no
    output depends on gets a zero gradient.
    """
    model = _ready(model, protected=set(wrt))
    return _Differentiator(model, list(wrt), outputs, keep_outputs, name).run()


# --------------------------------------------------------------------------------------------
# The driver


class _Differentiator:
    def __init__(
        self,
        model: onnx.ModelProto,
        wrt: list[str],
        outputs: Sequence[str] | None,
        keep_outputs: bool,
        name: str,
    ) -> None:
        self.model = model
        self.graph = model.graph
        self.wrt = list(dict.fromkeys(wrt))
        self.outputs = list(outputs) if outputs is not None else [o.name for o in self.graph.output]
        self.keep_outputs = keep_outputs
        self.name = name
        self.opset = opset_version(model)
        self.types = _tensor_types(model)
        self.initializers = {i.name: i for i in self.graph.initializer}
        constants = constant_values(model, set(self.wrt))
        taken = set(self.types) | _all_names(self.graph)
        self.ctx = VjpContext(self.types, constants, taken, self.opset, prefix="grad")
        self.forward_nodes = list(self.graph.node)
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        self.contributions: dict[str, list[str]] = {}
        self.summed: dict[str, str] = {}

    def run(self) -> BackwardGraph:
        self._check_names()
        needs_grad = self._tensors_needing_grad()
        forward, rules = self._forward_nodes(needs_grad)
        cotangent_inputs = self._cotangent_inputs(needs_grad)
        self._backward_walk(forward, rules, needs_grad)
        ctx = self.ctx
        ctx.set_scope(None)
        gradient_outputs: dict[str, str] = {}
        output_values: list[onnx.ValueInfoProto] = []
        for w in self.wrt:
            grad = self._total(w)
            if grad is None:
                grad = ctx.zeros(ctx.shape(w), like=w)
            grad_name = ctx.unique(f"{w}_grad")
            ctx.nodes.append(helper.make_node("Identity", [grad], [grad_name], name=grad_name))
            gradient_outputs[w] = grad_name
            output_values.append(self._value_info(grad_name, w))
        forward_outputs = self._kept_outputs(gradient_outputs, output_values)
        inputs = [self._value_info(name, name) for name in self.graph_inputs]
        inputs += [self._value_info(w, w) for w in self.wrt if w in self.initializers]
        inputs += [self._value_info(cot, out) for out, cot in cotangent_inputs.items()]
        emitted = self._assemble(forward, inputs, output_values)
        return BackwardGraph(emitted, cotangent_inputs, gradient_outputs, forward_outputs)

    def _check_names(self) -> None:
        producers = {out for node in self.forward_nodes for out in node.output}
        known = producers | set(self.graph_inputs) | set(self.initializers)
        for w in self.wrt:
            if w not in known:
                raise UnsupportedModelError(
                    f"build_backward: wrt tensor {w!r} is not an input, initializer or node "
                    "output of the model; check the name."
                )
        for out in self.outputs:
            if out not in known:
                raise UnsupportedModelError(
                    f"build_backward: output {out!r} is not produced by the model; check the name."
                )

    def _forward_nodes(self, needs_grad: set[str]
                       ) -> tuple[list[onnx.NodeProto], dict[int, VjpRule]]:
        """The forward nodes, rewritten where a rule asks (MaxPool gains an Indices output),
        and the rule of each node on a path to a differentiated tensor."""
        forward: list[onnx.NodeProto] = []
        rules: dict[int, VjpRule] = {}
        for index, node in enumerate(self.forward_nodes):
            if any(o in needs_grad for o in node.output):
                rule = VJP.lookup(node.op_type, self.opset, node.domain, node_label(node, index))
                rules[index] = rule
                if rule.prepare is not None:
                    self.ctx.node = node
                    node = rule.prepare(self.ctx, node)
            forward.append(node)
        return forward, rules

    def _cotangent_inputs(self, needs_grad: set[str]) -> dict[str, str]:
        cotangent_inputs: dict[str, str] = {}
        for out in self.outputs:
            if out in cotangent_inputs:
                continue
            cot = self.ctx.unique(f"{out}_cotangent")
            cotangent_inputs[out] = cot
            if out in needs_grad:
                self.contributions.setdefault(out, []).append(cot)
        return cotangent_inputs

    def _total(self, tensor: str) -> str | None:
        """The summed cotangent of ``tensor`` (None when it gets none)."""
        if tensor not in self.summed:
            parts = self.contributions.get(tensor, [])
            if not parts:
                return None
            self.ctx.set_scope(None)
            self.summed[tensor] = self.ctx.add_all(parts)
        return self.summed[tensor]

    def _backward_walk(self, forward: list[onnx.NodeProto], rules: dict[int, VjpRule],
                       needs_grad: set[str]) -> None:
        ctx = self.ctx
        for index in reversed(range(len(forward))):
            node = forward[index]
            if index not in rules:
                continue
            cots = [self._total(o) if o in needs_grad else None for o in node.output]
            if all(c is None for c in cots):
                continue
            ctx.node = node
            ctx.set_scope(node.name or f"{node.op_type}_{index}")
            # Rules may list cotangents for optional inputs the node omits: drop those.
            input_cots = list(rules[index].fn(ctx, node, cots))[: len(node.input)]
            out_type = self.types.get(node.output[0])
            for slot, (tensor, cot) in enumerate(zip(node.input, input_cots, strict=False)):
                if cot is None or not tensor or tensor not in needs_grad:
                    continue
                if rules[index].unbroadcasts(slot) and out_type is not None:
                    cot = ctx.unbroadcast(cot, out_type.shape, ctx.shape(tensor), ctx.dtype(tensor))
                self.contributions.setdefault(tensor, []).append(cot)
        ctx.node = None

    def _kept_outputs(self, gradient_outputs: dict[str, str],
                      output_values: list[onnx.ValueInfoProto]) -> dict[str, str]:
        forward_outputs: dict[str, str] = {}
        if not self.keep_outputs:
            return forward_outputs
        for out in self.outputs:
            if out in forward_outputs:
                continue
            if out in self.graph_inputs or out in self.initializers or out in gradient_outputs:
                kept = self.ctx.unique(out)
                self.ctx.nodes.append(helper.make_node("Identity", [out], [kept], name=kept))
            else:
                kept = out
            forward_outputs[out] = kept
            output_values.append(self._value_info(kept, out))
        return forward_outputs

    def _assemble(self, forward: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto],
                  outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
        nodes, used = live_nodes(forward + self.ctx.nodes, [v.name for v in outputs])
        initializers = [
            init
            for init in list(self.graph.initializer) + self.ctx.initializers
            if init.name in used and init.name not in self.wrt
        ]
        # make_graph + make_model would copy every node twice; fill the model in place.
        emitted = onnx.ModelProto(ir_version=self.model.ir_version, producer_name="streamc")
        emitted.opset_import.extend(self.model.opset_import)
        graph = emitted.graph
        graph.node.extend(nodes)
        graph.name = self.name
        graph.input.extend(inputs)
        graph.output.extend(outputs)
        graph.initializer.extend(initializers)
        return emitted

    def _tensors_needing_grad(self) -> set[str]:
        """Float tensors that depend on a wrt tensor (through a node's inputs or through the
        outer-scope tensors its subgraphs read)."""
        needs = set(self.wrt)
        for node in self.forward_nodes:
            reads = itertools.chain(node.input, captured_names(node))
            if any(i in needs for i in reads if i):
                for out in node.output:
                    kind = self.types.get(out)
                    if out and (kind is None or kind.elem_type in FLOAT_TYPES):
                        needs.add(out)
        return needs

    def _value_info(self, name: str, like: str) -> onnx.ValueInfoProto:
        kind = self.ctx.info(like)
        return helper.make_tensor_value_info(name, kind.elem_type, list(kind.shape))


# --------------------------------------------------------------------------------------------
# Helpers


def _ready(model: onnx.ModelProto, protected: set[str]) -> onnx.ModelProto:
    """Upgrade to opset >= 17 when needed, fold shape computations, infer static shapes.

    Nothing that depends on a ``protected`` (wrt) tensor is folded.
    """
    if opset_version(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:  # the converter raises plain RuntimeErrors
            raise UnsupportedModelError(
                f"could not upgrade the model from opset {opset_version(model)} to "
                f"{MIN_OPSET} ({error}); re-export it with opset_version >= {MIN_OPSET}."
            ) from None
    for _ in range(8):  # folding a chain can make more shapes static, which folds more
        model = _infer_shapes(model)
        model, changed = inline_constants(model, constant_values(model, protected))
        if not changed:
            return model
    return _infer_shapes(model)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:  # noqa: BLE001 - onnx raises several unrelated types
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UnsupportedModelError(
            f"ONNX shape inference failed on the model ({first}); export it with static shapes."
        ) from None


def _tensor_types(model: onnx.ModelProto) -> dict[str, TensorType]:
    types: dict[str, TensorType] = {}
    graph = model.graph
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        shape = dims(value)
        if shape is not None and all(d is not None for d in shape):
            types[value.name] = TensorType(shape, value.type.tensor_type.elem_type)
    for init in graph.initializer:
        types[init.name] = TensorType(tuple(init.dims), init.data_type)
    for node in graph.node:
        if node.op_type == "Constant":
            array = constant_value(node)
            if array is not None:
                types[node.output[0]] = TensorType(
                    array.shape, helper.np_dtype_to_tensor_dtype(array.dtype))
    return types


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    names |= {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def live_nodes(
    nodes: list[onnx.NodeProto], outputs: Sequence[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes some output depends on, in their original (topological) order, and the names
    they read (with ``outputs``; a node's subgraphs' outer-scope reads included)."""
    wanted = set(outputs)
    live = []
    for node in reversed(nodes):
        if not wanted.isdisjoint(node.output):
            live.append(node)
            wanted.update(node.input)
            wanted.update(captured_names(node))
    live.reverse()
    return live, wanted
