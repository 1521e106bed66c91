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

import copy
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from streamc.errors import StreamcError
from streamc.ops.vjp import VJP, VjpRule

MIN_OPSET = 17

FLOAT_TYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
)


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


@dataclass(frozen=True)
class TensorInfo:
    """Static shape and element type of one tensor."""

    shape: tuple[int, ...]
    elem_type: int


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
    model = _prepare(model, protected=set(wrt))
    return _Differentiator(model, list(wrt), outputs, keep_outputs, name).run()


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Float initializers that feed a slot the VJP table marks trainable (weights, biases...).

    Conv/ConvTranspose W and B, BatchNormalization scale and bias, Gemm B and C, PRelu slope, a
    constant MatMul operand and the bias Add that follows a MatMul. BatchNormalization mean and
    variance, shape tensors and other constants are not trainable. Order: first use in the graph.
    """
    graph = model.graph
    floats = {i.name for i in graph.initializer if i.data_type in FLOAT_TYPES}
    producers = {out: node for node in graph.node for out in node.output}
    found: dict[str, None] = {}
    for node in graph.node:
        rule = VJP.get(node.op_type, None, node.domain)
        if rule is None:
            continue
        for slot in rule.trainable_slots(node, producers):
            if slot >= len(node.input):
                continue
            source = node.input[slot]
            # Look through shape-only ops: torch feeds PReLU's slope through an Unsqueeze.
            while source in producers and producers[source].op_type in _PASS_THROUGH:
                source = producers[source].input[0]
            if source in floats:
                found.setdefault(source)
    return list(found)


_PASS_THROUGH = frozenset(
    {"Unsqueeze", "Squeeze", "Reshape", "Flatten", "Identity", "Cast", "Transpose", "Expand"}
)


# --------------------------------------------------------------------------------------------
# The builder handed to VJP rules


class VjpContext:
    """What a VJP rule sees: static shapes, constant values and a node emitter.

    Rules call :meth:`op` to emit nodes (fresh output names are chosen here), :meth:`const` and
    :meth:`ints` for constants, :meth:`shape` / :meth:`dtype` / :meth:`value` to read the
    forward graph, and :meth:`unbroadcast` / :meth:`zeros` for common patterns.
    """

    def __init__(
        self,
        infos: dict[str, TensorInfo],
        constants: dict[str, np.ndarray],
        taken: set[str],
        opset: int,
        prefix: str,
    ) -> None:
        self.infos = infos
        self.constants = constants
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = taken
        self._prefix = prefix
        self._scope = ""
        self._const_cache: dict[tuple, str] = {}
        self._ints_cache: dict[tuple[int, ...], str] = {}
        self._attr_cache: dict[tuple, onnx.AttributeProto] = {}
        self._counter = itertools.count()
        self.node: onnx.NodeProto | None = None

    # -- naming ----------------------------------------------------------------------------
    def fresh(self, hint: str) -> str:
        """A tensor name not used anywhere in the graph, scoped under the current node."""
        base = f"{self._prefix}/{self._scope}/{hint}" if self._scope else f"{self._prefix}/{hint}"
        return self.unique(base)

    def unique(self, base: str) -> str:
        """``base``, or ``base_<k>`` when ``base`` is taken."""
        name = base
        while name in self._taken:
            name = f"{base}_{next(self._counter)}"
        self._taken.add(name)
        return name

    # -- reading the forward graph -----------------------------------------------------------
    def info(self, name: str) -> TensorInfo:
        info = self.infos.get(name)
        if info is None:
            where = f" (read by node {_node_label(self.node)})" if self.node is not None else ""
            raise StreamcError(
                f"The shape of tensor {name!r}{where} is unknown or not static; export the model "
                "with fixed input shapes and run onnx.shape_inference before differentiating."
            )
        return info

    def shape(self, name: str) -> tuple[int, ...]:
        """Static shape of a forward tensor."""
        return self.info(name).shape

    def rank(self, name: str) -> int:
        return len(self.shape(name))

    def dtype(self, name: str) -> int:
        """ONNX element type (``TensorProto.FLOAT``...) of a forward tensor."""
        return self.info(name).elem_type

    def value(self, name: str) -> np.ndarray | None:
        """The value of a constant tensor (initializer or Constant output), else None."""
        if not name:
            return None
        return self.constants.get(name)

    def require_value(self, name: str, what: str) -> np.ndarray:
        """Like :meth:`value`, but raise a sentence naming the node when it is not constant."""
        value = self.value(name)
        if value is None:
            raise StreamcError(
                f"Node {_node_label(self.node)}: its {what} ({name!r}) must be a constant "
                "to differentiate it; fold the shape computation (onnx-simplifier or "
                "do_constant_folding=True) and retry."
            )
        return value

    # -- emitting --------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str | None, outputs: int = 1, **attrs) -> str:
        """Emit one node; return its output name (or a list of names when ``outputs`` > 1)."""
        name = self.fresh(op_type)
        names = [name] + [self.fresh(op_type) for _ in range(outputs - 1)]
        # Tensor and node names live in separate namespaces; the first output's fresh name is
        # unique among the nodes too.
        node = onnx.NodeProto(
            op_type=op_type, input=[i or "" for i in inputs], output=names, name=name,
            attribute=[self._attribute(k, v) for k, v in sorted(attrs.items()) if v is not None]
            if attrs else None,
        )
        self.nodes.append(node)
        return name if outputs == 1 else names  # type: ignore[return-value]

    def _attribute(self, key: str, value) -> onnx.AttributeProto:
        """``helper.make_attribute``, cached for the int and int-list values rules repeat."""
        if isinstance(value, list):  # types in the key: 1 == 1.0 == True, INTS != FLOATS
            cache_key = (key, tuple(value), tuple(map(type, value)))
        elif isinstance(value, (int, float, str)):
            cache_key = (key, value, type(value))
        else:
            return helper.make_attribute(key, value)
        attribute = self._attr_cache.get(cache_key)
        if attribute is None:
            attribute = self._attr_cache[cache_key] = helper.make_attribute(key, value)
        return attribute

    def ops(self, op_type: str, *inputs: str | None, outputs: int, **attrs) -> list[str]:
        """Emit one node with several outputs; return their names."""
        if outputs == 1:
            return [self.op(op_type, *inputs, **attrs)]
        return self.op(op_type, *inputs, outputs=outputs, **attrs)  # type: ignore[return-value]

    def const(self, value, dtype: int | None = None, like: str | None = None) -> str:
        """An initializer holding ``value`` (element type ``dtype`` or that of tensor ``like``)."""
        if like is not None:
            dtype = self.dtype(like)
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype) if dtype is not None else None
        array = np.asarray(value, dtype=np_dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        name = self._const_cache.get(key)
        if name is None:
            name = self._const_cache[key] = self.fresh("const")
            self.initializers.append(_tensor(array, name))
        return name

    def ints(self, values: Sequence[int]) -> str:
        """A 1-D int64 constant (shapes, axes, pads, starts...)."""
        key = tuple(values)
        name = self._ints_cache.get(key)
        if name is None:
            name = self._ints_cache[key] = self.const(np.array(key, dtype=np.int64))
        return name

    def scalar(self, value: float, like: str) -> str:
        """A scalar constant with the element type of tensor ``like``."""
        return self.const(value, like=like)

    def zeros(self, shape: Sequence[int], like: str) -> str:
        """A zero tensor of ``shape`` with the element type of ``like`` (ConstantOfShape)."""
        zero = numpy_helper.from_array(
            np.zeros(1, dtype=helper.tensor_dtype_to_np_dtype(self.dtype(like)))
        )
        return self.op("ConstantOfShape", self.ints(shape), value=zero)

    def reshape(self, name: str, shape: Sequence[int]) -> str:
        return self.op("Reshape", name, self.ints(shape))

    def reduce_sum(self, name: str, axes: Sequence[int], keepdims: bool = True) -> str:
        if not axes:
            return name
        return self.op("ReduceSum", name, self.ints(axes), keepdims=int(keepdims))

    def unbroadcast(self, name: str, from_shape: Sequence[int], to_shape: Sequence[int]) -> str:
        """Sum a cotangent of ``from_shape`` down to the broadcast operand's ``to_shape``."""
        from_shape, to_shape = tuple(from_shape), tuple(to_shape)
        if from_shape == to_shape:
            return name
        lead = len(from_shape) - len(to_shape)
        axes = list(range(lead)) + [
            lead + i
            for i, dim in enumerate(to_shape)
            if dim == 1 and from_shape[lead + i] != 1
        ]
        summed = self.reduce_sum(name, axes, keepdims=True)
        return self.reshape(summed, to_shape)

    def add_all(self, names: Sequence[str]) -> str:
        """The sum of several cotangents of the same shape."""
        if len(names) == 1:
            return names[0]
        if len(names) == 2:
            return self.op("Add", *names)
        return self.op("Sum", *names)


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
        self.opset = _default_opset(model)
        self.infos = _tensor_infos(model)
        self.initializers = {i.name: i for i in self.graph.initializer}
        self.constants = _fold_constants(self.graph, self.infos, set(self.wrt))
        taken = set(self.infos) | _all_names(self.graph)
        self.ctx = VjpContext(self.infos, self.constants, taken, self.opset, prefix="grad")
        self.forward_nodes = list(self.graph.node)

    def run(self) -> BackwardGraph:
        ctx = self.ctx
        producers = {out: node for node in self.forward_nodes for out in node.output}
        graph_inputs = [i.name for i in self.graph.input if i.name not in self.initializers]
        known = set(producers) | set(graph_inputs) | set(self.initializers)
        for w in self.wrt:
            if w not in known:
                raise StreamcError(
                    f"build_backward: wrt tensor {w!r} is not an input, initializer or node "
                    "output of the model; check the name."
                )
        for out in self.outputs:
            if out not in known:
                raise StreamcError(
                    f"build_backward: output {out!r} is not produced by the model; check the name."
                )

        needs_grad = self._tensors_needing_grad()

        # Forward nodes, possibly rewritten (MaxPool gains an Indices output).
        forward: list[onnx.NodeProto] = []
        rules: dict[int, VjpRule] = {}
        for index, node in enumerate(self.forward_nodes):
            if any(o in needs_grad for o in node.output):
                rule = VJP.lookup(node.op_type, self.opset, node.domain, _node_label(node, index))
                rules[index] = rule
                if rule.prepare is not None:
                    ctx.node = node
                    node = rule.prepare(ctx, node)
            forward.append(node)

        cotangent_inputs: dict[str, str] = {}
        contributions: dict[str, list[str]] = {}
        for out in self.outputs:
            if out in cotangent_inputs:
                continue
            cot = ctx.unique(f"{out}_cotangent")
            cotangent_inputs[out] = cot
            if out in needs_grad:
                contributions.setdefault(out, []).append(cot)

        summed: dict[str, str] = {}

        def total(tensor: str) -> str | None:
            if tensor not in summed:
                parts = contributions.get(tensor, [])
                if not parts:
                    return None
                ctx._scope = ""
                summed[tensor] = ctx.add_all(parts)
            return summed[tensor]

        for index in reversed(range(len(forward))):
            node = forward[index]
            if index not in rules:
                continue
            cots = [total(o) if o in needs_grad else None for o in node.output]
            if all(c is None for c in cots):
                continue
            ctx.node = node
            ctx._scope = node.name or f"{node.op_type}_{index}"
            # Rules may list cotangents for optional inputs the node omits: drop those.
            input_cots = list(rules[index].fn(ctx, node, cots))[: len(node.input)]
            out_shape = self.infos[node.output[0]].shape if node.output[0] in self.infos else None
            for slot, (tensor, cot) in enumerate(zip(node.input, input_cots, strict=False)):
                if cot is None or not tensor or tensor not in needs_grad:
                    continue
                if rules[index].unbroadcasts(slot) and out_shape is not None:
                    cot = ctx.unbroadcast(cot, out_shape, ctx.shape(tensor))
                contributions.setdefault(tensor, []).append(cot)

        ctx._scope = ""
        ctx.node = None
        gradient_outputs: dict[str, str] = {}
        output_values: list[onnx.ValueInfoProto] = []
        for w in self.wrt:
            grad = total(w)
            if grad is None:
                grad = ctx.zeros(ctx.shape(w), like=w)
            grad_name = ctx.unique(f"{w}_grad")
            ctx.nodes.append(helper.make_node("Identity", [grad], [grad_name], name=grad_name))
            gradient_outputs[w] = grad_name
            output_values.append(self._value_info(grad_name, w))

        forward_outputs: dict[str, str] = {}
        if self.keep_outputs:
            for out in self.outputs:
                if out in forward_outputs:
                    continue
                if out in graph_inputs or out in self.initializers or out in gradient_outputs:
                    kept = ctx.unique(out)
                    ctx.nodes.append(helper.make_node("Identity", [out], [kept], name=kept))
                else:
                    kept = out
                forward_outputs[out] = kept
                output_values.append(self._value_info(kept, out))

        inputs = [self._value_info(name, name) for name in graph_inputs]
        inputs += [
            self._value_info(w, w) for w in self.wrt if w in self.initializers
        ]
        inputs += [self._value_info(cot, out) for out, cot in cotangent_inputs.items()]

        nodes, used = _live_nodes(forward + ctx.nodes, [v.name for v in output_values])
        initializers = [
            init
            for init in list(self.graph.initializer) + ctx.initializers
            if init.name in used and init.name not in self.wrt
        ]
        # make_graph + make_model would copy every node twice; fill the model in place.
        emitted = onnx.ModelProto(ir_version=self.model.ir_version, producer_name="streamc")
        emitted.opset_import.extend(self.model.opset_import)
        graph = emitted.graph
        graph.node.extend(nodes)
        graph.name = self.name
        graph.input.extend(inputs)
        graph.output.extend(output_values)
        graph.initializer.extend(initializers)
        return BackwardGraph(emitted, cotangent_inputs, gradient_outputs, forward_outputs)

    def _tensors_needing_grad(self) -> set[str]:
        """Float tensors that depend on a wrt tensor."""
        needs = set(self.wrt)
        for node in self.forward_nodes:
            if any(i in needs for i in node.input if i):
                for out in node.output:
                    info = self.infos.get(out)
                    if out and (info is None or info.elem_type in FLOAT_TYPES):
                        needs.add(out)
        return needs

    def _value_info(self, name: str, like: str) -> onnx.ValueInfoProto:
        info = self.ctx.info(like)
        return helper.make_tensor_value_info(name, info.elem_type, list(info.shape))


# --------------------------------------------------------------------------------------------
# Helpers


def _prepare(model: onnx.ModelProto, protected: set[str]) -> onnx.ModelProto:
    """Upgrade to opset >= 17 when needed, fold shape computations, infer static shapes.

    Nothing that depends on a ``protected`` (wrt) tensor is folded.
    """
    if _default_opset(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:  # the converter raises plain RuntimeErrors
            raise StreamcError(
                f"Could not upgrade the model from opset {_default_opset(model)} to "
                f"{MIN_OPSET} ({error}); re-export it with opset_version >= {MIN_OPSET}."
            ) from error
    for _ in range(8):  # folding a chain can make more shapes static, which folds more
        model = _infer_shapes(model)
        folded = _fold_constants(model.graph, _tensor_infos(model), protected)
        model, changed = _inline_folded(model, folded)
        if not changed:
            return model
    return _infer_shapes(model)


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as error:
        raise StreamcError(
            f"ONNX shape inference failed on the model ({error}); export it with static shapes."
        ) from error


def _inline_folded(
    model: onnx.ModelProto, values: dict[str, np.ndarray]
) -> tuple[onnx.ModelProto, bool]:
    """Replace nodes whose outputs were all folded (and are small) by initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    keep, new_inits = [], []
    for node in graph.node:
        foldable = (
            node.op_type != "Constant"
            and node.output
            and all(o in values and values[o].size <= FOLD_LIMIT for o in node.output if o)
            and not any(o in outputs for o in node.output)
        )
        if foldable:
            new_inits += [numpy_helper.from_array(values[o], o) for o in node.output if o]
        else:
            keep.append(node)
    if not new_inits:
        return model, False
    model = copy.deepcopy(model)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    model.graph.initializer.extend(new_inits)
    return model, True


def _default_opset(model: onnx.ModelProto) -> int:
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return opset.version
    return MIN_OPSET


def _tensor_infos(model: onnx.ModelProto) -> dict[str, TensorInfo]:
    infos: dict[str, TensorInfo] = {}
    graph = model.graph
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            continue
        dims = tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            infos[value.name] = TensorInfo(tuple(d.dim_value for d in dims), tensor_type.elem_type)
    for init in graph.initializer:
        infos[init.name] = TensorInfo(tuple(init.dims), init.data_type)
    for node in graph.node:
        if node.op_type == "Constant":
            array = _constant_node_value(node)
            if array is not None:
                infos[node.output[0]] = TensorInfo(
                    array.shape, helper.np_dtype_to_tensor_dtype(array.dtype)
                )
    return infos


def _constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            array = _constant_node_value(node)
            if array is not None:
                values[node.output[0]] = array
    return values


FOLD_LIMIT = 1 << 16  # fold nodes whose constant inputs hold at most this many elements


def _fold_constants(
    graph: onnx.GraphProto, infos: dict[str, TensorInfo], protected: set[str]
) -> dict[str, np.ndarray]:
    """Constant values, including small shape computations (Shape of a static tensor, and any
    node whose inputs are all small constants) evaluated with the ONNX reference evaluator.
    ``protected`` tensors (the wrt tensors) and what depends on them are not constants."""
    from onnx.reference import ReferenceEvaluator

    values = {k: v for k, v in _constant_values(graph).items() if k not in protected}
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or all(o in values for o in node.output):
            continue
        if node.op_type == "Shape" and node.input[0] in infos:
            shape = np.asarray(infos[node.input[0]].shape, dtype=np.int64)
            rank = len(shape)
            start, end = _attr_int(node, "start", 0), _attr_int(node, "end", rank)
            values[node.output[0]] = shape[start:end]
            continue
        inputs = [i for i in node.input if i]
        if node.op_type in _NOT_FOLDABLE or not inputs or any(i not in values for i in inputs):
            continue
        if sum(values[i].size for i in inputs) > FOLD_LIMIT or node.attribute and any(
            a.type == onnx.AttributeProto.GRAPH for a in node.attribute
        ):
            continue
        try:
            results = ReferenceEvaluator(node).run(None, {i: values[i] for i in inputs})
        except Exception:  # not foldable here: the rule that needs it will say so
            continue
        for name, value in zip(node.output, results, strict=False):
            if name:
                values[name] = np.asarray(value)
    return values


_NOT_FOLDABLE = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike",
                           "RandomUniformLike", "Multinomial", "Bernoulli", "Dropout"})


def _attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.asarray(helper.get_attribute_value(attr))
        if attr.name in ("value_floats", "value_ints"):
            return np.asarray(list(helper.get_attribute_value(attr)))
    return None


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in itertools.chain(graph.input, graph.output, graph.value_info)}
    names |= {i.name for i in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        names.add(node.name)
    return names


def _live_nodes(
    nodes: list[onnx.NodeProto], outputs: Sequence[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes some output depends on, in their original (topological) order, and the names
    they read (with ``outputs``)."""
    wanted = set(outputs)
    live = []
    for node in reversed(nodes):
        if not wanted.isdisjoint(node.output):
            live.append(node)
            wanted.update(node.input)
    live.reverse()
    return live, wanted


def _tensor(array: np.ndarray, name: str) -> onnx.TensorProto:
    """``numpy_helper.from_array`` for the plain numeric arrays VJP rules make, built directly."""
    if array.dtype.kind not in "biuf" or array.dtype == np.float16:
        return numpy_helper.from_array(array, name)
    return onnx.TensorProto(
        name=name,
        dims=array.shape,
        data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
        raw_data=np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes(),
    )


def _node_label(node: onnx.NodeProto | None, index: int | None = None) -> str:
    if node is None:
        return "?"
    if node.name:
        return repr(node.name)
    where = f"#{index} " if index is not None else ""
    return f"{where}{node.op_type} producing {node.output[0]!r}"
