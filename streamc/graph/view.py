"""The read-only view every analysis and pass works on: nodes by name, producers, consumers,
shapes, constants and a networkx DAG of node names."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from streamc.graph.load import dims, opset_version


class InitializerArrays(Mapping[str, np.ndarray]):
    """Initializers by name, converted to numpy on first access (a ResNet-50's 100 MB of
    weights need not be copied to find the few small constants a pass reads)."""

    def __init__(self, initializers: Iterable[onnx.TensorProto]) -> None:
        self._protos = {i.name: i for i in initializers}
        self._arrays: dict[str, np.ndarray] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        array = self._arrays.get(name)
        if array is None:
            array = self._arrays[name] = numpy_helper.to_array(self._protos[name])
        return array

    def __contains__(self, name: object) -> bool:
        return name in self._protos

    def __iter__(self) -> Iterator[str]:
        return iter(self._protos)

    def __len__(self) -> int:
        return len(self._protos)

    def proto(self, name: str) -> onnx.TensorProto:
        return self._protos[name]


@dataclass
class Graph:
    """Read-only view of a prepared model: nodes by name, tensors, shapes, constants, DAG.

    ``dag`` is a networkx DiGraph over node names; each edge carries ``tensor`` (the tensor
    name that flows along it). Every node has a unique, non-empty name (generated if needed).
    """

    model: onnx.ModelProto
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    producer: dict[str, str] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    shapes: dict[str, tuple[int | None, ...] | None] = field(default_factory=dict)
    dtypes: dict[str, int] = field(default_factory=dict)
    constants: Mapping[str, np.ndarray] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    dag: nx.DiGraph = field(default_factory=nx.DiGraph)
    opset: int = 17

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> Graph:
        g = cls(model=model, opset=opset_version(model))
        graph = model.graph
        g.constants = InitializerArrays(graph.initializer)
        g.inputs = [vi.name for vi in graph.input if vi.name not in g.constants]
        g.outputs = [vi.name for vi in graph.output]
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            g.shapes[vi.name] = dims(vi)
            g.dtypes[vi.name] = vi.type.tensor_type.elem_type
        for init in graph.initializer:
            g.shapes[init.name] = tuple(init.dims)
            g.dtypes[init.name] = init.data_type
        used_names: set[str] = set()
        for index, node in enumerate(graph.node):
            name = node.name or f"{node.op_type}_{index}"
            while name in used_names:
                name = f"{name}_{index}"
            used_names.add(name)
            if node.name != name:
                node.name = name
            g.nodes[name] = node
            g.order.append(name)
            g.dag.add_node(name)
            for out in node.output:
                if out:
                    g.producer[out] = name
        for name in g.order:
            for inp in g.nodes[name].input:
                if not inp:
                    continue
                g.consumers.setdefault(inp, []).append(name)
                if inp in g.producer:
                    g.dag.add_edge(g.producer[inp], name, tensor=inp)
        return g

    def node(self, name: str) -> onnx.NodeProto:
        return self.nodes[name]

    def shape(self, tensor: str) -> tuple[int | None, ...] | None:
        return self.shapes.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        return tensor in self.constants

    def topological(self) -> list[str]:
        """Node names in a topological order (the model's own order, which ONNX requires)."""
        return list(self.order)
