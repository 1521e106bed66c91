"""The node emitter handed to VJP rules: static shapes, constant values, fresh names."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from streamc.errors import UnsupportedModelError

#: Unbroadcasting sums of at least this many float32 terms run in float64.
WIDE_SUM_MIN = 256


@dataclass(frozen=True)
class TensorType:
    """Static shape and element type of one tensor."""

    shape: tuple[int, ...]
    elem_type: int


class VjpContext:
    """What a VJP rule sees: static shapes, constant values and a node emitter.

    Rules call :meth:`op` to emit nodes (fresh output names are chosen here), :meth:`const` and
    :meth:`ints` for constants, :meth:`shape` / :meth:`dtype` / :meth:`value` to read the
    forward graph, and :meth:`unbroadcast` / :meth:`zeros` for common patterns.
    """

    def __init__(
        self,
        infos: dict[str, TensorType],
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
    def set_scope(self, scope: str | None) -> None:
        """Name the nodes emitted from now on after ``scope`` (a forward node), or none."""
        self._scope = scope or ""

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
    def info(self, name: str) -> TensorType:
        info = self.infos.get(name)
        if info is None:
            where = f" (read by node {node_label(self.node)})" if self.node is not None else ""
            raise UnsupportedModelError(
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
            raise UnsupportedModelError(
                f"Node {node_label(self.node)}: its {what} ({name!r}) must be a constant "
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
            self.initializers.append(tensor_proto(array, name))
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

    def unbroadcast(self, name: str, from_shape: Sequence[int], to_shape: Sequence[int],
                    elem_type: int = onnx.TensorProto.FLOAT) -> str:
        """Sum a cotangent of ``from_shape`` (element type ``elem_type``) down to the broadcast
        operand's ``to_shape``; a float32 sum of at least :data:`WIDE_SUM_MIN` terms runs in
        float64."""
        from_shape, to_shape = tuple(from_shape), tuple(to_shape)
        if from_shape == to_shape:
            return name
        lead = len(from_shape) - len(to_shape)
        axes = list(range(lead)) + [
            lead + i
            for i, dim in enumerate(to_shape)
            if dim == 1 and from_shape[lead + i] != 1
        ]
        count = math.prod(from_shape[a] for a in axes)
        if count >= WIDE_SUM_MIN and elem_type == onnx.TensorProto.FLOAT:
            # A per-channel gradient (PReLU slope, an affine scale or shift, a gate) summed
            # over the image: its terms cancel, and float32 sums lose up to 1e-3 of it.
            wide = self.op("Cast", name, to=onnx.TensorProto.DOUBLE)
            summed = self.op("Cast", self.reduce_sum(wide, axes, keepdims=True),
                             to=onnx.TensorProto.FLOAT)
        else:
            summed = self.reduce_sum(name, axes, keepdims=True)
        return self.reshape(summed, to_shape)

    def add_all(self, names: Sequence[str]) -> str:
        """The sum of several cotangents of the same shape."""
        if len(names) == 1:
            return names[0]
        if len(names) == 2:
            return self.op("Add", *names)
        return self.op("Sum", *names)


def tensor_proto(array: np.ndarray, name: str) -> onnx.TensorProto:
    """``numpy_helper.from_array`` for the plain numeric arrays VJP rules make, built directly."""
    if array.dtype.kind not in "biuf" or array.dtype == np.float16:
        return numpy_helper.from_array(array, name)
    return onnx.TensorProto(
        name=name,
        dims=array.shape,
        data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
        raw_data=np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes(),
    )


def node_label(node: onnx.NodeProto | None, index: int | None = None) -> str:
    if node is None:
        return "?"
    if node.name:
        return repr(node.name)
    where = f"#{index} " if index is not None else ""
    return f"{where}{node.op_type} producing {node.output[0]!r}"
